"""One message that meets an error of the node's own is refused, and the node goes on.

The intake runs on a real store (SQLite on disk) with real Ed25519; the error
is injected where a defect would surface (the store's admission, the parser).
A node that let it escape died, and died again on every restart, since the
broker delivers an unacknowledged message again.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from node.intake import admission
from node.store.sqlite import State
from tests.intake import BareIntake
from tests.peer import Peer, submission_id, submission_topic


def _text(peer: Peer, words: bytes) -> bytes:
    return peer.submission([("text", "text/plain", words)])


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BareIntake]:
    bare = BareIntake(tmp_path)
    yield bare
    bare.close()


def test_an_error_in_admission_refuses_that_message_only(node, monkeypatch):
    admit = node.store.store.admit
    calls = []

    def failing_once(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return admit(*args)

    monkeypatch.setattr(node.store.store, "admit", failing_once)
    peer = Peer()
    first, second = _text(peer, b"meets a defect"), _text(peer, b"comes next")

    async def scenario() -> None:
        await node.intake.receive(first, submission_topic(first))  # does not raise
        await node.intake.receive(second, submission_topic(second))

    asyncio.run(scenario())
    store = node.store.store
    assert store.submission_state(submission_id(first)) == (State.REJECTED, "malformed")
    assert store.submission_state(submission_id(second)) == (State.RECEIVED, None)
    assert node.intake.queue.qsize() == 1  # the next one goes on to preparation
    answer = msgpack.unpackb(store.outbox(0, 10)[0].payload)
    assert (answer["submission_id"], answer["status"], answer["reason"]) == (
        submission_id(first),
        "rejected",
        "malformed",
    )
    assert node.internal_errors() == 1
    assert node.metrics.rejections.labels(reason="malformed")._value.get() == 1


def test_a_failing_store_stops_the_intake_instead_of_losing_messages(node, monkeypatch):
    def disk_failed(*args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(node.store.store, "admit", disk_failed)
    raw = _text(Peer(), b"cannot be kept")
    with pytest.raises(sqlite3.OperationalError):
        asyncio.run(node.intake.receive(raw, submission_topic(raw)))
    assert node.store.store.submission_state(submission_id(raw)) is None
    assert node.internal_errors() == 0


def test_an_error_in_the_parser_is_counted_and_nothing_is_answered(node, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("a parser defect")

    monkeypatch.setattr(admission, "parse_submission", broken)
    raw = _text(Peer(), b"unreadable to a broken parser")
    asyncio.run(node.intake.receive(raw, submission_topic(raw)))
    assert node.internal_errors() == 1
    assert node.store.store.submission_state(submission_id(raw)) is None
    assert node.store.store.outbox(0, 10) == []


def test_an_error_on_a_copy_of_a_kept_submission_leaves_it_as_it_was(node, monkeypatch):
    """A redelivery of a submission waiting for its round meets a defect: the
    submission stays kept, its data claims with it (rejecting it would drop
    an accepted submission)."""
    raw = _text(Peer(), b"kept, then delivered again")
    asyncio.run(node.intake.receive(raw, submission_topic(raw)))
    assert node.store.store.submission_state(submission_id(raw)) == (State.RECEIVED, None)

    def broken(*args: Any) -> Any:
        raise KeyError("a defect on the redelivery path")

    monkeypatch.setattr(node.store.store, "keep_raw", broken)
    asyncio.run(node.intake.receive(raw, submission_topic(raw)))
    assert node.internal_errors() == 1
    assert node.store.store.submission_state(submission_id(raw)) == (State.RECEIVED, None)
    assert node.store.store.outbox(0, 10) == []


class _FailingEncoders:
    """A preparer whose encoders fail ``failures`` times under a submission, then answer."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def prepare(self, submission: Any, epoch: int) -> Any:
        from encoders.modality import Modality
        from node.errors import EncoderUnavailable
        from node.rounds.records import Prepared, PreparedItem

        self.calls += 1
        if self.calls <= self.failures:
            raise EncoderUnavailable("encoder workers died twice on this batch")
        item = submission.items[0]
        return Prepared(
            0, (PreparedItem(Modality.TEXT, b"\0" * 16, False, 0, item.sha256),), None, False
        )


@pytest.mark.parametrize(("failures", "outcome"), [(2, (State.ACCEPTED, None)), (3, None)])
def test_a_submission_the_encoders_fail_under_is_prepared_again_not_refused(
    node, monkeypatch, caplog, failures, outcome
):
    """Found from the outside: killing the encoder worker and then its replacement
    while they held a batch (as repeated out-of-memory kills do) refused its valid
    submissions `undecodable` for good. They are prepared again; only one under
    which the encoders failed every time (PREPARE_ATTEMPTS) is refused."""
    monkeypatch.setattr(admission, "PREPARE_PAUSE_S", 0.0)
    caplog.set_level("INFO", logger="poc.intake")
    encoders = _FailingEncoders(failures)
    node.intake.preparer = encoders  # type: ignore[assignment]
    raw = _text(Peer(), b"encoded while the workers die")

    async def scenario() -> None:
        await node.intake.receive(raw, submission_topic(raw))
        preparing = asyncio.create_task(node.intake.run_preparers(1))
        async with asyncio.timeout(10):
            await node.intake.queue.join()
        preparing.cancel()

    asyncio.run(scenario())
    state = node.store.store.submission_state(submission_id(raw))
    assert encoders.calls == min(failures + 1, admission.PREPARE_ATTEMPTS)
    assert node.metrics.prepare_retries._value.get() == min(
        failures, admission.PREPARE_ATTEMPTS - 1
    )
    if outcome is not None:
        assert state == outcome
    else:
        assert state == (State.REJECTED, "undecodable")
        answer = msgpack.unpackb(node.store.store.outbox(0, 10)[-1].payload)
        assert answer["status"] == "rejected" and answer["reason"] == "undecodable"
        assert "the encoders failed 3 times on it" in caplog.text
    assert node.internal_errors() == 0


def test_an_idle_preparer_keeps_nothing_of_the_submissions_it_prepared(node):
    """Found from the outside: the node's memory grew by 11-17 MB with every large
    clip or speech accepted, for good. Each idle preparer waited in ``queue.get()``
    with the locals of its last submission alive: its raw bytes and a copy of every
    item, in each of up to 56 preparers, outside the intake's byte budget."""
    import gc

    from node.intake.wire import Submission

    node.intake.preparer = _FailingEncoders(0)  # type: ignore[assignment]
    peers = [Peer() for _ in range(6)]
    raws = [_text(peer, b"kept by nobody once prepared %d" % i) for i, peer in enumerate(peers)]
    sent = {submission_id(raw) for raw in raws}

    async def scenario() -> list[Submission]:
        preparing = asyncio.create_task(node.intake.run_preparers(4))
        for raw in raws:
            await node.intake.receive(raw, submission_topic(raw))
        async with asyncio.timeout(10):
            await node.intake.queue.join()
        await asyncio.sleep(0)
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) is Submission and o.id in sent]
        preparing.cancel()
        return alive

    alive = asyncio.run(scenario())
    assert all(node.store.store.submission_state(i)[0] == State.ACCEPTED for i in sent), (
        "the submissions were prepared"
    )
    assert alive == [], f"{len(alive)} prepared submissions are still referenced"
