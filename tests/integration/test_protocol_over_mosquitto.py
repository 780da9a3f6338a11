"""A peer that knows only DESIGN.md §3 drives a node process over a real Mosquitto.

Every good submission reaches ``accepted`` then ``final``; every bad one gets
its documented reason code; bytes naming no submitter are only counted; and
the node keeps running through all of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from tests.conftest import Broker, NodeProcess, start_node, write_node_config
from tests.media import image_bytes, mp4_bytes, png_header_only, wav_bytes
from tests.peer import PREFIX, Peer, ResultListener, pack, submission_id

pytestmark = pytest.mark.integration

TEXT = ("text", "text/plain", b"a red circle on a white background")


@pytest.fixture(scope="module")
def node(mosquitto: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    directory = tmp_path_factory.mktemp("node")
    config = write_node_config(
        directory / "node.yaml",
        intake={"rate_limit": {"per_minute": 60, "burst": 5}},
        limits={"message_bytes": 1_000_000, "image_pixels": 1_000_000},
    )
    process = start_node(directory, f"mqtt://127.0.0.1:{mosquitto.port}", config)
    yield process
    assert process.stop() == 0, process.log_text()


def run(coro):
    return asyncio.run(coro)


async def submit_and_wait(port: int, raws: list[bytes], timeout: float = 60.0) -> list[dict]:
    async with ResultListener(port) as listener:
        for raw in raws:
            await listener.publish(raw)
        return [await listener.final(submission_id(raw), timeout) for raw in raws]


def test_pairs_of_every_kind_reach_accepted_then_final(node: NodeProcess, mosquitto: Broker):
    peer = Peer()
    raws = [
        peer.submission([TEXT, ("image", "image/png", image_bytes("RGB"))]),
        peer.submission(
            [("text", "text/plain", b"a spoken word"), ("audio", "audio/wav", wav_bytes("PCM_16"))]
        ),
        peer.submission(
            [
                ("image", "image/jpeg", image_bytes("RGB", "JPEG")),
                ("video", "video/mp4", mp4_bytes()),
            ]
        ),
        peer.submission([("text", "text/plain", b"just one item")]),
    ]

    async def scenario() -> list[list[dict]]:
        async with ResultListener(mosquitto.port) as listener:
            for raw in raws:
                await listener.publish(raw)
            for raw in raws:
                await listener.final(submission_id(raw))
            return [listener.about(submission_id(raw)) for raw in raws]

    histories = run(scenario())
    for raw, results in zip(raws, histories, strict=True):
        statuses = [r["status"] for r in results]
        assert statuses[0] == "accepted" and statuses[-1] == "final", statuses
        final = results[-1]
        assert final["reason"] is None and isinstance(final["round"], int)
        assert final["_topic_submitter"] == peer.public.hex()
        count = len(msgpack.unpackb(raw, raw=False)["items"])
        assert len(final["embeddings"]) == count and len(final["scores_ppm"]) == count
        for embedding in final["embeddings"]:
            vector = np.frombuffer(embedding["vector"], dtype="<f2").astype(np.float64)
            assert vector.shape == (256,)
            assert abs(np.linalg.norm(vector) - 1.0) < 1e-2
            assert embedding["fused"] is (count == 2)
        assert (final["pair_distance_ppm"] is None) is (count == 1)
        assert final["reward"] >= 0


def _bad_inputs(peer: Peer) -> list[tuple[str, bytes]]:
    now = time.time_ns() // 10**6
    good_png = image_bytes("RGB", size=(33, 21))
    cases: list[tuple[str, bytes]] = []
    body = peer.body([TEXT])
    signed = msgpack.unpackb(peer.sign(body), raw=False)
    cases.append(
        ("non_canonical", msgpack.packb(dict(reversed(list(signed.items()))), use_bin_type=True))
    )
    broken = peer.body([TEXT])
    broken["v"] = 7
    cases.append(("malformed", peer.sign(broken)))
    cases.append(("bad_signature", Peer().sign(peer.body([("text", "text/plain", b"forged")]))))
    lying = peer.body([("text", "text/plain", b"commitment")])
    lying["items"][0]["sha256"] = hashlib.sha256(b"other").digest()
    cases.append(("bad_commitment", peer.sign(lying)))
    cases.append(
        (
            "stale",
            peer.submission([("text", "text/plain", b"old news")], created_ms=now - 3_600_000),
        )
    )
    cases.append(("too_large", peer.submission([("video", "video/mp4", b"\0" * 1_100_000)])))
    cases.append(
        ("too_large", peer.submission([("image", "image/png", png_header_only(100_000, 100_000))]))
    )
    cases.append(("unsupported_modality", peer.submission([("smell", "text/plain", b"x")])))
    cases.append(
        (
            "same_modality",
            peer.submission([("text", "text/plain", b"one"), ("text", "text/plain", b"two")]),
        )
    )
    cases.append(("undecodable", peer.submission([("image", "image/png", b"\x89PNG garbage")])))
    cases.append(("undecodable", peer.submission([("text", "text/plain", b"\xff\xfe\xfd")])))
    cases.append(
        (
            "undecodable",
            peer.submission([("text", "text/plain", b"caption"), ("video", "video/mp4", good_png)]),
        )
    )
    return cases


def test_every_bad_input_gets_its_reason_code(node: NodeProcess, mosquitto: Broker):
    cases = _bad_inputs(Peer())
    results = run(submit_and_wait(mosquitto.port, [raw for _, raw in cases]))
    got = [
        (expected, result["status"], result["reason"])
        for (expected, _), result in zip(cases, results, strict=True)
    ]
    assert got == [(expected, "rejected", expected) for expected, _ in cases]
    assert node.metric("poc_rejections_total", 'reason="undecodable"') >= 3


def test_replay_and_duplicate(node: NodeProcess, mosquitto: Broker):
    peer = Peer()
    data = b"the data of an original submission"
    first = peer.submission([("text", "text/plain", data)], nonce=10)
    replay = peer.submission([("text", "text/plain", b"new data, old nonce")], nonce=10)
    duplicate = Peer().submission([("text", "text/plain", data)])

    async def scenario() -> tuple[dict, dict, dict]:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(first)
            accepted = await listener.wait_for(submission_id(first), {"accepted"})
            await listener.publish(replay)
            await listener.publish(duplicate)
            return (
                accepted,
                await listener.final(submission_id(replay)),
                await listener.final(submission_id(duplicate)),
            )

    accepted, replayed, duplicated = run(scenario())
    assert accepted["status"] == "accepted"
    assert (replayed["status"], replayed["reason"]) == ("rejected", "replay")
    assert (duplicated["status"], duplicated["reason"]) == ("rejected", "duplicate")


def test_nonces_up_to_the_top_of_uint64_are_accepted_and_their_replays_refused(
    node: NodeProcess, mosquitto: Broker
):
    """A nonce is any uint64 ("a counter or random"): one of 2**63 or more once killed
    the node (SQLite's signed INTEGER), and the broker's redelivery killed it again on
    every restart. Half of all random nonces are that large."""
    peer = Peer()
    raws = [
        peer.submission([("text", "text/plain", f"nonce number {n}".encode())], nonce=n)
        for n in (2**63, 2**64 - 1, 2**63 - 1)
    ]
    replay = peer.submission([("text", "text/plain", b"the top nonce again")], nonce=2**64 - 1)

    async def scenario() -> list[dict]:
        async with ResultListener(mosquitto.port) as listener:
            for raw in raws:
                await listener.publish(raw)
            accepted = [await listener.final(submission_id(raw)) for raw in raws]
            await listener.publish(replay)
            return [*accepted, await listener.final(submission_id(replay))]

    *finals, replayed = run(scenario())
    assert [r["status"] for r in finals] == ["final"] * 3
    assert (replayed["status"], replayed["reason"]) == ("rejected", "replay")
    assert node.process.poll() is None


def test_a_submission_on_another_keys_topic_is_wrong_topic(node: NodeProcess, mosquitto: Broker):
    """Identity is the topic's key: a message signed by A on B's topic is refused, to A."""
    alice, bob = Peer(), Peer()
    raw = alice.submission([("text", "text/plain", b"alice, dressed up as bob")])
    fine = bob.submission([("text", "text/plain", b"bob, on his own topic")])

    async def scenario() -> tuple[dict, dict, list]:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(raw, f"{PREFIX}/submissions/{bob.public.hex()}")
            await listener.publish(fine)
            refused = await listener.final(submission_id(raw))
            accepted = await listener.final(submission_id(fine))
            return refused, accepted, listener.results

    refused, accepted, _ = run(scenario())
    assert (refused["status"], refused["reason"]) == ("rejected", "wrong_topic")
    assert refused["_topic_submitter"] == alice.public.hex()  # only its signer hears of it
    assert accepted["status"] == "final"
    assert node.metric("poc_rejections_total", 'reason="wrong_topic"') >= 1


def test_unsigned_bytes_naming_another_key_are_never_answered_on_its_topic(
    node: NodeProcess, mosquitto: Broker
):
    """Found from the outside: a forgery naming a victim, published on the forger's
    own topic (the only one its broker account may write), was answered
    bad_signature on the victim's results topic, signed by this validator: anyone
    could fill any key's topic. Bytes refused before their signature is checked
    are answered only on the topic of the key they name."""
    victim, forger = Peer(), Peer()
    forged = forger.sign(victim.body([("text", "text/plain", b"not from the victim")]))
    broken = victim.body([TEXT])
    broken["v"] = 7
    unversioned = forger.sign(broken)
    huge = victim.body([("text", "text/plain", b"x" * 70_000)])
    oversized = forger.sign(huge)
    own_topic = f"{PREFIX}/submissions/{forger.public.hex()}"
    before = node.metric("poc_unattributed_messages_total")

    async def scenario() -> tuple[list[dict], dict]:
        async with ResultListener(mosquitto.port) as listener:
            for raw in (forged, unversioned, oversized):
                await listener.publish(raw, own_topic)
            deadline = time.monotonic() + 20
            while node.metric("poc_unattributed_messages_total") < before + 3:
                assert time.monotonic() < deadline, "the forgeries were not all seen"
                await asyncio.sleep(0.1)
            # On the victim's own topic (no ACL here) the same bytes are answered.
            await listener.publish(forged)
            answered = await listener.final(submission_id(forged))
            return [
                r for r in listener.results if r["submission_id"] != answered["submission_id"]
            ], answered

    elsewhere, answered = run(scenario())
    assert elsewhere == []
    assert (answered["reason"], answered["_topic_submitter"]) == (
        "bad_signature",
        victim.public.hex(),
    )
    assert node.metric("poc_unattributed_messages_total") == before + 3


def test_the_same_bytes_again_are_not_answered_twice(node: NodeProcess, mosquitto: Broker):
    """Copies of a known submission are recognised by their id before anything else:
    twenty of them, four times the node's rate-limit burst, are neither answered nor
    verified and admitted again (which would refuse them as rate_limited)."""
    raw = Peer().submission([("text", "text/plain", b"delivered twice by the bus")])
    copies = 20

    async def scenario() -> list[dict]:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(raw)
            await listener.final(submission_id(raw))
            before = node.metric("poc_redeliveries_total")
            for _ in range(copies):
                await listener.publish(raw)
            deadline = time.monotonic() + 10
            while node.metric("poc_redeliveries_total") < before + copies:
                assert time.monotonic() < deadline, "the copies were not all seen"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            return listener.about(submission_id(raw))

    statuses = [r["status"] for r in run(scenario())]
    assert statuses == ["accepted", "final"]


def test_the_mqtt_clients_own_cpu_time_is_the_bus_stage(node: NodeProcess, mosquitto: Broker):
    """Reading the submission, acknowledging it and publishing its Results is counted
    where the MQTT client runs (bench_e2e.py tells it from the rest of the loop)."""
    raw = Peer().submission([("text", "text/plain", b"counted on the bus")])
    bus = 'stage="bus"'

    async def scenario() -> tuple[float, float]:
        async with ResultListener(mosquitto.port) as listener:
            before = node.metric("poc_stage_cpu_seconds_total", bus)
            await listener.publish(raw)
            await listener.final(submission_id(raw))
            return before, node.metric("poc_stage_cpu_seconds_total", bus)

    before, after = run(scenario())
    assert after > before


def test_a_caption_sent_again_in_its_epoch_is_not_encoded_again(
    node: NodeProcess, mosquitto: Broker
):
    """Three keys send one caption beside three pictures, one after another: the later
    captions' embeddings come from the node's cache (``poc_encode_cached_items_total``),
    whatever the pairs' outcomes, and every submission ends. (An epoch may end between
    two of them, when its new beacon rightly misses the cache: hence three.)"""
    caption = ("text", "text/plain", b"one caption, sent beside three pictures")
    pictures = [
        ("image", "image/png", image_bytes("RGB", size=(64, 48))),
        ("image", "image/jpeg", image_bytes("L", "JPEG")),
        ("image", "image/png", image_bytes("RGB", size=(30, 50))),
    ]
    raws = [Peer().submission([caption, picture]) for picture in pictures]
    cached = 'modality="text"'

    async def scenario() -> tuple[float, float, list[str]]:
        async with ResultListener(mosquitto.port) as listener:
            before = node.metric("poc_encode_cached_items_total", cached)
            outcomes = []
            for raw in raws:
                await listener.publish(raw)
                outcomes.append((await listener.final(submission_id(raw)))["status"])
            return before, node.metric("poc_encode_cached_items_total", cached), outcomes

    before, after, outcomes = run(scenario())
    assert after - before in (1, 2)
    assert set(outcomes) <= {"final", "rejected"}


def test_a_rejection_is_answered_again_to_the_same_bytes(node: NodeProcess, mosquitto: Broker):
    """A submitter offline when its rejection went out learns it by sending the bytes again."""
    peer = Peer()
    first = peer.submission([("text", "text/plain", b"the first use of nonce 77")], nonce=77)
    replay = peer.submission([("text", "text/plain", b"nonce 77 used again")], nonce=77)

    async def scenario() -> list[dict]:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(first)
            await listener.final(submission_id(first))
            await listener.publish(replay)
            await listener.final(submission_id(replay))
            await listener.publish(replay)
            await listener.publish(first)  # final: its outcome is the round's, not answered again
            async with asyncio.timeout(30):
                while len(listener.about(submission_id(replay))) < 2:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(2)
            return listener.about(submission_id(replay)) + listener.about(submission_id(first))

    answers = [(r["status"], r["reason"]) for r in run(scenario())]
    assert answers == [
        ("rejected", "replay"),
        ("rejected", "replay"),
        ("accepted", None),
        ("final", None),
    ]


def test_the_same_rejected_bytes_in_a_flood_are_answered_within_the_rate(
    node: NodeProcess, mosquitto: Broker
):
    """Republishing a rejected submission 40 times buys the submitter's rate in answers, no more."""
    peer = Peer()
    first = peer.submission([("text", "text/plain", b"nonce 91, first")], nonce=91)
    replay = peer.submission([("text", "text/plain", b"nonce 91, again")], nonce=91)

    async def scenario() -> int:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(first)
            await listener.final(submission_id(first))
            await listener.publish(replay)
            await listener.final(submission_id(replay))
            for _ in range(40):
                await listener.publish(replay)
            await asyncio.sleep(3)
            return len(listener.about(submission_id(replay))) - 1

    again = run(scenario())
    # The node's rate here: burst 5, one a second; 40 answers without the cap.
    assert 1 <= again <= 12, again


