"""SIGKILL at arbitrary points under a steady stream of submissions.

The node is killed again and again while submissions keep arriving (the
kills land during intake, decoding, encoding, voting and commits, since a
round lasts one second and the stream never stops) and restarted each time.
Afterwards every submission reached exactly one final state, no reward was
paid twice, every round paid exactly what it allows, and the store passes a
full audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    POC_NODE,
    NodeProcess,
    run_command,
    start_mosquitto,
    start_node,
    write_node_config,
)
from tests.media import image_bytes
from tests.peer import Peer, ResultListener, submission_id

pytestmark = pytest.mark.integration

EMISSION = 1_000_000


def stream(
    port: int,
    peers: list[Peer],
    count: int,
    sent: list[bytes],
    done: threading.Event,
    finals: dict[bytes, dict[str, object]],
) -> None:
    """Publish ``count`` submissions, set ``done``, then collect every one's last Result."""

    async def publish() -> None:
        async with ResultListener(port) as listener:
            for index in range(count):
                peer = peers[index % len(peers)]
                items = [("text", "text/plain", f"observation number {index}".encode())]
                if index % 3 == 0:
                    items.append(("image", "image/png", image_bytes("RGB", size=(20 + index, 20))))
                raw = peer.submission(items)
                sent.append(raw)
                await listener.publish(raw)
                await asyncio.sleep(0.15)
            done.set()
            deadline = time.monotonic() + 180
            wanted = {submission_id(raw) for raw in sent}
            while time.monotonic() < deadline:
                for result in listener.results:
                    if result["status"] in ("final", "rejected"):
                        finals[result["submission_id"]] = result
                if wanted <= set(finals):
                    return
                await asyncio.sleep(0.5)

    asyncio.run(publish())


