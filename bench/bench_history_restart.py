"""Time and peak memory of a node restart with a large history (issue #12, item 4).

Builds a store (a real SQLite file whose schema the ``Store`` class creates)
holding N history rows (default 1M) of d = 256 float16 unit vectors over
four modalities, with the own (unfused) embedding of every item that came
in a pair (``--pair-share``, default 1: all of them, the most memory a
history of N items can take), then loads the history in a fresh subprocess
as the node does at start (``load_history`` over ``Store.history_chunks``
of both tables, on the store's thread) and prints the seconds, the peak
resident memory (VmHWM),
the share of it the history adds over the interpreter with its imports
(torch, faiss), and their ratios to the targets: 30 s and 1.5 GB.

The rows are inserted with SQL straight into the store's ``history`` and
``own_vectors`` tables,
64 items a round, not through ``Store.commit_round``: a million rounds of
full commits (FULL fsync each) would take hours and measure nothing that
the restart reads. The database lives in a temporary directory, deleted at
the end, unless ``--db`` names one to keep (and reuse if it exists).

A plain script: ``python bench/bench_history_restart.py [--rows N]``.
Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

MODALITIES = ("text", "image", "audio", "video")
TARGET_S = 30.0
TARGET_BYTES = 1.5e9
CHUNK = 50_000


def build(path: Path, rows: int, dim: int, pair_share: float) -> None:
    """A store with ``rows`` history items, written in chunks to keep memory low.

    The first ``pair_share`` of every chunk came in pairs: their own
    embeddings (other unit vectors) go to ``own_vectors`` too.
    """
    from node.store.sqlite import Store

    Store(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    rng = np.random.default_rng(0)
    for start in range(0, rows, CHUNK):
        count = min(CHUNK, rows - start)
        vectors = rng.standard_normal((count, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        half = vectors.astype("<f2")
        labels = rng.integers(0, len(MODALITIES), count)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO history (round, submission_id, item, modality, vector) "
            "VALUES (?, ?, 0, ?, ?)",
            (
                ((start + i) // 64, (start + i).to_bytes(32, "big"), MODALITIES[m], v.tobytes())
                for i, (m, v) in enumerate(zip(labels.tolist(), half, strict=True))
            ),
        )
        paired = round(count * pair_share)
        own = rng.standard_normal((paired, dim), dtype=np.float32)
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        db.executemany(
            "INSERT INTO own_vectors (round, submission_id, item, modality, vector) "
            "VALUES (?, ?, 0, ?, ?)",
            (
                ((start + i) // 64, (start + i).to_bytes(32, "big"), MODALITIES[m], v.tobytes())
                for i, (m, v) in enumerate(
                    zip(labels[:paired].tolist(), own.astype("<f2"), strict=True)
                )
            ),
        )
        db.execute("COMMIT")
    db.close()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def load(path: Path, dim: int) -> None:
    """The child: load the history as ``Node.run`` does and print figures as JSON."""
    from node.rounds.history import load_history
    from node.store.sqlite import Store
    from node.store.thread import StoreThread

    shard = SimpleNamespace(dim=dim, genesis=None)
    baseline = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    store = StoreThread(Store(path))
    history = asyncio.run(
        store.call(
            lambda db: load_history(
                shard,  # type: ignore[arg-type]
                db.history_chunks(shard.dim),
                own_chunks=db.history_chunks(shard.dim, table="own_vectors"),
            )
        )
    )
    own = history.own
    seconds = time.perf_counter() - start
    store.close()
    figures = {
        "items": len(history),
        "own": 0 if own is None else len(own),
        "seconds": seconds,
        "baseline": baseline,
        "peak": _status_kib("VmHWM") * 1024,
        "held": _status_kib("VmRSS") * 1024,
    }
    print(json.dumps(figures))


def report(figures: dict[str, float]) -> None:
    mib = 2**20
    share = figures["peak"] - figures["baseline"]
    print(f"items loaded            {figures['items']:>10,.0f}")
    print(f"own embeddings loaded   {figures['own']:>10,.0f}")
    print(
        f"seconds                 {figures['seconds']:>10.1f}"
        f"   {figures['seconds'] / TARGET_S:.2f} of the 30 s target"
    )
    print(f"interpreter + imports   {figures['baseline'] / mib:>10.0f} MiB")
    print(f"peak RSS (VmHWM)        {figures['peak'] / mib:>10.0f} MiB")
    print(
        f"peak for the history    {share / mib:>10.0f} MiB"
        f"   {share / TARGET_BYTES:.2f} of the 1.5 GB target"
    )
    print(f"held after loading      {(figures['held'] - figures['baseline']) / mib:>10.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--pair-share", type=float, default=1.0, help="share of the items that came in pairs"
    )
    parser.add_argument("--db", type=Path, help="keep the database here (reused if it exists)")
    parser.add_argument("--load", type=Path, help=argparse.SUPPRESS)  # the child's side
    args = parser.parse_args()
    if args.load is not None:
        load(args.load, args.dim)
        return
    with tempfile.TemporaryDirectory(prefix="poc-restart-") as scratch:
        path = args.db if args.db is not None else Path(scratch) / "node.sqlite3"
        if not path.exists():
            start = time.perf_counter()
            build(path, args.rows, args.dim, args.pair_share)
            size = path.stat().st_size / 2**20
            print(
                f"built {args.rows:,} rows, {size:.0f} MiB, in {time.perf_counter() - start:.0f} s"
            )
        child = subprocess.run(
            [sys.executable, __file__, "--load", str(path), "--dim", str(args.dim)],
            check=True,
            capture_output=True,
            text=True,
        )
        report(json.loads(child.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
