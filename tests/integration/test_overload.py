"""A burst far above what the node can encode: bounded queues push back on the bus.

The node's own queues never exceed their bounds (the backlog waits, unacknowledged,
in the broker), rounds keep finalizing during the burst, and every submission is
answered once it is over.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from node.intake.wire import parse_submission
from node.store.sqlite import Store
from tests.conftest import start_mosquitto, start_node, write_node_config
from tests.media import noise_png
from tests.peer import Peer, ResultListener, submission_id

pytestmark = pytest.mark.integration

QUEUE = 3


def test_a_burst_is_absorbed_with_bounded_queues(tmp_path: Path):
    broker = start_mosquitto(tmp_path)
    node = start_node(
        tmp_path / "node",
        f"mqtt://127.0.0.1:{broker.port}",
        write_node_config(
            tmp_path / "node.yaml",
            rounds={"round_seconds": 1},
            intake={"queue_size": QUEUE},
            encoders={"queue_size": QUEUE},
            # Small enough that the burst overflows it: the submissions session
            # stops reading, and the backlog waits in the broker.
            bus={"receive_window": 16},
        ),
    )
    raws = [Peer().submission([("text", "text/plain", f"burst {i}".encode())]) for i in range(300)]
    depths: list[float] = []
    rounds: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            depths.append(node.metric("poc_queue_depth", 'queue="prepare"'))
            rounds.append(node.metric("poc_finalized_round"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()

    span: list[float] = []

    async def scenario() -> list[dict]:
        async with ResultListener(broker.port) as listener:
            span.append(time.monotonic())
            for raw in raws:
                await listener.publish(raw)
            finals = [await listener.final(submission_id(raw), 180) for raw in raws]
            span.append(time.monotonic())
            return finals

    session = 'session="submissions"'
    try:
        finals = asyncio.run(scenario())
        pauses = node.metric("poc_bus_read_pauses_total", session)
        deferred = node.metric("poc_bus_deferred_total", f'qos="1",{session}')
    finally:
        stop.set()
        watcher.join()
        assert node.stop() == 0, node.log_text()[-3000:]
        broker.stop()
    assert all(result["status"] == "final" for result in finals)
    assert max(depths) <= QUEUE
    # The receive window fired, by pausing alone: the submissions session
    # publishes nothing (Results leave on the node's second session), so it
    # never had to read on past the window.
    assert pauses > 0
    assert deferred == 0
    # One-second rounds: however long the burst took here, rounds kept closing meanwhile.
    assert rounds[-1] - rounds[0] >= max(int(span[1] - span[0]) - 1, 1), (rounds, span)


def test_a_restart_with_more_stored_work_than_the_queue_holds(tmp_path: Path):
    """A kill during a burst leaves up to queue size + preparers stored-but-unprepared
    submissions; the restarted node must take them all, its queue holding one."""
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml", rounds={"round_seconds": 1}, intake={"queue_size": 1}
    )
    bus = f"mqtt://127.0.0.1:{broker.port}"
    database = tmp_path / "node" / "data" / "node.sqlite3"
    nodes = [start_node(tmp_path / "node", bus, config)]
    try:
        nodes[0].stop(signal.SIGKILL)
        store = Store(database)
        now = time.time_ns() // 10**6
        for index in range(12):
            submission = parse_submission(
                Peer().submission([("text", "text/plain", f"stored {index}".encode())])
            )
            store.admit(
                submission.id,
                submission.submitter,
                submission.nonce,
                submission.created_ms,
                [i.sha256 for i in submission.items],
                submission.raw,
                now,
                0,
                600_000,
            )
        store.close()
        nodes.append(start_node(tmp_path / "node", bus, config))
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(database) as db:
                states = [row[0] for row in db.execute("SELECT state FROM submissions")]
            if len(states) == 12 and set(states) == {"final"}:
                break
            assert time.monotonic() < deadline, sorted(set(states))
            time.sleep(0.5)
    finally:
        for each in nodes:
            each.stop()
        broker.stop()


def test_large_submissions_are_held_back_by_bytes_never_refused(tmp_path: Path):
    """intake.queue_mb bounds the bytes a flood of large pictures holds in the node."""
    broker = start_mosquitto(tmp_path)
    node = start_node(
        tmp_path / "node",
        f"mqtt://127.0.0.1:{broker.port}",
        write_node_config(
            tmp_path / "node.yaml", rounds={"round_seconds": 1}, intake={"queue_mb": 1}
        ),
    )
    pictures = [noise_png(320, seed) for seed in range(10)]  # about 300 KiB each
    peer = Peer()
    raws = [
        peer.submission(
            [("text", "text/plain", f"picture {i}".encode()), ("image", "image/png", p)]
        )
        for i, p in enumerate(pictures)
    ]
    held: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            held.append(node.metric("poc_intake_queued_bytes"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def scenario() -> list[dict]:
        async with ResultListener(broker.port) as listener:
            for raw in raws:
                await listener.publish(raw)
            return [await listener.final(submission_id(raw), 120) for raw in raws]

    try:
        results = asyncio.run(scenario())
    finally:
        stop.set()
        watcher.join()
        node.stop()
        broker.stop()
    assert [r["status"] for r in results] == ["final"] * len(raws)  # delayed, never refused
    assert max(held) <= 1024 * 1024  # ten pictures of 300 KiB, never more than 1 MiB held
    assert max(held) >= min(len(raw) for raw in raws)  # the budget was in use
