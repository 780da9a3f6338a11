"""The embedded broker against its cheapest abusers: ordinary local MQTT clients.

Found by a black-box audit of the quick start's broker (amqtt, which
authenticates no one): a client subscribed to ``#`` read every submission
and signed copies first; a client published Results and Balances that
``poc-node submit`` and ``balance`` believed; retained messages of any size
grew the node's process; and 1,100 idle sockets, or CONNECTs reset at once,
took every connection slot (the second kind for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from node.bus import broker as broker_module
from node.bus.broker import embedded_broker
from tests.conftest import free_port

pytestmark = pytest.mark.integration

NODE = "poc-node-test-ids"
PREFIX = "poc/v1"


@contextlib.asynccontextmanager
async def running(port: int) -> AsyncIterator[None]:
    async with embedded_broker("127.0.0.1", port, first=(NODE,), prefix=PREFIX) as broker:
        broker.open()
        yield


def client(port: int, identifier: str = "") -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, identifier=identifier, timeout=10)


async def collect(subscriber: aiomqtt.Client, seconds: float) -> list[str]:
    topics: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in subscriber.messages:
                topics.append(str(message.topic))
    return topics


def test_others_publish_only_submissions_and_subscribe_only_to_answers():
    async def scenario() -> tuple[list[str], list[str], list[bool]]:
        port = free_port()
        async with running(port), client(port, NODE) as node, client(port) as spy:
            await node.subscribe("#", qos=1)
            granted = []
            for topic_filter in ("#", f"{PREFIX}/+/#", f"{PREFIX}/submissions/+", "poc/#"):
                granted += [code.is_failure for code in await spy.subscribe(topic_filter, qos=1)]
            for kind in ("results", "rounds", "balances"):
                await spy.subscribe(f"{PREFIX}/{kind}/#", qos=1)
            async with client(port) as submitter:
                await submitter.publish(f"{PREFIX}/submissions/{'ab' * 32}", b"a datum", qos=1)
                for kind in ("results", "rounds", "balances", "consensus", "sync"):
                    await submitter.publish(f"{PREFIX}/{kind}/{'ab' * 32}", b"forged", qos=1)
            for kind in ("results", "rounds", "balances", "consensus", "submissions"):
                await node.publish(f"{PREFIX}/{kind}/{'cd' * 32}", b"from the node", qos=1)
            return await collect(node, 1.5), await collect(spy, 0.5), granted

    at_node, at_spy, granted = asyncio.run(scenario())
    assert granted == [True] * 4  # refused: each could match a submission
    assert at_node == [f"{PREFIX}/submissions/{'ab' * 32}"] + [
        f"{PREFIX}/{kind}/{'cd' * 32}"
        for kind in ("results", "rounds", "balances", "consensus", "submissions")
    ]  # nothing forged reached even the node
    assert sorted(at_spy) == sorted(
        f"{PREFIX}/{kind}/{'cd' * 32}" for kind in ("results", "rounds", "balances")
    )  # never a submission, whatever the filter


def test_only_the_nodes_messages_are_retained_and_only_for_those_who_ask():
    async def scenario() -> tuple[list[str], list[str]]:
        port = free_port()
        async with running(port):
            async with client(port, NODE) as node:
                await node.publish(f"{PREFIX}/balances/{'ab' * 32}/x", b"kept", qos=1, retain=True)
            async with client(port) as other:
                await other.publish(f"{PREFIX}/submissions/{'ef' * 32}", b"x" * 1000, retain=True)
            async with client(port) as reader:
                await reader.subscribe(f"{PREFIX}/balances/#", qos=1)  # any client may
                async with client(port) as unasked:  # amqtt sent it everyone's retained
                    await unasked.subscribe(f"{PREFIX}/results/{'cd' * 32}", qos=1)
                    elsewhere = await collect(unasked, 1.0)
            async with client(port, NODE) as later:
                await later.subscribe("#", qos=1)
                return await collect(later, 1.0), elsewhere

    kept, elsewhere = asyncio.run(scenario())
    assert kept == [f"{PREFIX}/balances/{'ab' * 32}/x"]
    assert elsewhere == []


def _connect_packet(level: int) -> bytes:
    name = b"\x00\x04MQTT"
    variable = name + bytes([level, 0x02]) + struct.pack(">H", 60)
    payload = struct.pack(">H", 1) + b"x"
    body = variable + payload
    return bytes([0x10, len(body)]) + body


def test_idle_and_reset_connections_give_their_slots_back(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(broker_module, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(broker_module, "CONNECT_TIMEOUT_S", 0.5)

    async def scenario() -> tuple[bytes, list[str]]:
        port = free_port()
        async with running(port), client(port, NODE) as node:
            await node.subscribe(f"{PREFIX}/submissions/+", qos=1)
            loop = asyncio.get_running_loop()
            for _ in range(30):  # a bad CONNECT, reset at once: amqtt kept the slot for good
                hit = socket.socket()
                hit.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                hit.setblocking(False)
                await loop.sock_connect(hit, ("127.0.0.1", port))
                await loop.sock_sendall(hit, _connect_packet(level=99))
                hit.close()
            idle = socket.socket()  # says nothing: amqtt waited for ever
            idle.setblocking(False)
            await loop.sock_connect(idle, ("127.0.0.1", port))
            async with asyncio.timeout(5):
                closed = await loop.sock_recv(idle, 1)
            idle.close()
            async with client(port) as honest:
                await honest.publish(f"{PREFIX}/submissions/{'ab' * 32}", b"still served", qos=1)
            return closed, await collect(node, 1.0)

    closed, served = asyncio.run(scenario())
    assert closed == b""  # the broker hung up on the idle socket
    assert served == [f"{PREFIX}/submissions/{'ab' * 32}"]  # a client still gets in, and through
