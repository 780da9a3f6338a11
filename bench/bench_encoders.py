"""Encode throughput per modality at batch sizes 1 to 64 (items/s), and the best.

Uses the default (trained) weights in ``weights/default``; the figures
include the differential loss (1 + 2K forward variants per item, K = 4) and
every encoder of the shard, i.e. exactly what a validator pays per item.
Throughput depends on the weights' architecture, not their values, but the
benchmark loads the shipped files so that it measures what a node runs.
Run: ``python bench/bench_encoders.py``.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from encoders.embedding import EncodeRequest
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import sha256_file

MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "default" / "manifest.json"
BATCHES = (1, 4, 8, 16, 32, 64)
MIN_SECONDS = 2.0
SENTENCES = (
    "a dog runs across a sunny field chasing a red ball",
    "the orchestra tunes before the evening concert begins",
    "rain falls on the tin roof of an old farmhouse at night",
)


def requests_for(shard: Shard, modality: Modality, count: int) -> list[EncodeRequest]:
    spec = shard.preprocess
    rng = np.random.default_rng(0)
    shapes = {
        Modality.IMAGE: (3, spec.image_size, spec.image_size),
        Modality.AUDIO: (spec.n_mels, spec.audio_frames),
        Modality.VIDEO: (spec.video_frames, 3, spec.video_size, spec.video_size),
    }
    out = []
    for i in range(count):
        sha = hashlib.sha256(f"{modality}-{i}".encode()).digest()
        if modality is Modality.TEXT:
            out.append(EncodeRequest(modality, f"{SENTENCES[i % 3]} number {i}", sha))
        else:
            media = rng.uniform(-1, 1, shapes[modality]).astype(np.float32)
            out.append(EncodeRequest(modality, media, sha))
    return out


def throughput(shard: Shard, requests: list[EncodeRequest]) -> float:
    shard.embed(requests, b"warm-up")
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < MIN_SECONDS or calls < 2:
        shard.embed(requests, b"bench-beacon")
        calls += 1
    return calls * len(requests) / (time.perf_counter() - start)


def main() -> None:
    shard = Shard.load(MANIFEST, sha256_file(MANIFEST))
    print(f"weights {shard.weights_id[:16]}  torch threads {torch.get_num_threads()}")
    header = "".join(f"{f'batch {b}':>12}" for b in BATCHES)
    print(f"{'modality':<8}{header}{'best':>16}   items/s")
    for modality in Modality:
        rates = [throughput(shard, requests_for(shard, modality, b)) for b in BATCHES]
        best = max(range(len(BATCHES)), key=lambda i: rates[i])
        best_text = f"{rates[best]:.1f} @ {BATCHES[best]}"
        print(f"{modality:<8}" + "".join(f"{rate:>12.1f}" for rate in rates) + f"{best_text:>16}")


if __name__ == "__main__":
    main()
