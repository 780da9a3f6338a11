"""Torch off the event loop: micro-batches per modality, encoders never idle while items wait.

Items wait in one queue per modality. The engine (``node.pipeline.engines``:
the node's own thread, or encoder worker processes) has slots, each running
one batch at a time: whenever a slot is free it takes the modality whose
oldest item has waited longest, and up to that modality's batch size of its
items (``BatchPolicy``): the oldest one, and with it those of like input
length among the next few batches' worth (``companions``: captions are padded
to the longest of their batch). While the slots are busy, items gather by
themselves, so under load batches fill without any waiting; only an item that
arrives while every slot is idle waits, at most its modality's ``wait_ms``,
for company. A worker process also holds a whole batch waiting behind the
one it runs (``Engine.depth``), so it never idles through the round trip to
the event loop between two batches. A full queue makes ``embed`` wait, which
pushes back on intake instead of growing memory.

An item's embedding is a function of its bytes, its epoch's beacon and the
weights alone, so the service keeps the latest ones (``EmbeddingCache``): an
item sent again in the same epoch (a common caption beside a new picture, a
copy from another key) is answered without being encoded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from encoders.modality import Modality
from encoders.shard import EncodeRequest, ItemEmbedding, Shard
from node.errors import EncoderUnavailable
from node.ops.metrics import Metrics
from node.pipeline.batching import LOOKAHEAD, BatchPolicy, companions
from node.pipeline.engines import Engine, InProcess

log = logging.getLogger("poc.encoding")


@dataclass
class _Job:
    request: EncodeRequest
    beacon: bytes
    future: asyncio.Future[ItemEmbedding]
    length: int
    """``Shard.input_length``: a caption's wordpieces, 0 for the other modalities."""
    queued_at: float = field(default_factory=time.monotonic)


CacheKey = tuple[Modality, bytes, bytes]
"""An item's modality, the SHA-256 of its bytes, and its epoch's beacon."""


class EmbeddingCache:
    """The embeddings of the ``items`` items encoded last, by ``CacheKey`` (0: none kept).

    Holds only what this node's own encoders computed, under the node's own
    hash of the bytes: nothing another party sends can put an entry here.
    The key needs no media type: the bytes fix it (the one modality with two,
    pictures, has PNG and JPEG, whose signatures exclude each other).
    About 1.6 KiB an item at d = 256 with four encoders.
    """

    def __init__(self, items: int) -> None:
        if items < 0:
            raise ValueError(f"items must be >= 0, got {items}")
        self._items = items
        self._entries: OrderedDict[CacheKey, ItemEmbedding] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> ItemEmbedding | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: CacheKey, embedding: ItemEmbedding) -> None:
        if not self._items:
            return
        embedding.vector.setflags(write=False)  # shared by every later caller
        self._entries[key] = embedding
        self._entries.move_to_end(key)
        while len(self._entries) > self._items:
            self._entries.popitem(last=False)


