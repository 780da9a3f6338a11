"""Signed messages with any field values against the stateful intake (a real store).

``test_fuzz_wire`` covers the stateless parser. Past it, a verified submission
meets the clock, the rate limiter, the replay and duplicate checks and the
store, where a value the parser allowed can still break something (a nonce
of 2**63 or more once overflowed SQLite's signed INTEGER and killed the
node). Every message here is signed by its submitter, so it goes as deep as
its fields allow; ``receive`` must answer each with an outcome of the closed
set, keep nothing half-done, and never meet an error of its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.store.sqlite import State
from tests.intake import BareIntake
from tests.peer import REASONS, Peer, submission_id, submission_topic

UINT64 = st.integers(0, 2**64 - 1)
EDGES = st.sampled_from([0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1])
NOW_MS = time.time_ns() // 10**6


@st.composite
def captions(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed text item: most messages should get past the parser."""
    data = draw(st.text(min_size=1, max_size=40)).encode()
    return {
        "modality": "text",
        "mime": "text/plain",
        "data": data,
        "sha256": hashlib.sha256(data).digest(),
    }


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(
        st.one_of(
            st.binary(max_size=64),
            st.text(max_size=40).map(str.encode),
            st.just(b"a red circle on a white background"),
        )
    )
    item: dict[str, Any] = {
        "modality": draw(st.sampled_from(["text", "image", "audio", "video", "smell", "", "TEXT"])),
        "mime": draw(
            st.sampled_from(
                ["text/plain", "image/png", "audio/wav", "video/mp4", "text/plain; charset=utf-8"]
            )
        ),
        "data": data,
        "sha256": draw(st.one_of(st.just(hashlib.sha256(data).digest()), st.binary(max_size=40))),
    }
    if draw(st.booleans()) and draw(st.booleans()):
        del item[draw(st.sampled_from(sorted(item)))]
    return item


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": draw(st.sampled_from([1, 1, 1, 0, 2, 2**64 - 1])),
        "nonce": draw(st.one_of(UINT64, EDGES)),
        "created_ms": draw(
            st.one_of(
                st.just(NOW_MS),
                st.just(NOW_MS),
                st.integers(NOW_MS - 900_000, NOW_MS + 900_000),
                EDGES,
            )
        ),
        "items": draw(
            st.one_of(
                st.lists(captions(), min_size=1, max_size=1),
                st.lists(st.one_of(captions(), items()), max_size=3),
            )
        ),
    }
    if draw(st.integers(0, 9)) == 0:
        body["extra"] = draw(st.one_of(UINT64, st.binary(max_size=8)))
    return body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(bodies(), min_size=1, max_size=4), st.booleans())
def test_any_signed_message_gets_an_outcome_of_the_closed_set(
    drawn: list[dict[str, Any]], same_submitter: bool
) -> None:
    peers = [Peer()] * len(drawn) if same_submitter else [Peer() for _ in drawn]
    raws = [
        peer.sign({**body, "submitter": peer.public})
        for peer, body in zip(peers, drawn, strict=True)
    ]
    with tempfile.TemporaryDirectory() as directory:
        bare = BareIntake(Path(directory))
        try:

            async def scenario() -> None:
                for raw in raws:
                    await bare.intake.receive(raw, submission_topic(raw))

            asyncio.run(scenario())
            assert bare.internal_errors() == 0
            kept = set()
            for raw in raws:
                state = bare.store.store.submission_state(submission_id(raw))
                assert state is not None  # signed by its submitter: always answered or kept
                status, reason = state
                if status is State.REJECTED:
                    assert reason in REASONS
                else:
                    assert (status, reason) == (State.RECEIVED, None)
                    kept.add(submission_id(raw))
            assert bare.intake.queue.qsize() == len(kept)  # each kept one waits to be prepared
        finally:
            bare.close()
