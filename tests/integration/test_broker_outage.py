"""Mosquitto (with persistence) stopped and restarted in the middle of a stream.

The node reconnects by itself; what the broker held for the node's
persistent session is delivered; Results the node produced while the broker
was away are published once it is back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.conftest import POC_NODE, start_mosquitto, start_node, write_node_config
from tests.peer import PREFIX, Peer, submission_id, submission_topic, verify_result

pytestmark = pytest.mark.integration


class PersistentListener:
    """A submitter's view of its results that survives broker restarts (QoS 1, no clean start)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.finals: dict[bytes, dict[str, Any]] = {}
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="outage-listener", clean_session=False
                ) as client:
                    await client.subscribe(f"{PREFIX}/results/#", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        result = verify_result(bytes(message.payload))  # type: ignore[arg-type]
                        if result["status"] in ("final", "rejected"):
                            self.finals[result["submission_id"]] = result
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.3)


async def publish(port: int, raws: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as client:
        for raw in raws:
            await client.publish(submission_topic(raw), raw, qos=1)


def test_the_node_rides_out_a_broker_restart(tmp_path: Path):
    """On a stream that pays: the ledger equals the final rewards and is not zero."""
    broker = start_mosquitto(tmp_path)
    node = start_node(
        tmp_path / "node",
        f"mqtt://127.0.0.1:{broker.port}",
        write_node_config(
            tmp_path / "node.yaml",
            rounds={"round_seconds": 1},
            scoring={"k": 2, "qualify_ratio": 10.0, "top_k": 3},
        ),
    )
    peer = Peer()
    before = [peer.submission([("text", "text/plain", f"before {i}".encode())]) for i in range(8)]
    after = [peer.submission([("text", "text/plain", f"after {i}".encode())]) for i in range(4)]

    async def scenario() -> dict[bytes, dict[str, Any]]:
        listener = PersistentListener(broker.port)
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            await publish(broker.port, before)
            await asyncio.sleep(0.3)
            broker.stop()  # mid-stream: some accepted, some not yet final
            await asyncio.sleep(3)  # rounds go on committing while the broker is away
            broker.start()
            await publish(broker.port, after)
            deadline = time.monotonic() + 60
            wanted = {submission_id(raw) for raw in before + after}
            while not wanted <= set(listener.finals):
                assert time.monotonic() < deadline, len(wanted - set(listener.finals))
                await asyncio.sleep(0.3)
            return listener.finals
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    try:
        finals = asyncio.run(scenario())
        assert all(finals[submission_id(raw)]["status"] == "final" for raw in before + after)
        assert node.metric("poc_bus_reconnects_total") >= 1
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()
    ledger = subprocess.run(
        [str(POC_NODE), "ledger", "--data-dir", str(tmp_path / "node" / "data"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    told = sum(int(finals[submission_id(raw)]["reward"]) for raw in before + after)
    assert sum(json.loads(ledger.stdout).values()) == told > 0
