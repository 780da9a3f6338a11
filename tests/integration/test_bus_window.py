"""A session holds a bounded number of delivered messages, whatever the broker does.

Mosquitto 2.0.11 (Debian's) does not hold its ``max_inflight_messages``
window: every PUBACK lets a whole window more through, so a subscriber that
acknowledges slowly is handed the broker's entire queue. A node whose intake
was full kept every message of a flood (its RSS grew by 20 MB/s in
``bench/bench_overload.py``). These tests flood a slow handler through a real
Mosquitto: the session's receive window must bound what it holds, nothing
may be lost, reordered or handled twice, and the session must keep reading
its own PUBACKs while it defers (a paused socket deadlocked the node).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt
import pytest
from prometheus_client import CollectorRegistry

from node.bus.broker import embedded_broker
from node.bus.client import Bus
from node.ops.config import load_config
from node.ops.metrics import Metrics
from tests.conftest import Broker, free_port

pytestmark = pytest.mark.integration

WINDOW = 40
COUNT = 1500


async def _flood(publisher: aiomqtt.Client, topic: str, count: int, size: int, qos: int) -> None:
    async with publisher:
        publisher.pending_calls_threshold = 1000
        window = asyncio.Semaphore(200)

        async def one(index: int) -> None:
            async with window:
                payload = index.to_bytes(4, "big") + bytes(size - 4)
                await publisher.publish(topic, payload, qos=qos)

        await asyncio.gather(*(one(i) for i in range(count)))


@dataclass
class Run:
    seen: list[int] = field(default_factory=list)
    most_held: float = 0.0
    deferred: float = 0.0
    redeliveries: float = 0.0
    pauses: float = 0.0
    echoed: int = 0


async def flood_session(
    port: int,
    *,
    window: int = WINDOW,
    window_mb: int = 64,
    size: int = 200,
    qos: int = 1,
    echo_every: int = 0,
    name: str = "window-test",
    scheme: str = "mqtt",
    backlog: bool = False,
    keepalive: int = 30,
    settings: dict[str, object] | None = None,
    publisher: Callable[[], aiomqtt.Client] | None = None,
    topic: str | None = None,
    echo_topic: str | None = None,
) -> Run:
    """Flood ``COUNT`` messages at a handler that keeps up with a fraction of them.

    With ``echo_every`` the handler also publishes on its own session and awaits
    the PUBACK, as the node's Results and a one-member committee's rounds do.
    With ``backlog`` the flood goes to the session while it is away: at its
    return the broker sends the backlog before anything else. ``settings``,
    ``publisher``, ``topic`` and ``echo_topic`` put the session, the flooder and
    the topics on another broker (TLS, accounts, ACL).
    """
    topic = topic or f"flood/{name}"
    echo_topic = echo_topic or f"echo/{name}"

    def flooder() -> aiomqtt.Client:
        if publisher is not None:
            return publisher()
        return aiomqtt.Client("127.0.0.1", port, identifier=f"flooder-{name}")

    config = load_config(
        None,
        {
            "bus.url": f"{scheme}://127.0.0.1:{port}",
            "bus.receive_window": window,
            "bus.receive_window_mb": window_mb,
            "bus.connect_timeout_s": 5,
            "bus.keepalive_s": keepalive,
            **(settings or {}),
        },
    )
    registry = CollectorRegistry()
    bus = Bus(config.bus, name, Metrics(registry))
    run = Run()
    done = asyncio.Event()
    label = {"session": "submissions"}

    async def slow(topic: str, payload: bytes) -> None:
        held = registry.get_sample_value("poc_bus_held_messages", label) or 0.0
        run.most_held = max(run.most_held, held)
        index = int.from_bytes(payload[:4], "big")
        run.seen.append(index)
        await asyncio.sleep(0.002)  # an intake that keeps up with a fraction of the flood
        if echo_every and index % echo_every == 0:
            await bus.publish(echo_topic, payload[:4])
            run.echoed += 1
        if len(run.seen) >= COUNT:
            done.set()

    runner = asyncio.create_task(bus.run([topic], slow))
    try:
        await asyncio.wait_for(bus.connected.wait(), 10)
        if backlog:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await _flood(flooder(), topic, COUNT, size, qos)
            runner = asyncio.create_task(bus.run([topic], slow))
        else:
            await _flood(flooder(), topic, COUNT, size, qos)
        if qos == 1:
            await asyncio.wait_for(done.wait(), 120)
        else:
            await asyncio.sleep(2)  # what QoS 0 left behind is gone: let the handler finish
    finally:
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
    run.deferred = sum(
        registry.get_sample_value("poc_bus_deferred_total", {**label, "qos": q}) or 0.0
        for q in ("0", "1")
    )
    run.redeliveries = registry.get_sample_value("poc_bus_window_reconnects_total", label) or 0.0
    run.pauses = registry.get_sample_value("poc_bus_read_pauses_total", label) or 0.0
    return run


def test_a_flood_never_holds_more_than_the_receive_window(mosquitto: Broker):
    """Nothing awaits an answer on the session: it stops reading, TCP pushes back."""
    run = asyncio.run(flood_session(mosquitto.port, name="count"))
    assert run.most_held <= WINDOW
    assert run.pauses > 0  # the window was reached: it fired
    assert run.deferred == 0  # by pausing alone
    assert run.seen == list(range(COUNT))  # nothing lost, reordered or handled twice


def test_a_backlog_met_at_reconnection_is_held_to_the_window(mosquitto: Broker):
    """The broker sends a session's backlog before the SUBACK of its renewed
    subscription: the session renews without waiting for it, so it can pause."""
    run = asyncio.run(flood_session(mosquitto.port, backlog=True, name="backlog"))
    assert run.most_held <= WINDOW
    assert run.pauses > 0 and run.deferred == 0
    assert run.seen == list(range(COUNT))


def test_no_ping_is_sent_into_the_backlog(mosquitto: Broker):
    """A keepalive far shorter than the flood: a PINGREQ while messages are held
    would be answered after the backlog, and the session would read on past
    the window to find the PINGRESP."""
    run = asyncio.run(flood_session(mosquitto.port, keepalive=1, name="keepalive"))
    assert run.most_held <= WINDOW
    assert run.pauses > 0 and run.deferred == 0
    assert run.seen == list(range(COUNT))


def test_without_the_window_the_broker_hands_over_far_more(mosquitto: Broker):
    """The control: Mosquitto's own window does not bound what a slow session holds."""
    run = asyncio.run(flood_session(mosquitto.port, window=100_000, name="control"))
    assert run.deferred == 0 and run.pauses == 0
    assert run.most_held > 5 * WINDOW
    assert run.seen == list(range(COUNT))


