"""The README's quick start, as a newcomer runs it: embedded broker, keygen, submit."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from tests.conftest import (
    POC_NODE,
    ROOT,
    free_port,
    run_command,
    start_node,
    write_node_config,
)

pytestmark = pytest.mark.integration


def poc(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POC_NODE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_keygen_submit_through_the_embedded_broker(tmp_path: Path):
    port = free_port()
    config = write_node_config(tmp_path / "node.yaml")
    node = start_node(tmp_path / "node", f"embedded://127.0.0.1:{port}", config)
    try:
        keygen = poc("keygen", "--out", str(tmp_path / "me.key"))
        assert keygen.returncode == 0, keygen.stderr
        public = keygen.stdout.strip()
        assert len(public) == 64 and int(public, 16) >= 0
        assert stat.S_IMODE(os.stat(tmp_path / "me.key").st_mode) == 0o600

        image = Image.new("RGB", (96, 96), "white")
        ImageDraw.Draw(image).ellipse((16, 16, 80, 80), fill="red")
        image.save(tmp_path / "circle.png")
        bus = f"mqtt://127.0.0.1:{port}"
        submitted = poc(
            "submit",
            "--key",
            str(tmp_path / "me.key"),
            "--bus",
            bus,
            "text:a red circle",
            str(tmp_path / "circle.png"),
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        lines = submitted.stdout.splitlines()
        assert lines[0].startswith("submission ") and public in lines[0]
        assert lines[1].startswith("accepted")
        assert lines[2].startswith("final") and "round=" in lines[2] and "reward=" in lines[2]

        as_json = poc(
            "submit",
            "--key",
            str(tmp_path / "me.key"),
            "--bus",
            bus,
            "--json",
            "text:a green square",
        )
        assert as_json.returncode == 0, as_json.stderr
        final = json.loads(as_json.stdout.splitlines()[-1])
        assert final["status"] == "final" and final["embeddings"][0]["dim"] == 256

        again = poc(
            "submit", "--key", str(tmp_path / "me.key"), "--bus", bus, "text:a green square"
        )
        assert again.returncode == 1 and "reason=duplicate" in again.stdout
    finally:
        assert node.stop() == 0, node.log_text()

    ledger = poc("ledger", "--data-dir", str(node.data_dir), "--json")
    assert ledger.returncode == 0 and isinstance(json.loads(ledger.stdout), dict)

    audit = poc("audit", "--data-dir", str(node.data_dir), "--config", str(config))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.strip().endswith("rounds verified")

    # Decoding stopped by its time limit judges nothing: the round is named as
    # unchecked (exit 2), not as bad.
    hurried = yaml.safe_load(config.read_text())
    hurried["decode"] = {"timeout_s": 1e-6}
    (tmp_path / "hurried.yaml").write_text(yaml.safe_dump(hurried))
    unchecked = poc(
        "audit", "--data-dir", str(node.data_dir), "--config", str(tmp_path / "hurried.yaml")
    )
    assert unchecked.returncode == 2, unchecked.stdout + unchecked.stderr
    assert "could not be checked here, its decoding was stopped 3 times" in unchecked.stdout

    database = sqlite3.connect(node.data_dir / "node.sqlite3")
    round_number, vector = database.execute(
        "SELECT round, vector FROM history ORDER BY seq LIMIT 1"
    ).fetchone()
    database.execute(
        "UPDATE history SET vector = ? WHERE round = ? AND item = 0",
        (bytes(len(vector)), round_number),
    )
    database.commit()
    database.close()
    tampered = poc("audit", "--data-dir", str(node.data_dir), "--config", str(config))
    assert tampered.returncode == 1
    assert tampered.stdout.startswith(f"round {round_number}: stored history differs")


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--round-seconds", "zero"], "invalid int value"),
        (["submit", "--key", "/nonexistent.key", "text:x"], "cannot read key"),
        (["frobnicate"], "invalid choice"),
        (["keygen"], "required"),
        (["submit", "--key", "k", "/no/such/file.png"], "neither"),
    ],
)
def test_bad_usage_is_one_line_and_non_zero(args: list[str], message: str):
    result = poc(*args, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bad_config_names_every_bad_key(tmp_path: Path):
    config = tmp_path / "bad.yaml"
    config.write_text("rounds:\n  round_seconds: 0\nbus:\n  topic_prefix: 'a/#'\nnope: 1\n")
    result = poc("run", "--config", str(config), "--data-dir", str(tmp_path))
    assert result.returncode == 1
    for path in ("rounds.round_seconds", "bus.topic_prefix", "nope"):
        assert path in result.stderr


def test_a_taken_metrics_port_is_named_in_one_line(tmp_path: Path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = poc(
            "run",
            "--data-dir",
            str(tmp_path),
            "--metrics-port",
            str(port),
            "--bus",
            "mqtt://127.0.0.1:1",
        )
    assert result.returncode == 1
    assert f"cannot serve metrics and health on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_subcommand_has_help():
    for command in (
        "keygen",
        "run",
        "submit",
        "ledger",
        "init-weights",
        "audit",
        "balance",
        "gaps",
    ):
        result = poc(command, "--help", timeout=60)
        assert result.returncode == 0 and "usage: poc-node " + command in result.stdout


def test_a_key_outside_the_committee_refuses_to_start(tmp_path: Path):
    keygen = poc("keygen", "--out", str(tmp_path / "stranger.key"))
    assert keygen.returncode == 0
    committee = ROOT / "config" / "committee.example.yaml"
    result = poc(
        "run",
        "--committee",
        str(committee),
        "--key",
        str(tmp_path / "stranger.key"),
        "--data-dir",
        str(tmp_path / "data"),
        "--bus",
        "mqtt://127.0.0.1:9",
    )
    assert result.returncode == 1
    assert "is not a member of the committee" in result.stderr
    assert keygen.stdout.strip() in result.stderr


def test_a_submission_sent_while_the_embedded_broker_starts_is_refused_or_answered(
    tmp_path: Path,
):
    """Found from the outside: the embedded broker took clients seconds before the node
    subscribed to submissions (its encoder workers were starting), acknowledged what
    they published and delivered it to no one. Until the node has subscribed, other
    clients are now refused at connect, and the first one admitted is answered."""
    import asyncio
    import signal
    import time

    import aiomqtt

    from tests.peer import Peer, ResultListener, submission_id

    port = free_port()
    config = write_node_config(tmp_path / "node.yaml", encoders={"workers": 1})
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen(
        run_command(config, tmp_path / "data", f"embedded://127.0.0.1:{port}"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    raw = Peer().submission([("text", "text/plain", b"sent as soon as the port opens")])

    async def as_soon_as_admitted() -> tuple[int, dict]:
        refused = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                async with ResultListener(port) as listener:
                    await listener.publish(raw)
                    return refused, await listener.final(submission_id(raw), timeout=60)
            except aiomqtt.MqttError as error:  # not listening yet, or not admitted yet
                refused += "authoriz" in str(error).lower() or "code:5" in str(error)
                await asyncio.sleep(0.02)
        raise AssertionError("the embedded broker never admitted a client")

    try:
        refused, final = asyncio.run(as_soon_as_admitted())
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(60)
        log.close()
    text = (tmp_path / "node.log").read_text(errors="replace")
    assert final["status"] == "final", text[-3000:]
    assert refused >= 1 and "event=broker_not_open_yet" in text  # the gate fired


def test_a_client_using_the_nodes_public_client_id_cannot_take_its_session(tmp_path: Path):
    """Found in review: MQTT gives a session to whoever connects with its client id, and
    the node's was public (``poc-node-`` and its key). A local client that connected with
    it cut the node off the embedded broker (amqtt drops the old session before it even
    authenticates the new client), and the submissions published meanwhile were never
    answered. On its own broker the node's client ids are now unguessable."""
    import asyncio

    import aiomqtt

    from tests.peer import Peer, ResultListener, submission_id

    port = free_port()
    config = write_node_config(tmp_path / "node.yaml", encoders={"workers": 1})
    node = start_node(tmp_path / "node", f"embedded://127.0.0.1:{port}", config)
    public = re.search(r"event=starting validator=([0-9a-f]{16})", node.log_text())
    assert public is not None, node.log_text()
    raws = [
        Peer().submission([("text", "text/plain", b"sent while an impostor held the session")]),
        Peer().submission([("text", "text/plain", b"sent after the impostors left")]),
    ]

    async def impostors() -> list[str]:
        async with ResultListener(port) as listener:
            for suffix in ("", "-consensus"):
                for clean in (True, False):
                    impostor = aiomqtt.Client(
                        "127.0.0.1",
                        port,
                        identifier=f"poc-node-{public[1]}{suffix}",
                        clean_session=clean,
                        timeout=10,
                    )
                    async with impostor:
                        await impostor.subscribe("#", qos=1)
                        if (suffix, clean) == ("", False):  # while it holds the session
                            await listener.publish(raws[0])
                        await asyncio.sleep(0.5)
            await listener.publish(raws[1])
            return [
                (await listener.final(submission_id(raw), timeout=60))["status"] for raw in raws
            ]

    try:
        statuses = asyncio.run(impostors())
    finally:
        assert node.stop() == 0, node.log_text()
    assert statuses == ["final", "final"], node.log_text()[-3000:]
    assert "event=bus_disconnected" not in node.log_text()


def test_the_embedded_broker_applies_its_rules_under_the_configured_topic_prefix(tmp_path: Path):
    """The broker lets submitters publish submissions and read results under the node's
    own prefix: under another one a submitter could neither send nor hear an answer."""
    port = free_port()
    config = write_node_config(
        tmp_path / "node.yaml", bus={"topic_prefix": "elsewhere/v1"}, encoders={"workers": 1}
    )
    node = start_node(tmp_path / "node", f"embedded://127.0.0.1:{port}", config)
    try:
        assert poc("keygen", "--out", str(tmp_path / "me.key")).returncode == 0
        submitted = poc(
            "submit",
            "--key",
            str(tmp_path / "me.key"),
            "--bus",
            f"mqtt://127.0.0.1:{port}",
            "--topic-prefix",
            "elsewhere/v1",
            "--timeout",
            "60",
            "text:a caption under another prefix",
        )
    finally:
        assert node.stop() == 0, node.log_text()
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert submitted.stdout.splitlines()[-1].startswith("final")