def test_kill_9_anywhere_loses_nothing_and_pays_nothing_twice(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        rounds={"round_seconds": 1},
        scoring={"k": 2, "qualify_ratio": 10.0, "emission": EMISSION, "top_k": 3},
        intake={"rate_limit": {"per_minute": 6000, "burst": 1000}},
    )
    bus = f"mqtt://127.0.0.1:{broker.port}"
    directory = tmp_path / "node"
    node: NodeProcess = start_node(directory, bus, config)
    sent: list[bytes] = []
    done = threading.Event()
    finals: dict[bytes, dict[str, object]] = {}
    peers = [Peer() for _ in range(4)]
    publisher = threading.Thread(target=stream, args=(broker.port, peers, 60, sent, done, finals))
    publisher.start()
    rng = random.Random(7)
    kills = 0
    try:
        while not done.is_set() or kills < 6:
            time.sleep(rng.uniform(0.4, 2.0))
            node.stop(signal.SIGKILL)
            kills += 1
            node = start_node(directory, bus, config)

        database = directory / "data" / "node.sqlite3"
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(database) as db:
                pending = db.execute(
                    "SELECT COUNT(*) FROM submissions WHERE state IN ('received', 'accepted')"
                ).fetchone()[0]
                known = db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
            if pending == 0 and known >= len(sent):
                break
            assert time.monotonic() < deadline, (pending, known, len(sent))
            time.sleep(0.5)
        publisher.join()
    finally:
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()

    with sqlite3.connect(database) as db:
        states = dict(db.execute("SELECT id, state FROM submissions").fetchall())
        ledger = db.execute("SELECT round, submission_id, amount FROM ledger").fetchall()
        history_per_round = dict(
            db.execute("SELECT round, COUNT(*) FROM history GROUP BY round").fetchall()
        )
    assert kills >= 6
    for raw in sent:
        assert states.get(submission_id(raw)) in ("final", "rejected"), "a submission was lost"
    paid_ids = [entry[1] for entry in ledger]
    assert len(paid_ids) == len(set(paid_ids)), "a submission was paid twice"
    per_round: dict[int, int] = {}
    for round_number, _, amount in ledger:
        per_round[round_number] = per_round.get(round_number, 0) + amount
    assert per_round, "no round paid anything: the test would prove nothing"
    assert all(total == EMISSION for total in per_round.values()), per_round
    assert sum(history_per_round.values()) > 0

    balances = subprocess.run(
        [str(POC_NODE), "ledger", "--data-dir", str(directory / "data"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert sum(json.loads(balances.stdout).values()) == sum(a for _, _, a in ledger)
    # what submitters were told matches what was paid, once, and it is not nothing
    assert {submission_id(raw) for raw in sent} <= set(finals), "a Result never came"
    told = sum(int(r["reward"]) for r in finals.values())  # type: ignore[call-overload]
    assert told == sum(a for _, _, a in ledger) > 0
    assert sum(1 for r in finals.values() if r["reward"]) == len(paid_ids)
    audit = subprocess.run(
        [str(POC_NODE), "audit", "--data-dir", str(directory / "data"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            tasks = Path(f"/proc/{current}/task").iterdir()
            children = {int(c) for t in tasks for c in (t / "children").read_text().split()}
        except OSError:
            continue
        pending += list(children - found)
        found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_node_leaves_no_decoder_processes_behind(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    node = start_node(
        tmp_path / "node",
        f"mqtt://127.0.0.1:{broker.port}",
        write_node_config(tmp_path / "node.yaml"),
    )
    try:
        raw = Peer().submission([("image", "image/png", image_bytes("RGB", size=(30, 31)))])

        async def decode_one() -> None:
            async with ResultListener(broker.port) as listener:
                await listener.publish(raw)
                await listener.wait_for(submission_id(raw), {"accepted"})

        asyncio.run(decode_one())  # the decoder processes now exist
        helpers = _descendants(node.process.pid)
        assert len(helpers) >= 2, "the decoder sandbox should run in processes of its own"
        node.stop(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in helpers):
            assert time.monotonic() < deadline, [p for p in helpers if _alive(p)]
            time.sleep(0.2)
    finally:
        broker.stop()


def _restart_and_finalize_once(directory: Path, port: int, config: Path, raw: bytes) -> NodeProcess:
    """Start the node again on its store; ``raw`` reaches ``final``, and is final once
    in the store. Returns the stopped node."""

    async def restart_and_finalize() -> tuple[NodeProcess, dict]:
        # Listen before the node is back: it may finalize the waiting submission
        # before a listener that subscribed after readiness could hear it.
        async with ResultListener(port) as listener:
            bus = f"mqtt://127.0.0.1:{port}"
            restarted = await asyncio.to_thread(start_node, directory, bus, config)
            return restarted, await listener.final(submission_id(raw), timeout=60)

    node, outcome = asyncio.run(restart_and_finalize())
    assert outcome["status"] == "final"
    assert node.stop() == 0, node.log_text()[-3000:]
    db = sqlite3.connect(node.data_dir / "node.sqlite3")
    finals = db.execute("SELECT COUNT(*) FROM submissions WHERE state = 'final'").fetchone()
    db.close()
    assert finals[0] == 1
    return node


@dataclass
class _Refusing:
    """A node on a real Mosquitto whose SQLite file holds a trigger that fails some
    write the way a full disk does (an OperationalError)."""

    broker: Any
    config: Path
    node: NodeProcess
    database: Path


def _sql(database: Path, *statements: str) -> None:
    db = sqlite3.connect(database, timeout=30)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


@contextlib.contextmanager
def _disk_refusing(tmp_path: Path, trigger: str) -> Iterator[_Refusing]:
    broker = start_mosquitto(tmp_path)
    config = write_node_config(tmp_path / "node.yaml", rounds={"round_seconds": 1})
    node = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    setup = _Refusing(broker, config, node, node.data_dir / "node.sqlite3")
    try:
        _sql(setup.database, trigger)
        yield setup
    finally:
        setup.node.stop(signal.SIGKILL)
        broker.stop()


def _publish_until_it_exits_70(setup: _Refusing, raw: bytes) -> list[dict]:
    """Publish ``raw``; the node must exit 70. Returns the Results heard about it."""

    async def publish() -> list[dict]:
        async with ResultListener(setup.broker.port) as listener:
            await listener.publish(raw)
            await asyncio.to_thread(setup.node.process.wait, 60)
            await asyncio.sleep(0.5)
            return listener.about(submission_id(raw))

    answered = asyncio.run(publish())
    assert setup.node.process.returncode == 70, setup.node.log_text()[-3000:]
    return answered


def test_an_outcome_the_store_cannot_keep_stops_the_node_and_the_submission_is_not_lost(
    tmp_path: Path,
):
    """Found from the outside: the disk refused the write that marks a prepared
    submission accepted; the preparer's guard took it for a defect of its own and
    rejected the valid submission `undecodable`, for good. The node must stop (70)
    with the submission still `received`, and prepare and finalize it after the
    restart."""
    raw = Peer().submission([("text", "text/plain", b"prepared while the disk refuses")])
    trigger = (
        "CREATE TRIGGER accept_refused BEFORE UPDATE OF prepared ON submissions "
        "WHEN NEW.state = 'accepted' BEGIN SELECT disk_refused_the_write(); END"
    )
    with _disk_refusing(tmp_path, trigger) as setup:
        assert _publish_until_it_exits_70(setup, raw) == []  # neither accepted nor rejected
        assert "event=store_failed stage=prepare" in setup.node.log_text()
        _sql(setup.database, "DROP TRIGGER accept_refused")
        db = sqlite3.connect(setup.database)
        (state,) = db.execute("SELECT state FROM submissions").fetchone()
        db.close()
        assert state == "received"
        setup.node = _restart_and_finalize_once(
            tmp_path / "node", setup.broker.port, setup.config, raw
        )


def test_a_store_failure_in_any_task_is_named_in_the_log_before_the_node_exits_70(
    tmp_path: Path,
):
    """Found from the outside: when the disk refused the outbox's deletion of what the
    broker had acknowledged, the node exited 70 with nothing in its log."""
    raw = Peer().submission([("text", "text/plain", b"published while the disk refuses")])
    trigger = (
        "CREATE TRIGGER outbox_refused BEFORE DELETE ON outbox "
        "BEGIN SELECT disk_refused_the_write(); END"
    )
    with _disk_refusing(tmp_path, trigger) as setup:
        _publish_until_it_exits_70(setup, raw)
        assert "event=store_failed error=OperationalError" in setup.node.log_text()


def test_a_commit_the_store_refuses_stops_the_node_and_a_restart_recovers(tmp_path: Path):
    """Crash-only: a store that cannot commit a certified round never lets the machine run on.

    A trigger in the node's real SQLite file makes every round commit fail.
    The node must exit (status 70) rather than go on with a machine that has
    moved past a round its store does not hold; restarted on the repaired
    store, it finalizes the same submission once.
    """
    broker = start_mosquitto(tmp_path)
    bus = f"mqtt://127.0.0.1:{broker.port}"
    config = write_node_config(tmp_path / "node.yaml", rounds={"round_seconds": 1})
    node = start_node(tmp_path / "node", bus, config)
    database = node.data_dir / "node.sqlite3"
    raw = Peer().submission([("text", "text/plain", b"committed after a store failure")])
    try:
        db = sqlite3.connect(database, timeout=30)
        db.execute("BEGIN IMMEDIATE")
        # Empty rounds may already have committed since the node came up: count them
        # in the same write transaction that installs the trigger.
        rounds_before = db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
        db.execute(
            "CREATE TRIGGER no_commit BEFORE INSERT ON rounds "
            "BEGIN SELECT RAISE(ABORT, 'disk refused the write'); END"
        )
        db.commit()
        db.close()

        async def publish() -> None:
            async with ResultListener(broker.port) as listener:
                await listener.publish(raw)

        asyncio.run(publish())  # the node may already be gone: the broker keeps it
        assert node.process.wait(60) == 70, node.log_text()[-3000:]
        assert "event=commit_failed" in node.log_text()
        db = sqlite3.connect(database, timeout=30)
        db.execute("DROP TRIGGER no_commit")
        db.commit()
        assert db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == rounds_before
        assert (
            db.execute("SELECT COUNT(*) FROM submissions WHERE state = 'final'").fetchone()[0] == 0
        )
        db.close()

        node = _restart_and_finalize_once(tmp_path / "node", broker.port, config, raw)
    finally:
        node.stop(signal.SIGKILL)
        broker.stop()


def test_a_submission_the_store_cannot_keep_stops_the_node_unacknowledged_and_is_not_lost(
    tmp_path: Path,
):
    """The disk refuses the write of an arriving submission (a trigger that fails like
    a full disk: an OperationalError). The node must not acknowledge a message it
    could not keep, nor answer it: it exits 70 (as for a refused commit, no
    traceback), the broker keeps the message, and once the store is repaired the
    restarted node receives it again and finalizes it once."""
    raw = Peer().submission([("text", "text/plain", b"arrives while the disk refuses")])
    trigger = (
        "CREATE TRIGGER disk_full BEFORE INSERT ON submissions "
        "BEGIN SELECT disk_refused_the_write(); END"
    )
    with _disk_refusing(tmp_path, trigger) as setup:
        assert _publish_until_it_exits_70(setup, raw) == []
        assert "event=store_failed stage=intake" in setup.node.log_text()
        assert "Traceback" not in setup.node.log_text()
        _sql(setup.database, "DROP TRIGGER disk_full")
        db = sqlite3.connect(setup.database)
        assert db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0] == 0
        db.close()
        setup.node = _restart_and_finalize_once(
            tmp_path / "node", setup.broker.port, setup.config, raw
        )


def test_a_start_on_a_store_that_cannot_write_exits_70_in_one_line(tmp_path: Path):
    """Found from the outside: the first write a full disk refused ended the node with
    status 70 and `event=store_failed`, as documented, but every restart while the
    disk stayed full died while starting, with a traceback and status 1 (the unit's
    restart policy and the troubleshooting table key on 70)."""
    from node.store.sqlite import Store

    data = tmp_path / "data"
    data.mkdir()
    Store(data / "node.sqlite3").close()
    _sql(
        data / "node.sqlite3",
        "CREATE TRIGGER meta_refused BEFORE INSERT ON meta "
        "BEGIN SELECT disk_refused_the_write(); END",
    )
    started = subprocess.run(
        run_command(write_node_config(tmp_path / "node.yaml"), data, "mqtt://127.0.0.1:9"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert started.returncode == 70, started.stderr[-3000:]
    assert "event=store_failed error=OperationalError" in started.stderr
    assert "Traceback" not in started.stderr