def test_large_messages_are_bounded_by_bytes_too(mosquitto: Broker):
    # A 1 MiB window of 64 KiB messages: at most 16 held, well under the count window;
    # the session pauses at the byte window, never reading on to defer.
    run = asyncio.run(flood_session(mosquitto.port, window_mb=1, size=60 * 1024, name="bytes"))
    assert run.most_held <= 18  # 17 messages reach 1 MiB: the 18th is one past it
    assert run.pauses > 0
    assert run.deferred == 0
    assert run.seen == list(range(COUNT))


def test_own_publishes_are_acknowledged_while_deferring(mosquitto: Broker):
    """The handler awaits PUBACKs on its own session, so the session must read on:
    what arrives past the window is deferred and delivered again after a reconnect."""
    run = asyncio.run(flood_session(mosquitto.port, echo_every=10, name="echo"))
    assert run.most_held <= WINDOW
    assert run.deferred > 0 and run.redeliveries > 0
    assert run.echoed == COUNT // 10
    assert run.seen == list(range(COUNT))


def test_a_qos0_flood_is_bounded(mosquitto: Broker):
    """QoS 0 has no broker window at all: the session's window is the only bound."""
    run = asyncio.run(flood_session(mosquitto.port, qos=0, name="qos0"))
    assert run.most_held <= WINDOW
    assert run.pauses > 0 or run.deferred > 0
    assert run.redeliveries == 0  # a QoS 0 message is never sent again
    assert run.seen == sorted(set(run.seen))  # at most once, in order


def test_the_window_is_off_with_the_embedded_broker():
    """amqtt, the quick start's broker, sends nothing again: deferring would lose messages."""

    async def scenario() -> Run:
        port = free_port()
        async with embedded_broker("127.0.0.1", port):
            return await flood_session(port, scheme="embedded", name="embedded")

    run = asyncio.run(scenario())
    assert run.deferred == 0
    assert run.most_held > WINDOW  # nothing bounds it there: documented
    assert run.seen == list(range(COUNT))
