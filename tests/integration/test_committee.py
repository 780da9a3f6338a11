"""A committee of four real node processes on a real Mosquitto.

They finalize the same rounds with identical ledgers and histories; one
killed with SIGKILL leaves the other three finalizing, and it catches up
when it returns. A byzantine member (equivocating votes, false records as
leader) gets rounds skipped and evidence recorded, never a diverging ledger.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml

from consensus.beacon import leader_of
from consensus.committee import Committee, Member
from consensus.messages import Proposal, SignedProposal, SignedVote, Vote
from node.intake.codec import unpack
from node.rounds.consensus_wire import decode_proposal, encode_proposal, encode_vote
from node.intake.keys import SigningKey, load_key, write_key
from node.rounds.records import RoundRecord
from node.intake.signing import MessageSigner
from node.store.sqlite import Store
from tests.conftest import POC_NODE, Broker, NodeProcess, start_node, write_node_config
from tests.media import image_bytes
from tests.peer import PREFIX, Peer, ResultListener, submission_id

pytestmark = pytest.mark.integration

ROUND_SECONDS = 3


def make_committee(directory: Path, count: int, start_in_s: float) -> tuple[Path, list[Path],
                                                                             Committee]:
    keys = []
    for index in range(count):
        path = directory / f"v{index}.key"
        key = SigningKey.generate()
        write_key(key, path)
        keys.append((path, key))
    genesis = time.time_ns() // 10**6 + int(start_in_s * 1000)
    document = {
        "genesis_ms": genesis,
        "round_seconds": ROUND_SECONDS,
        "epoch_rounds": 20,
        "members": [{"name": f"v{i}", "public_key": key.public_hex, "stake": 100}
                    for i, (_, key) in enumerate(keys)],
    }
    path = directory / "committee.yaml"
    path.write_text(yaml.safe_dump(document))
    committee = Committee(genesis, ROUND_SECONDS, 20, tuple(
        Member(f"v{i}", key.public_key, 100) for i, (_, key) in enumerate(keys)))
    return path, [p for p, _ in keys], committee


def member_config(directory: Path, committee: Path, key: Path) -> Path:
    return write_node_config(
        directory / "node.yaml",
        node={"committee": str(committee), "key": str(key)},
        rounds={"finality_timeout_s": 3},
        consensus={"sync_timeout_s": 1},
    )


def start_members(directory: Path, bus: str, committee: Path, keys: list[Path]
                  ) -> list[NodeProcess]:
    with ThreadPoolExecutor(len(keys)) as pool:
        futures = [
            pool.submit(start_node, directory / f"n{i}", bus,
                        member_config(directory / f"c{i}", committee, key), 240)
            for i, key in enumerate(keys)
        ]
        return [future.result() for future in futures]


def read_state(data_dir: Path, up_to: int) -> dict[str, Any]:
    store = Store(data_dir / "node.sqlite3")
    try:
        return {
            "ledger": [e for e in store.ledger_entries() if e[0] <= up_to],
            "history": [h for h in store.history_rows() if h[0] <= up_to],
            "rounds": [(r.round, r.proposal_hash)
                       for r in store.committed_rounds(0, up_to, 100_000)],
        }
    finally:
        store.close()


async def finals_from_all(listener: ResultListener, identity: bytes, validators: set[bytes],
                          timeout: float = 90) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            finals = {r["validator"]: r for r in listener.about(identity)
                      if r["status"] in ("final", "rejected")}
            if validators <= set(finals):
                return [finals[v] for v in validators]
            await asyncio.sleep(0.2)


def same_outcome(results: list[dict[str, Any]]) -> None:
    keys = ("status", "reason", "round", "scores_ppm", "reward", "pair_distance_ppm",
            "embeddings")
    first = {k: results[0][k] for k in keys}
    for other in results[1:]:
        assert {k: other[k] for k in keys} == first


@pytest.fixture
def stop_all() -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    yield nodes
    for node in nodes:
        node.stop(signal.SIGKILL)


def test_four_members_agree_survive_a_crash_and_catch_up(
        mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]):
    committee_file, keys, committee = make_committee(tmp_path, 4, start_in_s=40)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    nodes = start_members(tmp_path, bus, committee_file, keys)
    stop_all.extend(nodes)
    validators = {m.public_key for m in committee.members}
    peer = Peer()

    async def phase_one() -> None:
        async with ResultListener(mosquitto.port) as listener:
            raws = [
                peer.submission([("text", "text/plain", b"a yellow triangle"),
                                 ("image", "image/png", image_bytes("RGB", size=(41, 40)))]),
                peer.submission([("text", "text/plain", b"a single caption")]),
            ]
            for raw in raws:
                await listener.publish(raw)
            for raw in raws:
                same_outcome(await finals_from_all(listener, submission_id(raw), validators))

    asyncio.run(phase_one())

    victim = nodes[3]
    victim.stop(signal.SIGKILL)
    survivors = validators - {load_key(keys[3]).public_key}

    async def phase_two() -> None:
        async with ResultListener(mosquitto.port) as listener:
            raw = peer.submission([("text", "text/plain", b"while one member is down")])
            await listener.publish(raw)
            same_outcome(await finals_from_all(listener, submission_id(raw), survivors))

    asyncio.run(phase_two())
    finalized = nodes[0].metric("poc_finalized_round")
    assert finalized >= 1

    nodes[3] = start_node(tmp_path / "n3", bus,
                          member_config(tmp_path / "c3", committee_file, keys[3]), 240)
    stop_all.append(nodes[3])
    deadline = time.monotonic() + 120
    while nodes[3].metric("poc_finalized_round") < finalized:
        assert time.monotonic() < deadline, nodes[3].log_text()[-3000:]
        time.sleep(0.5)

    up_to = int(min(node.metric("poc_finalized_round") for node in nodes))
    for node in nodes:
        assert node.stop() == 0, node.log_text()[-3000:]
    states = [read_state(node.data_dir, up_to) for node in nodes]
    assert states[0]["rounds"] and states[0]["history"]
    for state in states[1:]:
        assert state == states[0]
    audit = subprocess.run(
        [str(POC_NODE), "audit", "--data-dir", str(nodes[3].data_dir), "--config",
         str(tmp_path / "c3" / "node.yaml")],
        capture_output=True, text=True, timeout=300, check=False)
    assert audit.returncode == 0, audit.stdout + audit.stderr


class ByzantineMember:
    """Member v3 run by the test: it equivocates every vote and lies when it leads."""

    def __init__(self, key_path: Path, committee: Committee, port: int) -> None:
        self.key = load_key(key_path)
        self.signer = MessageSigner(self.key)
        self.committee = committee
        self.port = port
        self.lies = 0
        self.equivocations = 0

    def vote(self, round_number: int, value: bytes | None) -> bytes:
        vote = Vote(round_number, self.key.public_key, value)
        return encode_vote(SignedVote(vote, self.signer.sign(Vote.DOMAIN, vote.body())))

    def false_proposal(self, round_number: int) -> bytes:
        record = RoundRecord(b"\x01" * 32, self.key.public_key, "final", None, 0, (), None, (),
                             10**6, 10**6)
        proposal = Proposal(round_number, self.key.public_key, (record.to_bytes(),))
        return encode_proposal(SignedProposal(
            proposal, self.signer.sign(Proposal.DOMAIN, proposal.body())))

    async def run(self, until: float) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port) as client:
            await client.subscribe(f"{PREFIX}/consensus/proposals", qos=1)
            await client.subscribe(f"{PREFIX}/rounds/+", qos=1)
            lied: set[int] = set()
            async with asyncio.timeout(until):
                async for message in client.messages:
                    topic = str(message.topic)
                    payload = bytes(message.payload)  # type: ignore[arg-type]
                    if topic.endswith("/consensus/proposals"):
                        signed = decode_proposal(payload)
                        if signed.signer == self.key.public_key:
                            continue
                        digest = signed.proposal.digest(self.signer)
                        for value in (digest, None):
                            await client.publish(f"{PREFIX}/consensus/votes",
                                                 self.vote(signed.round, value), qos=1)
                        self.equivocations += 1
                    else:
                        summary = unpack(payload)
                        # The broker is shared by the session's tests: summaries retained
                        # by earlier committees carry other beacons and must not count.
                        if self.committee.member(summary["validator"]) is None:
                            continue
                        upcoming = summary["round"] + 1
                        leader = leader_of(summary["beacon_after"], self.committee)
                        end = self.committee.round_end_ms(upcoming) / 1000
                        if (leader.public_key == self.key.public_key and upcoming not in lied
                                and end > time.time()):
                            lied.add(upcoming)
                            await asyncio.sleep(end - time.time() + 0.2)
                            await client.publish(f"{PREFIX}/consensus/proposals",
                                                 self.false_proposal(upcoming), qos=1)
                            self.lies += 1


def test_a_byzantine_member_cannot_break_the_committee(
        mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]):
    committee_file, keys, committee = make_committee(tmp_path, 4, start_in_s=40)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    honest = start_members(tmp_path, bus, committee_file, keys[:3])
    stop_all.extend(honest)
    byzantine = ByzantineMember(keys[3], committee, mosquitto.port)
    honest_keys = {m.public_key for m in committee.members} - {byzantine.key.public_key}
    peer = Peer()

    async def scenario() -> None:
        liar = asyncio.create_task(byzantine.run(until=200))
        try:
            async with ResultListener(mosquitto.port) as listener:
                for index in range(6):
                    raw = peer.submission([("text", "text/plain", f"honest data {index}".encode())])
                    await listener.publish(raw)
                    same_outcome(await finals_from_all(listener, submission_id(raw), honest_keys))
                deadline = time.monotonic() + 150
                while byzantine.lies == 0:
                    assert time.monotonic() < deadline, "the byzantine member never led"
                    await asyncio.sleep(0.5)
                await asyncio.sleep(ROUND_SECONDS * 3)
        finally:
            liar.cancel()
            await asyncio.gather(liar, return_exceptions=True)

    asyncio.run(scenario())
    assert byzantine.equivocations > 0
    for node in honest:
        assert node.metric("poc_equivocations_total") >= 1
        assert node.metric("poc_rounds_total", 'outcome="skip"') >= 1
    assert sum(node.metric("poc_record_mismatches_total") for node in honest) >= 1
    up_to = int(min(node.metric("poc_finalized_round") for node in honest))
    for node in honest:
        assert node.stop() == 0, node.log_text()[-3000:]
    states = [read_state(node.data_dir, up_to) for node in honest]
    for state in states[1:]:
        assert state == states[0]
    assert all(entry[1] != byzantine.key.public_key for entry in states[0]["ledger"])
    store = Store(honest[0].data_dir / "node.sqlite3")
    try:
        assert any(offender == byzantine.key.public_key for _, offender, _ in store.evidence())
    finally:
        store.close()
