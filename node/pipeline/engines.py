"""Where the encoders run: in the node's process, or in encoder worker processes.

An engine offers ``slots``: batches that may be encoded at once, and a
``depth``: batches a slot may hold, the running one included. The
``EncoderService`` fills them (``node.pipeline.encoding``).

- ``InProcess``: the node's own shard on one thread (``poc-encoder``); the
  choice for a GPU, where one process should own the device.
- ``WorkerProcesses``: ``encoders.workers`` processes, each loading the
  pinned shard itself (its hash checked at start) and encoding one batch at
  a time with ``encoders.threads`` torch threads. On CPU this is the faster
  choice: the node's other threads (the bus, verification, the store) never
  hold a worker's interpreter lock, and one single-threaded worker per core
  wastes no time at the barriers of torch's thread pool when another process
  takes a core for a while (bench/bench_e2e.py).

A worker that dies mid-batch is replaced and the batch is tried once more on
the new one; items never depend on which worker encoded them (the shard is a
pure function of the bytes, the epoch beacon and the weights).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from encoders.shard import EncodeRequest, ItemEmbedding, Shard
from node.errors import EncoderUnavailable, NodeError
from node.ops.threads import name_thread, reuse_heap, threads_cpu_seconds, trim_heap
from node.pipeline.sandbox import forkserver

log = logging.getLogger("poc.encoding")

ENCODER_THREAD = "poc-encoder"
"""The encoder thread's name, inherited by the threads torch starts from it."""

Embedded = tuple[list[ItemEmbedding], float]
"""A batch's embeddings, and the CPU seconds spent encoding them."""


class Engine(Protocol):
    """Runs the shard on batches, ``slots`` of them at once."""

    @property
    def slots(self) -> int: ...

    @property
    def depth(self) -> int:
        """Batches one slot may hold: the running one, and any waiting behind it."""
        ...

    async def start(self) -> None:
        """Ready to encode (workers started and their weights checked)."""
        ...

    async def embed(self, slot: int, requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
        """Encode one batch on ``slot`` (at most ``depth`` calls per slot at once; the
        slot encodes them one after the other, in the order they came)."""
        ...

    def close(self) -> None: ...


class InProcess:
    """The node's shard, on one thread of the node."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._thread = ThreadPoolExecutor(
            max_workers=1, initializer=name_thread, initargs=(ENCODER_THREAD,)
        )

    @property
    def slots(self) -> int:
        return 1

    @property
    def depth(self) -> int:
        return 1

    async def start(self) -> None:
        """Warm the shard up on the encoder thread (on a GPU: its kernels and buffers)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self.shard.warm_up)

    async def embed(self, slot: int, requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, _embed, self.shard, requests, beacon)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _embed(shard: Shard, requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
    before = threads_cpu_seconds(ENCODER_THREAD)
    embeddings = shard.embed(requests, beacon)
    return embeddings, threads_cpu_seconds(ENCODER_THREAD) - before


@dataclass(frozen=True)
class ShardSpec:
    """What a worker needs to load the pinned shard by itself."""

    manifest: Path
    manifest_sha256: str
    device: str
    tau: float
    mask_count: int
    threads: int


_WORKER_SHARD: Shard | None = None


def kill_executor(executor: ProcessPoolExecutor) -> None:
    """Stop a process pool now, a running call included (no public way does that)."""
    for process in list(getattr(executor, "_processes", {}).values()):
        process.kill()
    executor.shutdown(wait=False, cancel_futures=True)


def _start_worker(spec: ShardSpec) -> None:
    """Runs first in every encoder worker: load and verify the shard, once."""
    global _WORKER_SHARD
    from node.ops.orphan_guard import watch_parent

    watch_parent()
    name_thread(ENCODER_THREAD)
    reuse_heap()
    import torch

    if spec.threads:
        torch.set_num_threads(spec.threads)
    _WORKER_SHARD = Shard.load(
        spec.manifest,
        spec.manifest_sha256,
        device=spec.device,
        tau=spec.tau,
        mask_count=spec.mask_count,
    )
    global _WARMED
    _WARMED = [str(modality) for modality in _WORKER_SHARD.warm_up()]


_WARMED: list[str] = []
"""The modalities this worker warmed up before its first batch."""


def _worker_weights() -> tuple[str, list[str]]:
    """The weights this worker loaded, and the modalities it warmed up."""
    assert _WORKER_SHARD is not None
    return _WORKER_SHARD.weights_id, _WARMED


_TRIM_EVERY = 16
"""Batches between two returns of freed heap memory to the system (``malloc_trim``)."""
_batches = 0


def _worker_embed(requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
    global _batches
    assert _WORKER_SHARD is not None
    before = resource.getrusage(resource.RUSAGE_SELF)
    embeddings = _WORKER_SHARD.embed(requests, beacon)
    _batches += 1
    if _batches % _TRIM_EVERY == 0:
        # Batches of varying shapes leave the heap fragmented; without this a
        # worker's RSS creeps up under sustained load.
        trim_heap()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return embeddings, cpu


WORKER_DEPTH = 2
"""Batches at one worker: the one it encodes, and the next, already in its pipe.

Between two batches a worker with nothing waiting would idle through a
round trip: its result read by the node's pool thread, the event loop
woken, the next batch chosen, pickled and written back, each step waiting
for the node's interpreter lock. On 2 cores under load that idled the
workers about a tenth of the time (bench/bench_e2e.py)."""


class WorkerProcesses:
    """``workers`` encoder processes, each encoding one batch with the next one waiting."""

    def __init__(self, spec: ShardSpec, workers: int, weights_id: str) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be at least 1")
        self._spec = spec
        self._weights_id = weights_id
        self._context = forkserver()
        self._workers = [self._new_worker() for _ in range(workers)]
        self.warmed: list[list[str]] = []
        """Per worker, the modalities it warmed up at start (known once ``start`` returns)."""

    def _new_worker(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=_start_worker,
            initargs=(self._spec,),
        )

    @property
    def slots(self) -> int:
        return len(self._workers)

    @property
    def depth(self) -> int:
        return WORKER_DEPTH

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            found = await asyncio.gather(
                *(loop.run_in_executor(worker, _worker_weights) for worker in self._workers)
            )
        except BrokenProcessPool:
            raise NodeError(
                "an encoder worker could not load the weights (see its error above)"
            ) from None
        wrong = [weights for weights, _ in found if weights != self._weights_id]
        if wrong:  # pragma: no cover - the same pinned manifest is loaded
            raise NodeError(f"an encoder worker loaded weights {wrong[0]}, not {self._weights_id}")
        self.warmed = [warmed for _, warmed in found]

    async def embed(self, slot: int, requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            worker = self._workers[slot]
            try:
                return await loop.run_in_executor(worker, _worker_embed, list(requests), beacon)
            except BrokenProcessPool:
                log.error(
                    "event=encoder_worker_lost slot=%d items=%d attempt=%d",
                    slot,
                    len(requests),
                    attempt,
                )
                if self._workers[slot] is worker:  # not replaced yet for the batch beside
                    kill_executor(worker)
                    self._workers[slot] = self._new_worker()
        raise EncoderUnavailable("encoder workers died twice on this batch")

    def close(self) -> None:
        for worker in self._workers:
            kill_executor(worker)
