"""Torch off the event loop: micro-batches per modality, one encoder thread, never idle.

Items wait in one queue per modality. The encoder thread runs one batch at a
time: whenever it is free it takes the modality whose oldest item has waited
longest, and up to that modality's batch size of its items (``BatchPolicy``).
While the thread is busy, items gather by themselves, so under load batches
fill without any waiting; only an item that arrives at an idle encoder waits,
at most its modality's ``wait_ms``, for company. A full queue makes ``embed``
wait, which pushes back on intake instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from encoders.modality import Modality
from encoders.shard import EncodeRequest, ItemEmbedding, Shard
from node.ops.metrics import Metrics
from node.ops.threads import name_thread, threads_cpu_seconds
from node.pipeline.batching import BatchPolicy

log = logging.getLogger("poc.encoding")

ENCODER_THREAD = "poc-encoder"
"""The encoder thread's name, inherited by the threads torch starts from it."""


@dataclass
class _Job:
    request: EncodeRequest
    beacon: bytes
    future: asyncio.Future[ItemEmbedding]
    queued_at: float = field(default_factory=time.monotonic)


class EncoderService:
    """Runs a :class:`Shard` on its own thread for coroutines that await embeddings."""

    def __init__(
        self, shard: Shard, policy: BatchPolicy, queue_size: int, metrics: Metrics
    ) -> None:
        self.shard = shard
        self._policy = policy
        self._queues: dict[Modality, deque[_Job]] = {m: deque() for m in policy.batches}
        self._room = asyncio.Semaphore(queue_size)
        self._arrived = asyncio.Event()
        self._metrics = metrics
        self._thread = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="encoder",
            initializer=name_thread,
            initargs=(ENCODER_THREAD,),
        )

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def embed(self, requests: Sequence[EncodeRequest], beacon: bytes) -> list[ItemEmbedding]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(request, beacon, loop.create_future()) for request in requests]
        for job in jobs:
            await self._room.acquire()  # waits while the queue is full
            self._queues[job.request.modality].append(job)
            self._arrived.set()
        self._metrics.queue_depth.labels(queue="encode").set(self.queued)
        return list(await asyncio.gather(*(job.future for job in jobs)))

    def _oldest(self) -> Modality | None:
        waiting = [(queue[0].queued_at, m) for m, queue in self._queues.items() if queue]
        return min(waiting, key=lambda pair: pair[0])[1] if waiting else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            modality = self._oldest()
            if modality is None:
                self._arrived.clear()
                await self._arrived.wait()
                # The encoder was idle: this item may wait a little for company.
                modality = self._oldest()
                assert modality is not None
                deadline = loop.time() + self._policy.wait_s(modality)
                while len(self._queues[modality]) < self._policy.size(modality):
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout(remaining):
                            await self._arrived.wait()
                    except TimeoutError:
                        break
            await self._encode(self._take(modality))

    def _take(self, modality: Modality) -> list[_Job]:
        """Up to a batch of ``modality``'s oldest jobs, all of one beacon."""
        queue = self._queues[modality]
        beacon = queue[0].beacon
        batch: list[_Job] = []
        kept: list[_Job] = []
        while queue and len(batch) < self._policy.size(modality):
            job = queue.popleft()
            if job.future.done():  # its caller went away
                self._room.release()
            elif job.beacon == beacon:
                batch.append(job)
            else:
                kept.append(job)
        queue.extendleft(reversed(kept))
        for _ in batch:
            self._room.release()
        self._metrics.queue_depth.labels(queue="encode").set(self.queued)
        return batch

    async def _encode(self, group: list[_Job]) -> None:
        if not group:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            embeddings, cpu = await loop.run_in_executor(
                self._thread, _embed, self.shard, [job.request for job in group], group[0].beacon
            )
        except Exception as error:  # a failing batch fails its items, never the node
            log.exception("event=encode_failed items=%d", len(group))
            for job in group:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        modality = str(group[0].request.modality)
        self._metrics.stage_seconds.labels(stage="encode").observe(time.perf_counter() - started)
        self._metrics.stage_cpu.labels(stage="encode").inc(cpu)
        self._metrics.encode_batch.labels(modality=modality).observe(len(group))
        for job, embedding in zip(group, embeddings, strict=True):
            if not job.future.done():
                job.future.set_result(embedding)
            for index, loss in enumerate(embedding.encoder_losses):
                if loss == loss:  # not NaN: the encoder was used
                    self._metrics.encoder_diff_loss.labels(
                        encoder=str(index), modality=modality
                    ).observe(loss)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)


def _embed(
    shard: Shard, requests: list[EncodeRequest], beacon: bytes
) -> tuple[list[ItemEmbedding], float]:
    """The batch's embeddings, and the CPU time the encoder's threads spent on them."""
    before = threads_cpu_seconds(ENCODER_THREAD)
    embeddings = shard.embed(requests, beacon)
    return embeddings, threads_cpu_seconds(ENCODER_THREAD) - before
