"""The per-item Python around the encoders: masks and the shard ensemble, per item.

A GPU runs the model on a batch in a few milliseconds; what the node does per
item in Python around it then sets the rate (issue 12, item 5). This prints
the cost per item of drawing the K = 4 masks of DESIGN §4 as the node does,
for a whole batch in array operations (``encoders.masks.batch_token_masks``),
against one numpy generator per mask (the rule as written, and what the node
did before); and of the ensemble of two encoders for a batch
(``combine_batch``) against one item at a time. Batch sizes 1 to 1024, at the
token counts of the shipped preprocessing (16 for a picture, 64 for a clip,
a spectrogram or the longest caption). One thread, as in an encoder worker.

    .venv/bin/python bench/bench_masks.py
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"  # before numpy loads: an encoder worker's setting

import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.ensemble import EnsembleRule, combine_batch  # noqa: E402
from encoders.masks import batch_token_masks, kept_count, mask_seed  # noqa: E402

BATCHES = (1, 8, 32, 256, 1024)
TOKENS = (16, 64)
MASKS = 4
SHARE = 0.85


def one_generator_per_mask(n: int, sha: bytes) -> npt.NDArray[np.bool_]:
    masks = np.zeros((MASKS, n), dtype=np.bool_)
    for k in range(MASKS):
        seed = int.from_bytes(mask_seed(b"beacon", sha, k), "big")
        draws = np.random.Generator(np.random.PCG64(seed)).random(n)
        masks[k, np.argsort(draws, kind="stable")[: kept_count(n, SHARE)]] = True
    return masks


def masks_one_by_one(n: int, shas: list[bytes]) -> list[npt.NDArray[np.bool_]]:
    return [one_generator_per_mask(n, sha) for sha in shas]


def ensemble_one_by_one(
    embeddings: npt.NDArray[np.float64], losses: npt.NDArray[np.float64], rule: EnsembleRule
) -> list[object]:
    return [
        combine_batch(embeddings[:, i : i + 1], losses[:, i : i + 1], rule)
        for i in range(embeddings.shape[1])
    ]


def per_item_seconds(run: Callable[[], object], items: int) -> float:
    """Best of five timings of ``run``, per item."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        repeats = 0
        while time.perf_counter() - start < 0.2:
            run()
            repeats += 1
        best = min(best, (time.perf_counter() - start) / repeats)
    return best / items


def main() -> None:
    rng = np.random.default_rng(0)
    print("masks, µs per item (K = 4)")
    print(f"{'tokens':>6} {'batch':>6} {'batched':>9} {'per mask':>9} {'ratio':>6}")
    for n in TOKENS:
        for b in BATCHES:
            shas = [rng.bytes(32) for _ in range(b)]
            batched = per_item_seconds(
                partial(batch_token_masks, [n] * b, SHARE, b"beacon", shas, MASKS), b
            )
            single = per_item_seconds(partial(masks_one_by_one, n, shas), b)
            print(
                f"{n:>6} {b:>6} {batched * 1e6:>9.1f} {single * 1e6:>9.1f} {single / batched:>6.1f}"
            )
    print("\nensemble of 2 encoders (D = 256), µs per item")
    print(f"{'batch':>6} {'batched':>9} {'per item':>9} {'ratio':>6}")
    rule = EnsembleRule()
    for b in BATCHES:
        embeddings = rng.standard_normal((2, b, 256))
        embeddings /= np.linalg.norm(embeddings, axis=2, keepdims=True)
        losses = rng.random((2, b))
        batched = per_item_seconds(partial(combine_batch, embeddings, losses, rule), b)
        single = per_item_seconds(partial(ensemble_one_by_one, embeddings, losses, rule), b)
        print(f"{b:>6} {batched * 1e6:>9.1f} {single * 1e6:>9.1f} {single / batched:>6.1f}")


if __name__ == "__main__":
    main()
