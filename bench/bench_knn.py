"""Query throughput of the exact history indexes and of gap scoring.

For each |H| in ``--sizes`` (default 10k, 100k, 1M), d = 256, k = 16, on
unit vectors drawn around a few hundred clusters, prints queries per second
and milliseconds per query (amortized over the batch) at batch sizes 1 and
64 for:

- one exact index: ``neighbours`` (the raw search) and ``gap_scores``;
- ``History`` over four modalities (what the node searches): ``neighbours``,
  ``gap_scores``, and ``score_in_order`` on a round of 64 items (32 pairs);

and the memory each holds. ``--index faiss`` is ``HistoryIndex`` (CPU);
``--index torch`` is ``TorchHistoryIndex`` on ``--device cpu`` or ``cuda``.
For the raw search it also prints the scan rate, bytes of the history read
per second (float16, once per query block; the float32 copy of each block
that both make is further traffic, not counted),
against ``--bandwidth-gbs`` (default 4800 GB/s, an H200's HBM3e).

The vectors are generated and added in chunks of 50k, so a 1M run holds
little beyond the index. Each figure is the best of three timed passes; on
a shared CPU, faiss's OpenMP threads stall whenever another process takes
a core, and figures then swing tenfold between runs: compare runs made on
a quiet machine. A plain script: ``python bench/bench_knn.py
[--sizes 10000,100000]``. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from rewards import History, HistoryIndex, RoundItem, ScoringRules, gap_scores, score_in_order
from rewards.history import IndexFactory, set_search_threads

DIM = 256
K = 16
MODALITIES = ("text", "image", "audio", "video")
CHUNK = 50_000
ROUND_ITEMS = 64
TARGET_MS = 10.0


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=sizes, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batches", type=sizes, default=[1, 64])
    parser.add_argument("--index", choices=("faiss", "torch"), default="faiss")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--chunk-rows", type=int, help="torch: rows per distance block")
    parser.add_argument("--query-block", type=int, help="torch: queries per distance block")
    parser.add_argument("--queries", type=int, default=128, help="distinct queries, cycled")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per timed pass")
    parser.add_argument("--bandwidth-gbs", type=float, default=4800.0)
    parser.add_argument("--no-history", action="store_true", help="only the single index")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="faiss threads of one search, as the node's scoring.threads (0: one per core)",
    )
    args = parser.parse_args()
    if args.index == "faiss" and args.device != "cpu":
        parser.error("faiss's HistoryIndex runs on the CPU: use --index torch for cuda")
    return args


def factory(args: argparse.Namespace) -> tuple[IndexFactory, int, int]:
    """The index factory, the bytes per stored value, and the queries per pass over H."""
    if args.index == "faiss":
        return HistoryIndex, 2, 2**62
    from rewards.history_torch import CHUNK_ROWS, QUERY_BLOCK, TorchHistoryIndex

    block = args.query_block or QUERY_BLOCK
    make = partial(
        TorchHistoryIndex,
        device=args.device,
        chunk_rows=args.chunk_rows or CHUNK_ROWS,
        query_block=block,
    )
    return make, 2, block


class Clusters:
    """Unit vectors around the same 300 centres, drawn in chunks from ``seed``."""

    def __init__(self, seed: int) -> None:
        self._centres = np.random.default_rng(0).standard_normal((300, DIM)).astype(np.float32)
        self._rng = np.random.default_rng(seed)

    def draw(self, n: int) -> np.ndarray:
        rows = self._centres[self._rng.integers(0, len(self._centres), n)]
        rows += 0.3 * self._rng.standard_normal((n, DIM), dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        return rows

    def modalities(self, n: int) -> list[str]:
        return [MODALITIES[i] for i in self._rng.integers(0, len(MODALITIES), n).tolist()]


def held_bytes(args: argparse.Namespace) -> int:
    """Bytes held where the index lives: this process's RSS, or the GPU's allocations."""
    if args.device != "cuda":
        for entry in Path("/proc/self/status").read_text().splitlines():
            if entry.startswith("VmRSS:"):
                return int(entry.split()[1]) * 1024
        return 0
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def per_query(
    fn: Callable[[np.ndarray], object], queries: np.ndarray, batch: int, budget: float
) -> float:
    """Seconds per query: the best of three passes of ``budget`` seconds.

    The best, not the median: on a shared machine other work only adds time,
    and faiss's OpenMP threads stall whenever a core is taken from them.
    """
    fn(queries[:batch])
    passes = []
    for _ in range(3):
        done, start, elapsed = 0, time.perf_counter(), 0.0
        while done == 0 or elapsed < budget:
            first = done % (len(queries) - batch + 1)
            fn(queries[first : first + batch])
            done += batch
            elapsed = time.perf_counter() - start
        passes.append(elapsed / done)
    return min(passes)


def line(size: int, what: str, batch: int, path: str, seconds: float, extra: str = "") -> None:
    figures = f"{1 / seconds:>10.1f} {seconds * 1e3:>10.3f}"
    print(f"{size:>9} {what:<8} {batch:>5} {path:<14} {figures}  {extra}".rstrip())


def build(
    make: Callable[[], Any], size: int, seed: int, args: argparse.Namespace
) -> tuple[Any, int]:
    """An index or History of ``size`` clustered vectors, and the bytes it holds."""
    gc.collect()
    before = held_bytes(args)
    structure = make()
    clusters = Clusters(seed)
    for start in range(0, size, CHUNK):
        rows = clusters.draw(min(CHUNK, size - start)).astype(np.float16)
        if isinstance(structure, History):
            structure.add(clusters.modalities(len(rows)), rows)
        else:
            structure.add(rows)
    gc.collect()
    return structure, held_bytes(args) - before


def bench_index(args: argparse.Namespace, size: int, queries: np.ndarray) -> float:
    """The raw search and gap scores on one index; returns ms per query at the largest batch."""
    make, value_bytes, block = factory(args)
    index, held = build(partial(make, DIM), size, 0, args)
    vectors = size * DIM * value_bytes
    print(f"{size:>9} index    holds {held / 2**20:.0f} MiB ({vectors / 2**20:.0f} MiB of vectors)")
    last_ms = 0.0
    for batch in args.batches:
        seconds = per_query(partial(index.neighbours, k=K), queries, batch, args.seconds)
        scanned = vectors * -(-batch // block) / (seconds * batch) / 1e9
        share = scanned / args.bandwidth_gbs
        line(size, "index", batch, "neighbours", seconds, f"scan {scanned:.1f} GB/s = {share:.2%}")
        last_ms = seconds * 1e3
        seconds = per_query(partial(gap_scores, index, k=K), queries, batch, args.seconds)
        line(size, "index", batch, "gap_scores", seconds)
    del index
    return last_ms


def bench_history(args: argparse.Namespace, size: int, queries: np.ndarray) -> None:
    make, _, _ = factory(args)
    history, held = build(partial(History, DIM, make), size, 1, args)
    print(f"{size:>9} History  holds {held / 2**20:.0f} MiB over {history.modalities()}")
    for batch in args.batches:
        seconds = per_query(partial(history.neighbours, k=K), queries, batch, args.seconds)
        line(size, "History", batch, "neighbours", seconds)
        seconds = per_query(partial(gap_scores, history, k=K), queries, batch, args.seconds)
        line(size, "History", batch, "gap_scores", seconds)
    rules = ScoringRules(k=K, duplicate_radius=dict.fromkeys(MODALITIES, 1e-3))
    labels = [MODALITIES[i % len(MODALITIES)] for i in range(ROUND_ITEMS)]

    def one_round(items: np.ndarray) -> object:
        flat = [RoundItem(m, v) for m, v in zip(labels, items, strict=True)]
        return score_in_order(history, [flat[i : i + 2] for i in range(0, len(flat), 2)], rules)

    seconds = per_query(one_round, queries, ROUND_ITEMS, args.seconds)
    line(size, "History", ROUND_ITEMS, "score_in_order", seconds, "(a round of 32 pairs)")


def main() -> None:
    args = options()
    set_search_threads(args.threads)
    queries = Clusters(2).draw(max(args.queries, *args.batches, ROUND_ITEMS))
    where = f"{args.index} on {args.device}, {args.threads or 'one per core'} search thread(s)"
    print(f"d={DIM} k={K} exact {where}, float16 history; ms/query amortized over the batch;")
    print(f"scan: bytes of H read per second, as a share of {args.bandwidth_gbs:.0f} GB/s")
    print(f"{'|H|':>9} {'what':<8} {'batch':>5} {'path':<14} {'queries/s':>10} {'ms/query':>10}")
    last_ms = 0.0
    for size in args.sizes:
        last_ms = bench_index(args, size, queries)
        if not args.no_history:
            bench_history(args, size, queries)
    print(
        f"exact search at |H| = {args.sizes[-1]:,}, batch {args.batches[-1]}: "
        f"{last_ms:.2f} ms/query (target <= {TARGET_MS:.0f} ms)"
    )


if __name__ == "__main__":
    main()
