"""Torch off the event loop: micro-batched encoding behind a bounded queue.

Items from many submissions are gathered into one batch (up to
``batch_size`` items, waiting at most ``batch_wait_ms`` for more) and encoded
by the shard on one dedicated thread. A full queue makes ``embed`` wait, which
pushes back on intake instead of growing memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from encoders.shard import EncodeRequest, ItemEmbedding, Shard
from node.ops.metrics import Metrics

log = logging.getLogger("poc.encoding")


@dataclass
class _Job:
    request: EncodeRequest
    beacon: bytes
    future: asyncio.Future[ItemEmbedding]


class EncoderService:
    """Runs a :class:`Shard` on its own thread for coroutines that await embeddings."""

    def __init__(
        self,
        shard: Shard,
        batch_size: int,
        batch_wait_ms: int,
        queue_size: int,
        metrics: Metrics,
    ) -> None:
        self.shard = shard
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_ms / 1000
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._metrics = metrics
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder")

    async def embed(self, requests: Sequence[EncodeRequest], beacon: bytes) -> list[ItemEmbedding]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(request, beacon, loop.create_future()) for request in requests]
        for job in jobs:
            await self._queue.put(job)
        self._metrics.queue_depth.labels(queue="encode").set(self._queue.qsize())
        return list(await asyncio.gather(*(job.future for job in jobs)))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._batch_wait_s
            while len(batch) < self._batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            self._metrics.queue_depth.labels(queue="encode").set(self._queue.qsize())
            for beacon in dict.fromkeys(job.beacon for job in batch):
                group = [job for job in batch if job.beacon == beacon and not job.future.done()]
                if group:
                    await self._encode(group, beacon)

    async def _encode(self, group: list[_Job], beacon: bytes) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            embeddings = await loop.run_in_executor(
                self._thread, self.shard.embed, [job.request for job in group], beacon
            )
        except Exception as error:  # a failing batch fails its items, never the node
            log.exception("event=encode_failed items=%d", len(group))
            for job in group:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self._metrics.stage_seconds.labels(stage="encode").observe(time.perf_counter() - started)
        for job, embedding in zip(group, embeddings, strict=True):
            if not job.future.done():
                job.future.set_result(embedding)
            for index, loss in enumerate(embedding.encoder_losses):
                if loss == loss:  # not NaN: the encoder was used
                    self._metrics.encoder_diff_loss.labels(
                        encoder=str(index), modality=str(job.request.modality)
                    ).observe(loss)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
