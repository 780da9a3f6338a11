"""A committee of four real node processes on a real Mosquitto.

They finalize the same rounds with identical ledgers and histories through a
late start, a frozen member, a killed one and a flood. A byzantine member
(equivocating votes and proposals, replayed and false records, proposals out
of turn and far ahead) and twins sharing one key get evidence recorded and
views changed, never a diverging ledger nor a stalled committee. A committee
of three states a paid submitter's balance, which ``poc-node balance`` prints
once a quorum of the stake agrees on it.
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
from cryptography.hazmat.primitives import serialization

from consensus.beacon import proposer_of
from consensus.committee import Committee, Member
from consensus.messages import Evidence, Proposal, SignedProposal, SignedVote, Vote, VoteKind
from node.intake.codec import unpack
from node.intake.keys import SigningKey, load_key, write_key
from node.intake.signing import MessageSigner
from node.rounds.consensus_wire import (
    decode_proposal,
    encode_evidence,
    encode_proposal,
    encode_vote,
)
from node.rounds.records import RoundRecord
from node.store.sqlite import Store
from tests.conftest import POC_NODE, Broker, NodeProcess, start_node, write_node_config
from tests.media import image_bytes
from tests.peer import PREFIX, Peer, ResultListener, submission_id, verify_balance

pytestmark = pytest.mark.integration

ROUND_SECONDS = 3


def make_committee(
    directory: Path, count: int, start_in_s: float
) -> tuple[Path, list[Path], Committee]:
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
        "members": [
            {"name": f"v{i}", "public_key": key.public_hex, "stake": 100}
            for i, (_, key) in enumerate(keys)
        ],
    }
    path = directory / "committee.yaml"
    path.write_text(yaml.safe_dump(document))
    committee = Committee(
        genesis,
        ROUND_SECONDS,
        20,
        tuple(Member(f"v{i}", key.public_key, 100) for i, (_, key) in enumerate(keys)),
    )
    return path, [p for p, _ in keys], committee


def member_config(
    directory: Path, committee: Path, key: Path, scoring: dict[str, object] | None = None
) -> Path:
    return write_node_config(
        directory / "node.yaml",
        scoring=scoring or {},
        node={"committee": str(committee), "key": str(key)},
        # A flood of 150 spans several rounds: the cap on a round's records must fire.
        rounds={"max_records": 20, "expiry_rounds": 20},
        consensus={
            "sync_timeout_s": 1,
            "propose_timeout_s": 2,
            "prevote_timeout_s": 1,
            "precommit_timeout_s": 1,
            "timeout_delta_s": 0.5,
            "rebroadcast_s": 1,
        },
    )


def start_members(
    directory: Path,
    bus: str,
    committee: Path,
    keys: list[Path],
    scoring: dict[str, object] | None = None,
) -> list[NodeProcess]:
    with ThreadPoolExecutor(len(keys)) as pool:
        futures = [
            pool.submit(
                start_node,
                directory / f"n{i}",
                bus,
                member_config(directory / f"c{i}", committee, key, scoring),
                240,
            )
            for i, key in enumerate(keys)
        ]
        return [future.result() for future in futures]


def read_state(data_dir: Path, up_to: int) -> dict[str, Any]:
    store = Store(data_dir / "node.sqlite3")
    try:
        return {
            "ledger": [e for e in store.ledger_entries() if e[0] <= up_to],
            "history": [h for h in store.history_rows() if h[0] <= up_to],
            "rounds": [(r.round, r.value_hash) for r in store.committed_rounds(0, up_to, 100_000)],
        }
    finally:
        store.close()


async def finals_from_all(
    listener: ResultListener, identity: bytes, validators: set[bytes], timeout: float = 90
) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout):
        while True:
            finals = {
                r["validator"]: r
                for r in listener.about(identity)
                if r["status"] in ("final", "rejected")
            }
            if validators <= set(finals):
                return [finals[v] for v in validators]
            await asyncio.sleep(0.2)


def same_outcome(results: list[dict[str, Any]]) -> None:
    keys = ("status", "reason", "round", "scores_ppm", "reward", "pair_distance_ppm", "embeddings")
    first = {k: results[0][k] for k in keys}
    for other in results[1:]:
        assert {k: other[k] for k in keys} == first


@pytest.fixture
def stop_all() -> Iterator[list[NodeProcess]]:
    nodes: list[NodeProcess] = []
    yield nodes
    for node in nodes:
        node.stop(signal.SIGKILL)


def wait_metric(node: NodeProcess, name: str, at_least: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (value := node.metric(name)) < at_least:
        assert time.monotonic() < deadline, f"{name}={value}\n" + node.log_text()[-4000:]
        time.sleep(0.5)
    return value


def test_four_members_finalize_through_a_late_start_a_freeze_a_kill_and_a_flood(
    mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]
):
    """Staggered starts, SIGSTOP, SIGKILL and a flood: every submission reaches one final."""
    committee_file, keys, committee = make_committee(tmp_path, 4, start_in_s=25)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    nodes = start_members(tmp_path, bus, committee_file, keys[:3])
    stop_all.extend(nodes)
    validators = {m.public_key for m in committee.members}
    key_of = [load_key(path).public_key for path in keys]
    peer = Peer()
    late: list[NodeProcess] = []

    async def scenario() -> None:
        async with ResultListener(mosquitto.port) as listener:
            # v3 starts about ten seconds after the others have begun finalizing.
            first = peer.submission(
                [
                    ("text", "text/plain", b"a yellow triangle"),
                    ("image", "image/png", image_bytes("RGB", size=(41, 40))),
                ]
            )
            await listener.publish(first)
            present = validators - {key_of[3]}
            same_outcome(await finals_from_all(listener, submission_id(first), present, 120))
            await asyncio.sleep(10)
            late.append(
                await asyncio.to_thread(
                    start_node,
                    tmp_path / "n3",
                    bus,
                    member_config(tmp_path / "c3", committee_file, keys[3]),
                    240,
                )
            )
            stop_all.append(late[0])
            raw = peer.submission([("text", "text/plain", b"after the late start")])
            await listener.publish(raw)
            same_outcome(await finals_from_all(listener, submission_id(raw), validators, 120))

            # v1 is frozen for 20 s: the other three keep finalizing.
            nodes[1].process.send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                raw = peer.submission([("text", "text/plain", b"while one member is frozen")])
                await listener.publish(raw)
                same_outcome(
                    await finals_from_all(
                        listener, submission_id(raw), validators - {key_of[1]}, 60
                    )
                )
                await asyncio.sleep(max(20 - (time.monotonic() - frozen_at), 0))
            finally:
                nodes[1].process.send_signal(signal.SIGCONT)

            # v2 is killed; a flood arrives meanwhile; v2 comes back.
            nodes[2].stop(signal.SIGKILL)
            crowd = [Peer() for _ in range(30)]  # within each key's rate limit
            flood = [
                crowd[i % 30].submission([("text", "text/plain", f"flood {i}".encode())])
                for i in range(150)
            ]
            await asyncio.gather(*(listener.publish(raw) for raw in flood))
            await asyncio.sleep(3)
            nodes[2] = await asyncio.to_thread(
                start_node,
                tmp_path / "n2",
                bus,
                member_config(tmp_path / "c2", committee_file, keys[2]),
                240,
            )
            stop_all.append(nodes[2])
            for raw in [flood[0], flood[-1], *flood[1:-1:15]]:
                same_outcome(await finals_from_all(listener, submission_id(raw), validators, 180))

    asyncio.run(scenario())
    members = [*nodes, late[0]]
    target = int(max(node.metric("poc_finalized_round") for node in members))
    for node in members:
        wait_metric(node, "poc_finalized_round", target, 120)
    up_to = int(min(node.metric("poc_finalized_round") for node in members))
    for node in members:
        assert node.stop() == 0, node.log_text()[-3000:]
    states = [read_state(node.data_dir, up_to) for node in members]
    assert states[0]["rounds"] and states[0]["history"]
    per_round: dict[int, set[bytes]] = {}
    for number, identity, _, _, _ in states[0]["history"]:
        per_round.setdefault(number, set()).add(identity)
    assert max(len(ids) for ids in per_round.values()) == 20  # rounds.max_records held
    for state in states[1:]:
        assert state == states[0]
    audit = subprocess.run(
        [
            str(POC_NODE),
            "audit",
            "--data-dir",
            str(nodes[2].data_dir),
            "--config",
            str(tmp_path / "c2" / "node.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr


class ByzantineMember:
    """Member v3 run by the test, misbehaving in every way a faulty member can cheaply.

    It equivocates every vote (prevote and precommit both for the value seen
    and nil); as the proposer of a view it signs two different proposals, one
    of which replays records of a round already committed; and it proposes
    out of turn, for the current round and for rounds far ahead.
    """

    def __init__(self, key_path: Path, committee: Committee, port: int) -> None:
        self.key = load_key(key_path)
        self.signer = MessageSigner(self.key)
        self.committee = committee
        self.port = port
        self.equivocations = 0
        self.proposals_as_proposer = 0
        self.out_of_turn = 0
        self.seen_records: list[tuple[bytes, ...]] = []
        self.beacons: dict[int, bytes] = {}

    def vote(self, kind: VoteKind, round_number: int, view: int, value: bytes | None) -> bytes:
        vote = Vote(kind, round_number, view, self.key.public_key, value)
        return encode_vote(SignedVote(vote, self.signer.sign(Vote.DOMAIN, vote.body())))

    def proposal(self, round_number: int, view: int, records: tuple[bytes, ...]) -> bytes:
        proposal = Proposal(round_number, view, self.key.public_key, records)
        return encode_proposal(
            SignedProposal(proposal, self.signer.sign(Proposal.DOMAIN, proposal.body()))
        )

    def false_records(self) -> tuple[bytes, ...]:
        record = RoundRecord(
            b"\x01" * 32, self.key.public_key, "final", None, 0, (), None, (), 10**6, 10**6
        )
        return (record.to_bytes(),)

    def forged_evidence(self) -> bytes:
        """Evidence accusing honest v0, which v0 never signed: it must convince nobody."""
        victim = next(m for m in self.committee.members if m.name == "v0").public_key
        votes = [
            SignedVote(
                Vote(VoteKind.PREVOTE, 0, 0, victim, value),
                self.signer.sign(Vote.DOMAIN, Vote(VoteKind.PREVOTE, 0, 0, victim, value).body()),
            )
            for value in (b"\x07" * 32, None)
        ]
        return encode_evidence(Evidence(votes[0], votes[1]))

    async def run(self, until: float) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port) as client:
            await client.subscribe(f"{PREFIX}/consensus/proposals", qos=1)
            await client.subscribe(f"{PREFIX}/rounds/+", qos=1)
            led: set[tuple[int, int]] = set()
            await client.publish(f"{PREFIX}/consensus/evidence", self.forged_evidence(), qos=1)
            async with asyncio.timeout(until):
                async for message in client.messages:
                    topic = str(message.topic)
                    payload = bytes(message.payload)  # type: ignore[arg-type]
                    if not payload:
                        continue
                    if topic.endswith("/consensus/proposals"):
                        signed = decode_proposal(payload)
                        if signed.signer == self.key.public_key:
                            continue
                        if signed.proposal.records:
                            self.seen_records.append(signed.proposal.records)
                        value = signed.proposal.value.digest(self.signer)
                        for kind in VoteKind:
                            for choice in (value, None):
                                await client.publish(
                                    f"{PREFIX}/consensus/votes",
                                    self.vote(kind, signed.round, signed.view, choice),
                                    qos=1,
                                )
                        self.equivocations += 1
                        # Out of turn: a proposal for this round and one far ahead.
                        for r in (signed.round, signed.round + 100):
                            await client.publish(
                                f"{PREFIX}/consensus/proposals",
                                self.proposal(r, signed.view, self.false_records()),
                                qos=1,
                            )
                        self.out_of_turn += 1
                        continue
                    summary = unpack(payload)
                    # The broker is shared by the session's tests: summaries retained
                    # by earlier committees carry other beacons and must not count.
                    if self.committee.member(summary["validator"]) is None:
                        continue
                    upcoming = summary["round"] + 1
                    beacon = summary["beacon_after"]
                    for view in (0,):  # members only verify the view they are in
                        proposer = proposer_of(beacon, view, self.committee)
                        if proposer.public_key != self.key.public_key or (upcoming, view) in led:
                            continue
                        led.add((upcoming, view))
                        end = self.committee.round_end_ms(upcoming) / 1000
                        await asyncio.sleep(max(end - time.time(), 0) + 0.1)
                        replay = self.seen_records[0] if self.seen_records else ()
                        for records in (self.false_records(), replay):
                            await client.publish(
                                f"{PREFIX}/consensus/proposals",
                                self.proposal(upcoming, view, records),
                                qos=1,
                            )
                        self.proposals_as_proposer += 1


def test_a_byzantine_member_cannot_break_the_committee(
    mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]
):
    committee_file, keys, committee = make_committee(tmp_path, 4, start_in_s=25)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    honest = start_members(tmp_path, bus, committee_file, keys[:3])
    stop_all.extend(honest)
    byzantine = ByzantineMember(keys[3], committee, mosquitto.port)
    honest_keys = {m.public_key for m in committee.members} - {byzantine.key.public_key}
    peer = Peer()

    async def scenario() -> None:
        liar = asyncio.create_task(byzantine.run(until=400))
        try:
            async with ResultListener(mosquitto.port) as listener:
                index = 0
                deadline = time.monotonic() + 240
                while byzantine.proposals_as_proposer < 2 or index < 4:
                    assert time.monotonic() < deadline, "the byzantine member never proposed"
                    raw = peer.submission([("text", "text/plain", f"honest data {index}".encode())])
                    index += 1
                    await listener.publish(raw)
                    same_outcome(await finals_from_all(listener, submission_id(raw), honest_keys))
                await asyncio.sleep(ROUND_SECONDS * 2)
        finally:
            liar.cancel()
            await asyncio.gather(liar, return_exceptions=True)

    asyncio.run(scenario())
    assert byzantine.equivocations > 0 and byzantine.out_of_turn > 0
    for node in honest:
        assert node.process.poll() is None, node.log_text()[-3000:]
        assert node.metric("poc_equivocations_total", 'member="v3"') >= 1
        assert node.metric("poc_equivocations_total", 'member="v0"') == 0  # forged accusation
        assert node.metric("poc_consensus_rejected_total", 'reason="evidence_bad_signature"') >= 1
        assert node.metric("poc_consensus_rejected_total", 'reason="not_proposer"') >= 1
        assert node.metric("poc_consensus_rejected_total", 'reason="too_far_ahead"') >= 1
    assert sum(node.metric("poc_record_mismatches_total") for node in honest) >= 1
    up_to = int(min(node.metric("poc_finalized_round") for node in honest))
    for node in honest:
        assert node.stop() == 0, node.log_text()[-3000:]
    states = [read_state(node.data_dir, up_to) for node in honest]
    for state in states[1:]:
        assert state == states[0]
    paid = [entry[2] for entry in states[0]["ledger"]]
    assert len(paid) == len(set(paid))  # nothing paid twice, replay or not
    assert all(entry[1] != byzantine.key.public_key for entry in states[0]["ledger"])
    store = Store(honest[0].data_dir / "node.sqlite3")
    try:
        assert any(row.offender == byzantine.key.public_key for row in store.evidence())
    finally:
        store.close()
    audit = subprocess.run(
        [
            str(POC_NODE),
            "audit",
            "--data-dir",
            str(honest[0].data_dir),
            "--config",
            str(tmp_path / "c0" / "node.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "v3 signed two" in audit.stdout and "proves equivocation" in audit.stdout


def test_twins_sharing_one_key_cannot_split_the_committee(
    mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]
):
    """Two processes run with v3's key (an operator's failover gone wrong)."""
    committee_file, keys, committee = make_committee(tmp_path, 4, start_in_s=25)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    nodes = start_members(tmp_path, bus, committee_file, [*keys, keys[3]])
    stop_all.extend(nodes)
    honest = nodes[:3]
    honest_keys = {m.public_key for m in committee.members} - {load_key(keys[3]).public_key}
    crowd = [Peer() for _ in range(4)]

    async def scenario() -> None:
        async with ResultListener(mosquitto.port) as listener:
            raws = [
                crowd[i % 4].submission([("text", "text/plain", f"twins {i}".encode())])
                for i in range(8)
            ]
            for raw in raws:
                await listener.publish(raw)
                await asyncio.sleep(ROUND_SECONDS / 2)
            for raw in raws:
                same_outcome(await finals_from_all(listener, submission_id(raw), honest_keys))

    asyncio.run(scenario())
    up_to = int(min(node.metric("poc_finalized_round") for node in honest))
    for node in nodes:
        assert node.process.poll() is None, node.log_text()[-3000:]
    for node in honest:
        assert node.stop() == 0, node.log_text()[-3000:]
    states = [read_state(node.data_dir, up_to) for node in honest]
    assert states[0]["rounds"]
    for state in states[1:]:
        assert state == states[0]


def test_a_quorum_of_members_states_a_submitters_balance_over_the_bus(
    mosquitto: Broker, tmp_path: Path, stop_all: list[NodeProcess]
):
    """Paid submissions: each member publishes the total; ``poc-node balance`` prints it."""
    committee_file, keys, committee = make_committee(tmp_path, 3, start_in_s=20)
    bus = f"mqtt://127.0.0.1:{mosquitto.port}"
    # Untrained weights pay once a modality's history holds k items (as in
    # test_crash_safety): the first submissions build it, the later ones are paid.
    scoring: dict[str, object] = {"k": 2, "qualify_ratio": 10.0}
    stop_all.extend(start_members(tmp_path, bus, committee_file, keys, scoring))
    validators = {m.public_key for m in committee.members}
    peer = Peer()
    key_file = tmp_path / "submitter.key"
    key_file.write_bytes(
        peer.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)

    async def scenario() -> tuple[list[dict[str, Any]], dict[bytes, dict[str, Any]]]:
        finals = []
        async with ResultListener(mosquitto.port) as listener:
            for batch in (range(3), range(3, 6)):
                raws = [
                    peer.submission([("text", "text/plain", f"observation number {n}".encode())])
                    for n in batch
                ]
                for raw in raws:
                    await listener.publish(raw)
                for raw in raws:
                    outcome = await finals_from_all(listener, submission_id(raw), validators, 120)
                    same_outcome(outcome)
                    finals.append(outcome[0])
        # The last round that credited the peer: the round its Balance is valid at.
        last_round = max((r["round"] for r in finals if r["reward"]), default=-1)
        assert last_round >= 0, "nothing was paid: the test would prove nothing"
        # The peer, written from the protocol alone, reads every member's Balance.
        newest: dict[bytes, dict[str, Any]] = {}
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe(f"{PREFIX}/balances/{peer.public.hex()}/+", qos=1)
            async with asyncio.timeout(60):
                async for message in client.messages:
                    balance = verify_balance(bytes(message.payload))  # type: ignore[arg-type]
                    assert str(message.topic).endswith(balance["validator"].hex())
                    assert balance["submitter"] == peer.public
                    newest[balance["validator"]] = balance
                    if (
                        all(b["round"] >= last_round for b in newest.values())
                        and set(newest) == validators
                    ):
                        break
        return finals, newest

    finals, newest = asyncio.run(scenario())
    paid = sum(result["reward"] for result in finals)
    assert all(result["status"] == "final" for result in finals)
    assert paid > 0
    last_round = max(result["round"] for result in finals if result["reward"])
    assert {(b["round"], b["balance"]) for b in newest.values()} == {(last_round, paid)}

    def balance(*options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(POC_NODE), "balance", "--bus", bus, *options],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    agreed = balance("--key", str(key_file), "--committee", str(committee_file))
    assert agreed.returncode == 0, agreed.stdout + agreed.stderr
    first, members = agreed.stdout.splitlines()
    assert first == f"balance {paid} at round {last_round}"
    assert members.endswith("(stake 300 of 300)")
    assert sorted(members.removeprefix("agreed: ").split(" (")[0].split(", ")) == ["v0", "v1", "v2"]
    # Without a committee file it trusts the one member that answered, and says so.
    trusting = balance("--key", str(key_file))
    assert trusting.returncode == 0, trusting.stdout + trusting.stderr
    assert "no --committee: trusting the one member that answered" in trusting.stdout
    assert f"balance {paid} at round {last_round}" in trusting.stdout
    # A key never paid has no balance: no quorum, one line, exit 1.
    stranger = tmp_path / "stranger.key"
    write_key(SigningKey.generate(), stranger)
    unpaid = balance("--key", str(stranger), "--committee", str(committee_file), "--timeout", "2")
    assert unpaid.returncode == 1
    assert unpaid.stderr.count("\n") == 1
    assert "no quorum of the committee's stake agreed" in unpaid.stderr
    silent = unpaid.stderr.split("silent: ")[1].split(" (")[0]
    assert sorted(silent.split(", ")) == ["v0", "v1", "v2"]
