"""The node against a broker that goes away, and against its own weights."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from encoders.weights import sha256_file
from tests.conftest import (
    run_command,
    session_weights,
    start_mosquitto,
    start_node,
    write_node_config,
)
from tests.media import image_bytes
from tests.peer import Peer, ResultListener, submission_id

pytestmark = pytest.mark.integration


def readiness(port: int) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return dict(json.loads(reply.read()))
    except urllib.error.HTTPError as error:
        return dict(json.loads(error.read()))


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


async def final_of(port: int, raw: bytes) -> dict:
    async with ResultListener(port) as listener:
        await listener.publish(raw)
        return await listener.final(submission_id(raw))


def test_the_node_reconnects_when_the_broker_comes_back(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}")
    try:
        peer = Peer()
        before = asyncio.run(
            final_of(broker.port, peer.submission([("text", "text/plain", b"before the outage")]))
        )
        assert before["status"] == "final"

        broker.stop()
        wait_until(lambda: readiness(node.metrics_port)["bus_connected"] is False)
        assert readiness(node.metrics_port)["ready"] is False
        broker.start()
        wait_until(lambda: readiness(node.metrics_port)["ready"] is True, timeout=60)
        assert node.metric("poc_bus_reconnects_total") >= 1

        after = asyncio.run(
            final_of(broker.port, peer.submission([("text", "text/plain", b"after the outage")]))
        )
        assert after["status"] == "final"
        assert node.process.poll() is None
    finally:
        assert node.stop() == 0, node.log_text()
        broker.stop()


def _weights_with_delta(directory: Path, delta: float) -> Path:
    shutil.copytree(Path(session_weights()["manifest"]).parent, directory)
    manifest = directory / "manifest.json"
    document = json.loads(manifest.read_text())
    document["pair_delta"] = {key: delta for key in document["pair_delta"]}
    manifest.write_text(json.dumps(document, indent=2, sort_keys=True))
    return manifest


def test_a_pair_too_far_apart_is_rejected_after_its_round(mosquitto, tmp_path: Path):
    manifest = _weights_with_delta(tmp_path / "weights", 0.0)
    config = write_node_config(
        tmp_path / "node.yaml",
        encoders={"manifest": str(manifest), "manifest_sha256": sha256_file(manifest)},
    )
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{mosquitto.port}", config)
    try:
        raw = Peer().submission(
            [
                ("text", "text/plain", b"a blue star"),
                ("image", "image/png", image_bytes("RGB", size=(51, 50))),
            ]
        )

        async def scenario() -> list[dict]:
            async with ResultListener(mosquitto.port) as listener:
                await listener.publish(raw)
                await listener.final(submission_id(raw))
                return listener.about(submission_id(raw))

        accepted, rejected = asyncio.run(scenario())
        assert accepted["status"] == "accepted"
        assert (rejected["status"], rejected["reason"]) == ("rejected", "pair_too_far")
        assert isinstance(rejected["round"], int) and rejected["reward"] == 0
        assert rejected["pair_distance_ppm"] > 0
        assert [e["fused"] for e in rejected["embeddings"]] == [False, False]
        assert node.metric("poc_rejections_total", 'reason="pair_too_far"') == 1
    finally:
        assert node.stop() == 0


def test_the_node_refuses_to_start_on_weights_that_do_not_match(tmp_path: Path):
    manifest = _weights_with_delta(tmp_path / "weights", 0.5)
    config = write_node_config(
        tmp_path / "node.yaml",
        encoders={
            "manifest": str(manifest),
            "manifest_sha256": session_weights()["manifest_sha256"],
        },
    )
    result = subprocess.run(
        run_command(config, tmp_path / "data", "mqtt://127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert "manifest.json" in result.stderr and sha256_file(manifest) in result.stderr


def test_the_broker_keeps_only_the_last_round_summaries(tmp_path: Path):
    """Retained rounds/<r> older than rounds.summary_retention_rounds are cleared."""
    import aiomqtt

    from tests.peer import PREFIX

    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml", rounds={"round_seconds": 1, "summary_retention_rounds": 3}
    )
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    try:
        first = node.metric("poc_finalized_round")
        wait_until(lambda: node.metric("poc_finalized_round") >= first + 6, timeout=60)
        last = int(node.metric("poc_finalized_round"))

        async def retained() -> set[int]:
            rounds: set[int] = set()
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe(f"{PREFIX}/rounds/+", qos=1)
                try:
                    async with asyncio.timeout(2):
                        async for message in client.messages:
                            if message.retain and message.payload:
                                rounds.add(int(str(message.topic).rsplit("/", 1)[1]))
                except TimeoutError:
                    pass
            return rounds

        kept = asyncio.run(retained())
        assert kept, "no retained summary at all"
        assert min(kept) >= last - 3, (kept, last)  # older ones were cleared
        assert max(kept) >= last - 1
    finally:
        node.stop()
        broker.stop()
