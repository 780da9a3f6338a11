"""Query throughput of the exact history index and of gap scoring.

Prints queries per second for |H| in (10k, 100k), batch sizes 1 and 64,
d = 256, k = 16, on unit vectors drawn around a few hundred clusters. A plain
script: ``python bench/bench_knn.py``. Figures only; nothing is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import numpy as np

from rewards import HistoryIndex, gap_scores

DIM = 256
K = 16
SIZES = (10_000, 100_000)
BATCHES = (1, 64)
QUERIES = 128


def clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = rng.standard_normal((300, DIM))
    rows = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, DIM))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def rate(fn: Callable[[np.ndarray], object], queries: np.ndarray, batch: int) -> float:
    """Queries per second, the median of three passes (the machines are shared)."""
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(queries), batch):
            fn(queries[i : i + batch])
        rates.append(len(queries) / (time.perf_counter() - start))
    return sorted(rates)[1]


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"d={DIM} k={K} queries={QUERIES} (exact faiss IndexFlatL2, float16 history)")
    print(f"{'|H|':>8} {'batch':>5} {'neighbours q/s':>15} {'gap_scores q/s':>15}")
    for size in SIZES:
        index = HistoryIndex(DIM)
        index.add(clustered(rng, size))
        queries = clustered(rng, QUERIES)
        index.neighbours(queries[:64], K)
        for batch in BATCHES:
            knn = rate(partial(index.neighbours, k=K), queries, batch)
            scored = rate(partial(gap_scores, index, k=K), queries, batch)
            print(f"{size:>8} {batch:>5} {knn:>15.0f} {scored:>15.0f}")


if __name__ == "__main__":
    main()