def test_a_flooding_submitter_is_rate_limited(node: NodeProcess, mosquitto: Broker):
    peer = Peer()
    raws = [peer.submission([("text", "text/plain", f"flood {i}".encode())]) for i in range(8)]
    results = run(submit_and_wait(mosquitto.port, raws))
    reasons = [r["reason"] for r in results]
    assert reasons.count("rate_limited") >= 2
    assert reasons.count(None) >= 5


def test_bytes_naming_no_submitter_are_counted_not_answered(node: NodeProcess, mosquitto: Broker):
    before = node.metric("poc_unattributed_messages_total")

    async def scenario() -> None:
        async with ResultListener(mosquitto.port) as listener:
            for junk in (
                b"",
                b"\xc1",
                pack([1, 2, 3]),
                pack({"submitter": b"x"}),
                b"\xdd\xff\xff\xff\xff" + b"\0" * 10,
                b"\x91" * 50_000,
            ):
                await listener.publish(junk)
            await asyncio.sleep(2)
            assert listener.results == []

    run(scenario())
    assert node.metric("poc_unattributed_messages_total") == before + 6
    assert node.process.poll() is None


def test_metrics_and_health_endpoints(node: NodeProcess):
    text = node.metrics()
    for name in (
        "poc_rejections_total",
        "poc_stage_seconds_bucket",
        "poc_queue_depth",
        "poc_round",
        "poc_history_size",
        "poc_bus_connected 1.0",
    ):
        assert name in text
    import json
    import urllib.request

    for path in ("healthz", "readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/{path}") as reply:
            assert reply.status == 200
            assert json.loads(reply.read())


def test_what_arrives_while_the_node_is_down_is_processed_when_it_returns(
    mosquitto: Broker, tmp_path: Path
):
    directory = tmp_path / "restart"
    config = write_node_config(tmp_path / "restart.yaml")
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    first = start_node(directory, bus, config)
    assert first.stop(signal.SIGTERM) == 0
    raw = Peer().submission([("text", "text/plain", b"sent while the validator was down")])

    async def scenario() -> tuple[NodeProcess, dict]:
        async with ResultListener(mosquitto.port) as listener:
            await listener.publish(raw)
            second = await asyncio.to_thread(start_node, directory, bus, config)
            return second, await listener.final(submission_id(raw))

    second, final = run(scenario())
    try:
        assert final["status"] == "final"
    finally:
        assert second.stop() == 0
