"""The outbox publisher: every entry sent in order, at least once; deletions in batches."""

from __future__ import annotations

import asyncio

import aiomqtt
from prometheus_client import CollectorRegistry

from node.bus.client import OutboxPublisher
from node.ops.metrics import Metrics


class FakeOutbox:
    """The store's outbox as the publisher sees it: rows by seq, deletions counted."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, bytes, bool]] = {}
        self.next_seq = 1
        self.deletions: list[list[int]] = []

    def add(self, count: int) -> None:
        for _ in range(count):
            self.rows[self.next_seq] = (f"results/{self.next_seq}", b"p%d" % self.next_seq, False)
            self.next_seq += 1

    async def fetch(self, after: int, limit: int) -> list[tuple[int, str, bytes, bool]]:
        seqs = sorted(s for s in self.rows if s > after)[:limit]
        return [(s, *self.rows[s]) for s in seqs]

    async def done(self, seqs: list[int]) -> None:
        self.deletions.append(list(seqs))
        for s in seqs:
            del self.rows[s]


class FakeBus:
    def __init__(self, failing: set[str] | None = None) -> None:
        self.connected = asyncio.Event()
        self.connected.set()
        self.sent: list[str] = []
        self.attempts: list[str] = []
        self.failing = failing or set()

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await asyncio.sleep(0)
        self.attempts.append(topic)
        if topic in self.failing:
            self.failing.discard(topic)  # fails once, as a broker that went away and came back
            raise aiomqtt.MqttError("no PUBACK")
        self.sent.append(topic)


async def run_until_empty(outbox: FakeOutbox, bus: FakeBus, window: int) -> None:
    publisher = OutboxPublisher(
        bus, outbox.fetch, outbox.done, window, Metrics(CollectorRegistry())
    )  # type: ignore[arg-type]
    task = asyncio.create_task(publisher.run())
    try:
        for _ in range(35):  # a steady stream, one entry at a time
            outbox.add(1)
            publisher.notify()
            await asyncio.sleep(0.005)
        async with asyncio.timeout(5):
            while outbox.rows:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()


def test_every_entry_is_sent_in_order_and_deleted_in_batches() -> None:
    outbox, bus = FakeOutbox(), FakeBus()
    asyncio.run(run_until_empty(outbox, bus, window=10))
    assert bus.sent == [f"results/{s}" for s in range(1, 36)]
    deleted = [s for batch in outbox.deletions for s in batch]
    assert sorted(deleted) == list(range(1, 36))
    # One trip to the store per window, and the last once the stream went quiet
    # (so a drain finds the outbox empty): not one per entry sent.
    assert len(outbox.deletions) <= 35 // 10 + 1


def test_a_failed_publish_is_sent_again_and_nothing_is_lost() -> None:
    outbox, bus = FakeOutbox(), FakeBus(failing={"results/3", "results/20"})
    asyncio.run(run_until_empty(outbox, bus, window=10))
    everything = [f"results/{s}" for s in range(1, 36)]
    assert sorted(bus.sent) == sorted(everything) and len(bus.sent) == 35
    assert list(dict.fromkeys(bus.attempts)) == everything  # first tried in order
    assert bus.attempts.count("results/3") == bus.attempts.count("results/20") == 2
    assert sorted(s for batch in outbox.deletions for s in batch) == list(range(1, 36))