class EncoderService:
    """Runs a :class:`Shard` (through an engine) for coroutines that await embeddings."""

    def __init__(
        self,
        shard: Shard,
        policy: BatchPolicy,
        queue_size: int,
        metrics: Metrics,
        engine: Engine | None = None,
        cache_items: int = 0,
    ) -> None:
        self.shard = shard
        self.engine = engine or InProcess(shard)
        self.cache = EmbeddingCache(cache_items)
        self._policy = policy
        self._queues: dict[Modality, deque[_Job]] = {m: deque() for m in policy.batches}
        self._room = asyncio.Semaphore(queue_size)
        self._changed = asyncio.Event()
        """Set when an item arrives or a batch ends."""
        self._metrics = metrics
        self._running = 0
        self._in_flight: list[int] = []
        """Batches at each slot: running, and waiting behind it."""
        self._idle_since = 0.0
        """When the last batch ended (``time.monotonic``), if none runs."""
        self._losses: dict[tuple[int, str], Any] = {}
        """``poc_encoder_diff_loss`` by (encoder, modality): looked up once, observed per item."""

    @property
    def queued(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    async def embed(self, requests: Sequence[EncodeRequest], beacon: bytes) -> list[ItemEmbedding]:
        """The embeddings of ``requests`` under ``beacon``, in order: cached, or encoded."""
        loop = asyncio.get_running_loop()
        found = [self.cache.get(_key(request, beacon)) for request in requests]
        jobs = []
        for request, embedding in zip(requests, found, strict=True):
            if embedding is None:
                length = self.shard.input_length(request)
                jobs.append(_Job(request, beacon, loop.create_future(), length))
            else:
                self._metrics.encode_cached.labels(modality=str(request.modality)).inc()
        for job in jobs:
            await self._room.acquire()  # waits while the queue is full
            self._queues[job.request.modality].append(job)
            self._changed.set()
        if jobs:
            self._metrics.queue_depth.labels(queue="encode").set(self.queued)
        encoded = iter(await asyncio.gather(*(job.future for job in jobs)))
        return [next(encoded) if embedding is None else embedding for embedding in found]

    def _oldest(self, full: bool = False) -> Modality | None:
        """The modality whose oldest item has waited longest (with ``full``: among those
        with a whole batch waiting)."""
        waiting = [
            (queue[0].queued_at, m)
            for m, queue in self._queues.items()
            if queue and (not full or len(queue) >= self._policy.size(m))
        ]
        return min(waiting, key=lambda pair: pair[0])[1] if waiting else None

    async def run(self) -> None:
        depth = max(1, self.engine.depth)
        self._in_flight = [0] * self.engine.slots
        async with asyncio.TaskGroup() as group:
            while True:
                slot, modality, share = await self._next(depth)
                self._in_flight[slot] += 1
                self._running += 1
                group.create_task(self._encode(slot, self._take(modality, share)))

    async def _next(self, depth: int) -> tuple[int, Modality, int | None]:
        """The slot to fill next, the modality to fill it with, and how many items at most
        (``None``: a whole batch), once there is one.

        An idle slot takes the oldest modality's items at once; idle slots
        share what waits (the end of a burst is spread over idle workers, not
        left to one of them). A busy slot with room behind its running batch
        (``Engine.depth``) takes only a whole batch: it waits there, so that
        the worker starts it the moment it is done with the last one instead
        of idling through a round trip to this loop.
        """
        while True:
            idle = [slot for slot, n in enumerate(self._in_flight) if n == 0]
            modality = self._oldest()
            if idle and modality is not None:
                arrived = self._queues[modality][0].queued_at
                if not self._running and arrived >= self._idle_since:
                    # It arrived while every slot was idle: it may wait for company.
                    modality = await self._company(modality)
                share = -(-len(self._queues[modality]) // len(idle))
                return idle[0], modality, share
            behind = [slot for slot, n in enumerate(self._in_flight) if 0 < n < depth]
            full = self._oldest(full=True)
            if behind and full is not None:
                return min(behind, key=lambda slot: self._in_flight[slot]), full, None
            self._changed.clear()
            await self._changed.wait()

    async def _company(self, modality: Modality) -> Modality:
        """Wait at most the modality's ``wait_ms`` for a whole batch of it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.wait_s(modality)
        while len(self._queues[modality]) < self._policy.size(modality):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                break
        return modality

    def _take(self, modality: Modality, share: int | None = None) -> list[_Job]:
        """Up to a batch (or ``share``) of ``modality``'s jobs, all of the oldest one's
        beacon: the oldest, and those of like length among the next ``LOOKAHEAD``
        batches' worth (``companions``)."""
        queue = self._queues[modality]
        limit = self._policy.size(modality)
        if share is not None:
            limit = max(1, min(limit, share))
        popped: list[_Job] = []
        window: list[_Job] = []
        while queue and len(window) < LOOKAHEAD * limit:
            job = queue.popleft()
            if job.future.done():  # its caller went away
                self._room.release()
                continue
            popped.append(job)
            if not window or job.beacon == window[0].beacon:
                window.append(job)
        chosen = [window[i] for i in companions([job.length for job in window], limit)]
        taken = {id(job) for job in chosen}
        queue.extendleft(reversed([job for job in popped if id(job) not in taken]))
        for _ in chosen:
            self._room.release()
        self._metrics.queue_depth.labels(queue="encode").set(self.queued)
        return chosen

    async def _encode(self, slot: int, group: list[_Job]) -> None:
        try:
            await self._encode_on(slot, group)
        finally:
            self._running -= 1
            self._in_flight[slot] -= 1
            if not self._running:
                self._idle_since = time.monotonic()
            self._changed.set()

    async def _encode_on(self, slot: int, group: list[_Job]) -> None:
        if not group:
            return
        started = time.perf_counter()
        try:
            embeddings, cpu = await self.engine.embed(
                slot, [job.request for job in group], group[0].beacon
            )
        except Exception as error:  # a failing batch fails its items, never the node
            if isinstance(error, EncoderUnavailable):  # handled: the items are prepared again
                log.warning("event=encode_failed items=%d error=%r", len(group), str(error))
            else:
                log.exception("event=encode_failed items=%d", len(group))
            for job in group:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        modality = str(group[0].request.modality)
        self._metrics.stage_seconds.labels(stage="encode").observe(time.perf_counter() - started)
        self._metrics.stage_cpu.labels(stage="encode").inc(cpu)
        self._metrics.encode_batch.labels(modality=modality).observe(len(group))
        longest = max(job.length for job in group)
        if longest:  # captions: what the batch held, and what it computed (padded)
            self._metrics.encode_tokens.labels(kind="content").inc(sum(j.length for j in group))
            self._metrics.encode_tokens.labels(kind="computed").inc(longest * len(group))
        for job, embedding in zip(group, embeddings, strict=True):
            self.cache.put(_key(job.request, job.beacon), embedding)
            if not job.future.done():
                job.future.set_result(embedding)
            for index, loss in enumerate(embedding.encoder_losses):
                if loss == loss:  # not NaN: the encoder was used
                    self._loss_metric(index, modality).observe(loss)

    def _loss_metric(self, encoder: int, modality: str) -> Any:
        child = self._losses.get((encoder, modality))
        if child is None:
            child = self._losses[(encoder, modality)] = self._metrics.encoder_diff_loss.labels(
                encoder=str(encoder), modality=modality
            )
        return child

    def close(self) -> None:
        self.engine.close()


def _key(request: EncodeRequest, beacon: bytes) -> CacheKey:
    return request.modality, request.data_sha256, beacon
