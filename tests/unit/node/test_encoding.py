"""The encoder service's scheduling: batches per modality, never idle while items wait.

A fake shard records every call; the real shard runs behind this service in
the integration tests (tests/integration).
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.modality import Modality
from node.ops.metrics import Metrics
from node.pipeline.batching import Batching, BatchPolicy
from node.pipeline.encoding import EncoderService

TEXT, IMAGE = Modality.TEXT, Modality.IMAGE


class FakeShard:
    """Embeds instantly, or blocks its first call until released."""

    def __init__(self, block_first: bool = False, fail_on: str | None = None) -> None:
        self.calls: list[tuple[list[str], bytes]] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not block_first:
            self.release.set()
        self.fail_on = fail_on

    def input_length(self, request: EncodeRequest) -> int:
        """A caption's length is its name's (``Shard.input_length``: 0 for the others)."""
        return len(str(request.media)) if request.modality is TEXT else 0

    def embed(self, requests: list[EncodeRequest], beacon: bytes) -> list[ItemEmbedding]:
        self.calls.append(([str(r.media) for r in requests], beacon))
        self.entered.set()
        self.release.wait(30)
        if self.fail_on is not None and any(str(r.media) == self.fail_on for r in requests):
            raise RuntimeError("this batch fails")
        vector = np.ones(4, dtype=np.float32) / 2
        return [ItemEmbedding(vector, 0.0, 1.0, (0.0,), (True,)) for _ in requests]


def policy(text: int = 4, image: int = 2, wait_ms: int = 0) -> BatchPolicy:
    return BatchPolicy(
        {
            TEXT: Batching(text, wait_ms),
            IMAGE: Batching(image, wait_ms),
            Modality.AUDIO: Batching(2, wait_ms),
            Modality.VIDEO: Batching(2, wait_ms),
        }
    )


def request(modality: Modality, name: str) -> EncodeRequest:
    return EncodeRequest(modality, name, name.encode().ljust(32, b"."))  # type: ignore[arg-type]


async def started(
    shard: FakeShard, service_policy: BatchPolicy, queue_size: int = 64, cache_items: int = 0
):
    service = EncoderService(
        shard,  # type: ignore[arg-type]
        service_policy,
        queue_size,
        Metrics(CollectorRegistry()),
        cache_items=cache_items,
    )
    task = asyncio.create_task(service.run())
    return service, task


async def stop(service: EncoderService, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    service.close()


async def test_batches_hold_one_modality_and_at_most_its_size() -> None:
    shard = FakeShard(block_first=True)
    service, task = await started(shard, policy(text=4, image=2))
    first = asyncio.create_task(service.embed([request(TEXT, "t0")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    waiting = [
        asyncio.create_task(service.embed([request(TEXT, f"t{i}"), request(IMAGE, f"i{i}")], b"b"))
        for i in range(1, 8)
    ]
    await asyncio.sleep(0.05)
    shard.release.set()
    await asyncio.gather(first, *waiting)
    for names, _ in shard.calls:
        modalities = {name[0] for name in names}
        assert len(modalities) == 1
        assert len(names) <= (4 if modalities == {"t"} else 2)
    # Seven texts and seven images waited: full batches, not one call per item.
    assert sorted(len(names) for names, _ in shard.calls[1:]) == [1, 2, 2, 2, 3, 4]
    await stop(service, task)


async def test_a_busy_encoder_starts_the_next_batch_without_waiting() -> None:
    shard = FakeShard(block_first=True)
    # A lone item at an idle encoder would wait a minute for company...
    service, task = await started(shard, policy(text=2, wait_ms=60_000))
    full = asyncio.create_task(service.embed([request(TEXT, "a"), request(TEXT, "b")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    lone = asyncio.create_task(service.embed([request(TEXT, "c")], b"b"))
    await asyncio.sleep(0.05)
    shard.release.set()
    # ...but one that arrived while the encoder was busy goes as soon as it is free.
    async with asyncio.timeout(10):
        await asyncio.gather(full, lone)
    assert [names for names, _ in shard.calls] == [["a", "b"], ["c"]]
    await stop(service, task)


async def test_a_lone_item_at_an_idle_encoder_waits_for_company() -> None:
    shard = FakeShard()
    service, task = await started(shard, policy(text=3, wait_ms=300))
    first = asyncio.create_task(service.embed([request(TEXT, "a")], b"b"))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(service.embed([request(TEXT, "b"), request(TEXT, "c")], b"b"))
    await asyncio.gather(first, second)
    assert [names for names, _ in shard.calls] == [["a", "b", "c"]]
    await stop(service, task)


async def test_the_modality_that_waited_longest_goes_first() -> None:
    shard = FakeShard(block_first=True)
    service, task = await started(shard, policy(text=8, image=8))
    busy = asyncio.create_task(service.embed([request(Modality.AUDIO, "x")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    text = asyncio.create_task(service.embed([request(TEXT, "t")], b"b"))
    await asyncio.sleep(0.01)
    images = asyncio.create_task(service.embed([request(IMAGE, f"i{i}") for i in range(5)], b"b"))
    await asyncio.sleep(0.05)
    shard.release.set()
    await asyncio.gather(busy, text, images)
    assert [names[0][0] for names, _ in shard.calls] == ["x", "t", "i"]
    await stop(service, task)


async def test_items_of_different_epochs_never_share_a_batch() -> None:
    shard = FakeShard(block_first=True)
    service, task = await started(shard, policy(text=8))
    busy = asyncio.create_task(service.embed([request(IMAGE, "x")], b"old"))
    await asyncio.to_thread(shard.entered.wait, 10)
    old = asyncio.create_task(service.embed([request(TEXT, "a"), request(TEXT, "b")], b"old"))
    new = asyncio.create_task(service.embed([request(TEXT, "c")], b"new"))
    await asyncio.sleep(0.05)
    shard.release.set()
    await asyncio.gather(busy, old, new)
    assert shard.calls[1:] == [(["a", "b"], b"old"), (["c"], b"new")]
    await stop(service, task)


def text_tokens(service: EncoderService) -> dict[str, float]:
    """``poc_encode_text_tokens_total`` by kind (content, computed)."""
    registry = service._metrics.registry
    return {
        kind: registry.get_sample_value("poc_encode_text_tokens_total", {"kind": kind}) or 0.0
        for kind in ("content", "computed")
    }


async def captions_queued_behind_a_busy_encoder(
    names: list[str], text_batch: int
) -> tuple[list[list[str]], dict[str, float]]:
    """The text batches the encoder made of ``names``, all queued while it was busy, and
    ``poc_encode_text_tokens_total`` after them."""
    shard = FakeShard(block_first=True)
    service, task = await started(shard, policy(text=text_batch))
    busy = asyncio.create_task(service.embed([request(IMAGE, "x")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    waiting = [asyncio.create_task(service.embed([request(TEXT, n)], b"b")) for n in names]
    await asyncio.sleep(0.05)
    shard.release.set()
    await asyncio.gather(busy, *waiting)
    await stop(service, task)
    return [batch for batch, _ in shard.calls[1:]], text_tokens(service)


async def test_waiting_captions_batch_with_those_of_like_length() -> None:
    # Short and long captions arrive in turn, eight of each.
    names = [name for i in range(8) for name in (f"s{i}", f"a-long-caption-{i}")]
    batches, tokens = await captions_queued_behind_a_busy_encoder(names, 4)
    # In arrival order every batch would hold two short and two long ones.
    assert batches == [
        ["s0", "s1", "s2", "s3"],
        ["a-long-caption-0", "a-long-caption-1", "a-long-caption-2", "a-long-caption-3"],
        ["s4", "s5", "s6", "s7"],
        ["a-long-caption-4", "a-long-caption-5", "a-long-caption-6", "a-long-caption-7"],
    ]
    assert tokens["content"] == sum(len(n) for n in names) == tokens["computed"]  # no padding


async def test_the_oldest_caption_goes_in_the_next_batch_whatever_its_length() -> None:
    names = ["an-odd-long-caption"] + [f"s{i:02d}" for i in range(11)]
    batches, tokens = await captions_queued_behind_a_busy_encoder(names, 4)
    assert batches[0] == ["an-odd-long-caption", "s00", "s01", "s02"]
    assert tokens["computed"] - tokens["content"] == 3 * (len(names[0]) - 3)  # its padding


async def test_a_failing_batch_fails_its_items_only() -> None:
    shard = FakeShard(fail_on="bad")
    service, task = await started(shard, policy(text=1))
    with pytest.raises(RuntimeError, match="this batch fails"):
        await service.embed([request(TEXT, "bad")], b"b")
    assert len(await service.embed([request(TEXT, "good")], b"b")) == 1
    await stop(service, task)


async def test_a_full_queue_holds_callers_back() -> None:
    shard = FakeShard(block_first=True)
    service, task = await started(shard, policy(text=1), queue_size=2)
    running = asyncio.create_task(service.embed([request(TEXT, "a")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    queued = asyncio.create_task(service.embed([request(TEXT, "b"), request(TEXT, "c")], b"b"))
    held = asyncio.create_task(service.embed([request(TEXT, "d")], b"b"))
    await asyncio.sleep(0.05)
    assert service.queued == 2  # "d" waits for room
    shard.release.set()
    await asyncio.gather(running, queued, held)
    assert service.queued == 0
    await stop(service, task)


class TwoSlots:
    """An engine of two slots over a fake shard (worker processes, without the processes)."""

    def __init__(self, shard: FakeShard) -> None:
        self.shard = shard

    @property
    def slots(self) -> int:
        return 2

    @property
    def depth(self) -> int:
        return 1

    async def start(self) -> None:
        return None

    async def embed(self, slot: int, requests, beacon: bytes):
        return await asyncio.to_thread(self.shard.embed, list(requests), beacon), 0.0

    def close(self) -> None:
        return None


async def test_idle_slots_share_a_burst() -> None:
    shard = FakeShard()
    service = EncoderService(
        shard,  # type: ignore[arg-type]
        policy(text=8, wait_ms=50),
        64,
        Metrics(CollectorRegistry()),
        TwoSlots(shard),
    )
    task = asyncio.create_task(service.run())
    # Both slots idle: eight texts arriving together are split over them.
    await service.embed([request(TEXT, f"t{i}") for i in range(8)], b"b")
    assert sorted(len(names) for names, _ in shard.calls) == [4, 4]
    await stop(service, task)


class QueuingWorker:
    """One slot that holds a second batch behind the running one (a worker process)."""

    def __init__(self, shard: FakeShard) -> None:
        self.shard = shard
        self.handed: list[list[str]] = []  # batches handed to the worker, in order
        self._lock = asyncio.Lock()

    @property
    def slots(self) -> int:
        return 1

    @property
    def depth(self) -> int:
        return 2

    async def start(self) -> None:
        return None

    async def embed(self, slot: int, requests, beacon: bytes):
        self.handed.append([str(r.media) for r in requests])
        async with self._lock:  # one batch at a time, in the order handed
            return await asyncio.to_thread(self.shard.embed, list(requests), beacon), 0.0

    def close(self) -> None:
        return None


async def test_a_busy_worker_holds_the_next_whole_batch_but_not_a_partial_one() -> None:
    shard = FakeShard(block_first=True)
    worker = QueuingWorker(shard)
    service = EncoderService(
        shard,  # type: ignore[arg-type]
        policy(text=2, image=2, wait_ms=0),
        64,
        Metrics(CollectorRegistry()),
        worker,
    )
    task = asyncio.create_task(service.run())
    running = asyncio.create_task(service.embed([request(TEXT, "a")], b"b"))
    await asyncio.to_thread(shard.entered.wait, 10)
    lone = asyncio.create_task(service.embed([request(IMAGE, "i")], b"b"))
    await asyncio.sleep(0.05)
    # One image is not a batch: it stays in the service, free to gather company.
    assert worker.handed == [["a"]]
    whole = asyncio.create_task(service.embed([request(TEXT, "b"), request(TEXT, "c")], b"b"))
    await asyncio.sleep(0.05)
    # A whole batch is handed over while the worker is still busy with the first.
    assert worker.handed == [["a"], ["b", "c"]]
    assert len(shard.calls) == 1
    more = asyncio.create_task(service.embed([request(IMAGE, "j")], b"b"))
    await asyncio.sleep(0.05)
    shard.release.set()
    async with asyncio.timeout(10):
        await asyncio.gather(running, lone, whole, more)
    assert worker.handed == [["a"], ["b", "c"], ["i", "j"]]
    await stop(service, task)


def encoded(shard: FakeShard) -> list[str]:
    return [name for names, _ in shard.calls for name in names]


def cached_count(service: EncoderService, modality: str) -> float:
    return service._metrics.encode_cached.labels(modality=modality)._value.get()


async def test_an_item_sent_again_in_its_epoch_is_not_encoded_again() -> None:
    shard = FakeShard()
    service, task = await started(shard, policy(), cache_items=16)
    try:
        [first] = await service.embed([request(TEXT, "caption")], b"epoch-1")
        # Again, beside a new picture, in the same epoch: only the picture is encoded.
        again, picture = await service.embed(
            [request(TEXT, "caption"), request(IMAGE, "new")], b"epoch-1"
        )
        assert again is first and picture is not first
        assert encoded(shard) == ["caption", "new"]
        assert cached_count(service, "text") == 1
        # Another epoch's beacon, or the same hash under another modality: encoded.
        await service.embed([request(TEXT, "caption")], b"epoch-2")
        await service.embed([request(IMAGE, "caption")], b"epoch-1")
        assert encoded(shard) == ["caption", "new", "caption", "caption"]
        # What the cache hands out cannot be changed by the one it was handed to.
        with pytest.raises(ValueError):
            again.vector[0] = 7.0
    finally:
        await stop(service, task)


async def test_the_cache_keeps_only_the_latest_items_and_none_when_sized_zero() -> None:
    shard = FakeShard()
    service, task = await started(shard, policy(), cache_items=2)
    try:
        for name in ("a", "b", "c", "a", "c"):
            await service.embed([request(TEXT, name)], b"e")
        assert encoded(shard) == ["a", "b", "c", "a"]  # "a" had given way to "c"
        assert len(service.cache) == 2
    finally:
        await stop(service, task)
    shard = FakeShard()
    service, task = await started(shard, policy(), cache_items=0)
    try:
        for _ in range(3):
            await service.embed([request(TEXT, "a")], b"e")
        assert encoded(shard) == ["a", "a", "a"] and len(service.cache) == 0
    finally:
        await stop(service, task)


async def test_a_failed_encoding_is_never_cached() -> None:
    shard = FakeShard(fail_on="bad")
    service, task = await started(shard, policy(), cache_items=16)
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await service.embed([request(TEXT, "bad")], b"e")
        assert encoded(shard) == ["bad", "bad"] and len(service.cache) == 0
    finally:
        await stop(service, task)
