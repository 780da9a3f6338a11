"""Encode throughput per modality at batch sizes 1 to 64 (items/s), and the best.

It measures what one of the node's encoders pays: the default (trained)
weights in ``weights/default``, every encoder of the shard, the differential
loss (1 + 2K forward variants per item, K = 4), on items of the project's
world (``training.stream.WorldMaker``: captions, PNG/JPEG pictures, espeak-ng
speech, MP4 clips, decoded as the node decodes them), with **the torch threads
of one encoder worker** (cores / ``encoders.workers`` on CPU, as the node
sets them): a single-threaded worker's best batch is not a two-threaded
process's (text is fastest at 8 on one thread, at 32 or more on two). The
defaults of ``encoders.batch`` come from this table; ``--threads N`` measures
another setting.

    .venv/bin/python bench/bench_encoders.py [--threads N] [--items 64]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from encoders.embedding import EncodeRequest  # noqa: E402
from encoders.media import decode_media  # noqa: E402
from encoders.modality import Modality  # noqa: E402
from encoders.shard import Shard  # noqa: E402
from node.daemon import DEFAULT_CPU_WORKERS  # noqa: E402
from node.ops.config import DEFAULT_CONFIG, load_config  # noqa: E402
from node.pipeline.prepare import media_limits  # noqa: E402
from training.stream import WorldMaker, concepts  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)
MIN_SECONDS = 2.0


def world_requests(shard: Shard, modality: Modality, count: int, seed: int) -> list[EncodeRequest]:
    """``count`` decoded items of ``modality``: captions name a concept (and its motion)."""
    maker = WorldMaker(seed)
    pool = concepts(novel=False) + concepts(novel=True)
    rng = random.Random(seed)
    limits = media_limits(load_config(DEFAULT_CONFIG))
    out = []
    for _ in range(count):
        if modality is Modality.TEXT:  # half the captions name a motion, as video's do
            media = Modality.VIDEO if rng.random() < 0.5 else Modality.IMAGE
            item = maker.pair("bench", rng.choice(pool), media).items[0]
        else:
            item = maker.single("bench", rng.choice(pool), modality).items[0]
        data = decode_media(item.modality, item.mime, item.data, limits, shard.preprocess)
        out.append(EncodeRequest(item.modality, data, item.sha256))
    return out


def throughput(shard: Shard, requests: list[EncodeRequest], batch: int) -> float:
    """Items/s encoding ``requests`` in batches of ``batch``, warm, over ≥ MIN_SECONDS."""
    shard.embed(requests[:batch], b"warm-up")
    items, start = 0, time.perf_counter()
    while time.perf_counter() - start < MIN_SECONDS or items < 2 * batch:
        for begin in range(0, len(requests) - batch + 1, batch):
            shard.embed(requests[begin : begin + batch], b"bench-beacon")
            items += batch
    return items / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    worker_threads = max(1, (os.cpu_count() or 1) // DEFAULT_CPU_WORKERS)
    parser.add_argument(
        "--threads",
        type=int,
        default=worker_threads,
        help=f"torch threads (default {worker_threads}: one encoder worker's on this machine)",
    )
    parser.add_argument("--items", type=int, default=64, help="distinct items per modality")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(DEFAULT_CONFIG)
    shard = Shard.load(config.encoders.manifest, config.encoders.manifest_sha256)
    print(f"weights {shard.weights_id[:16]}  torch threads {torch.get_num_threads()}")
    batches = [b for b in BATCHES if b <= args.items]
    header = "".join(f"{f'batch {b}':>10}" for b in batches)
    print(f"{'modality':<8}{header}{'best':>14}   items/s")
    for modality in Modality:
        requests = world_requests(shard, modality, args.items, args.seed)
        rates = [throughput(shard, requests, b) for b in batches]
        best = max(range(len(batches)), key=lambda i: rates[i])
        best_text = f"{rates[best]:.1f} @ {batches[best]}"
        print(f"{modality:<8}" + "".join(f"{rate:>10.1f}" for rate in rates) + f"{best_text:>14}")


if __name__ == "__main__":
    main()
