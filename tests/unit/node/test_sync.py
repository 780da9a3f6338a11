"""Sync on a real store: replies capped in bytes, and only a reply that verifies is taken."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from consensus.actions import Broadcast, BuildProposal, Commit
from consensus.committee import Committee, Member
from consensus.messages import NO_VIEW, Evidence, Proposal, SignedProposal
from consensus.round import RoundMachine
from encoders.modality import Modality
from node.bus.client import Topics
from node.errors import EncoderUnavailable, Reason
from node.intake.codec import DecodeLimits, pack, unpack
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.intake.wire import EmbeddingEntry, submission_id
from node.ops.config import load_config
from node.ops.metrics import Metrics
from node.rounds.consensus_wire import encode_evidence, encode_proposal
from node.rounds.driver import RoundDriver
from node.rounds.records import (
    Mismatch,
    RoundRecord,
    Unavailable,
    Undecided,
    proposal_bytes_max,
)
from node.rounds.sync import FetchedRound, SyncService
from node.store.sqlite import CommittedRound, Store
from node.store.thread import StoreThread
from rewards.history import History

PREFIX = "poc/v1"


def members(count: int) -> tuple[Committee, list[MessageSigner]]:
    signers = [MessageSigner(SigningKey.generate()) for _ in range(count)]
    committee = Committee(
        0, 2, 60, tuple(Member(f"v{i}", s.key.public_key, 1) for i, s in enumerate(signers))
    )
    return committee, signers


def test_a_reply_holds_whole_rounds_up_to_its_byte_cap(tmp_path: Path):
    committee, (asker, answerer) = members(2)
    store = Store(tmp_path / "s.db")
    for number in range(32):
        store.commit_round(
            CommittedRound(
                number, b"v" * 32, b"b" * 32, pack({"round": number}), b"summary", b"p" * 100_000
            ),
            [],
            [],
            1,
        )
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        sent.append((topic, payload))

    async def scenario() -> None:
        service = SyncService(
            answerer, committee, PREFIX, StoreThread(store), publish, reply_bytes=256 * 1024
        )
        request = asker.signed_bytes(
            "poc/v1/sync-request",
            {
                "v": 1,
                "requester": asker.key.public_key,
                "request_id": b"r" * 16,
                "kind": "rounds",
                "first": 3,
            },
        )
        await service.on_request(request)
        stranger = MessageSigner(SigningKey.generate())
        await service.on_request(
            stranger.signed_bytes(
                "poc/v1/sync-request",
                {
                    "v": 1,
                    "requester": stranger.key.public_key,
                    "request_id": b"s" * 16,
                    "kind": "rounds",
                    "first": 3,
                },
            )
        )

    asyncio.run(scenario())
    assert len(sent) == 1  # a stranger's request is not answered
    topic, payload = sent[0]
    assert topic == f"{PREFIX}/sync/replies/{asker.key.public_hex}"
    assert len(payload) <= 256 * 1024
    entries = unpack(payload, DecodeLimits(max_bytes=1 << 30))["entries"]
    assert [e["round"] for e in entries] == [3, 4]


def test_the_first_valid_reply_answers_junk_and_empty_replies_are_passed_over(tmp_path: Path):
    committee, (asker, liar, honest) = members(3)

    async def scenario() -> list[FetchedRound]:
        service: SyncService
        replies: list[bytes] = []

        async def publish(topic: str, payload: bytes) -> None:
            request = unpack(payload)
            rid = request["request_id"]
            replies.extend(
                [
                    pack(
                        {"v": 1, "request_id": rid, "responder": liar.key.public_key, "entries": []}
                    ),
                    pack(
                        {
                            "v": 1,
                            "request_id": rid,
                            "responder": liar.key.public_key,
                            "entries": [{"round": 5, "certificate": {"lie": 1}, "proposal": b"x"}],
                        }
                    ),
                    pack(
                        {
                            "v": 1,
                            "request_id": rid,
                            "responder": liar.key.public_key,
                            "entries": ["junk", 7],
                        }
                    ),
                    pack(
                        {
                            "v": 1,
                            "request_id": rid,
                            "responder": honest.key.public_key,
                            "entries": [
                                {"round": 5, "certificate": {"good": 1}, "proposal": b"p"},
                                {"round": 6, "certificate": {"good": 1}, "proposal": b"q"},
                            ],
                        }
                    ),
                ]
            )

        store = StoreThread(Store(tmp_path / "s.db"))
        service = SyncService(asker, committee, PREFIX, store, publish)

        def valid(fetched: FetchedRound) -> bool:
            return unpack(fetched.certificate) == {"good": 1}

        async def deliver() -> None:
            while not replies:
                await asyncio.sleep(0.01)
            for reply in replies:
                await service.on_reply(reply)

        delivering = asyncio.create_task(deliver())
        fetched = await service.fetch_rounds(5, 5.0, valid)
        await delivering
        assert service.refused_replies == 3
        return fetched

    fetched = asyncio.run(scenario())
    assert [f.round for f in fetched] == [5, 6]


def test_no_valid_reply_times_out_with_nothing(tmp_path: Path):
    committee, (asker, liar) = members(2)

    async def scenario() -> list[FetchedRound]:
        service: SyncService | None = None

        async def publish(topic: str, payload: bytes) -> None:
            rid = unpack(payload)["request_id"]
            assert service is not None
            asyncio.get_running_loop().call_soon(
                asyncio.ensure_future,
                service.on_reply(
                    pack(
                        {"v": 1, "request_id": rid, "responder": liar.key.public_key, "entries": []}
                    )
                ),
            )

        service = SyncService(
            asker, committee, PREFIX, StoreThread(Store(tmp_path / "s.db")), publish
        )
        return await service.fetch_rounds(0, 0.3, lambda fetched: True)

    assert asyncio.run(scenario()) == []


def _solo_commits(
    signer: MessageSigner, rounds: list[list[bytes]]
) -> tuple[Committee, list[Commit]]:
    """Certified rounds 0, 1, ... of a committee of one, each with final records of these ids."""
    me = signer.key.public_key
    committee = Committee(0, 1, 10, (Member("solo", me, 1),))
    machine = RoundMachine(committee, me, signer, first_round=0, beacon=b"b" * 32)
    commits = []
    for round_number, ids in enumerate(rounds):
        build = next(a for a in machine.round_closed(round_number) if isinstance(a, BuildProposal))
        records = [
            RoundRecord(i, b"s" * 32, "final", None, 0, (), None, None, 0, 0).to_bytes()
            for i in sorted(ids)
        ]
        actions = machine.proposal_built(round_number, build.view, records)
        commits.append(next(a for a in actions if isinstance(a, Commit)))
    return committee, commits


def _driver(
    committee: Committee,
    signer: MessageSigner,
    store: StoreThread,
    metrics: Metrics,
    sync: SyncService,
) -> RoundDriver:
    return RoundDriver(
        load_config(),
        committee,
        signer,
        store,
        History(8),
        SimpleNamespace(),  # type: ignore[arg-type]  # the rules: only proposals use them
        SimpleNamespace(advanced=lambda *args: asyncio.sleep(0)),  # type: ignore[arg-type]
        metrics,
        Topics(PREFIX),
        lambda: None,
        sync=sync,
    )


class _Peers:
    """A sync service whose peers answer nothing at first, then whatever is asked."""

    def __init__(self) -> None:
        self.asked: list[set[bytes]] = []

    async def fetch_submissions(self, ids: list[bytes], timeout_s: float) -> dict[bytes, bytes]:
        self.asked.append(set(ids))
        if len(self.asked) == 1:
            return {}  # every peer too slow
        return {identity: b"bytes of " + identity for identity in ids}


def test_bytes_no_peer_gave_are_asked_for_again_after_the_next_commit(tmp_path: Path):
    """A member that learned rounds by sync asks peers for their submissions' bytes.
    What no peer answers in time is asked for again after the next commit, unless the
    bus brought it meanwhile: none stays missing (peers' sync and audits need them)."""
    signer = MessageSigner(SigningKey.generate())
    x, y, z = b"x" * 32, b"y" * 32, b"z" * 32
    committee, commits = _solo_commits(signer, [[x, z], [y]])
    peers = _Peers()

    async def scenario() -> dict[bytes, bytes | None]:
        store = StoreThread(Store(tmp_path / "s.db"))
        metrics = Metrics(CollectorRegistry())
        driver = _driver(committee, signer, store, metrics, peers)  # type: ignore[arg-type]
        await driver._commit(commits[0])
        await asyncio.gather(*driver._background)
        assert await store.missing_raw([x, z]) == [x, z]
        assert metrics.sync_bytes_wanted._value.get() == 2
        assert await store.keep_raw(z, b"bytes of z from the bus")
        await driver._commit(commits[1])
        await asyncio.gather(*driver._background)
        kept = {i: await store.raw_submission(i) for i in (x, y, z)}
        assert metrics.sync_bytes_wanted._value.get() == 0
        store.close()
        return kept

    kept = asyncio.run(scenario())
    assert peers.asked == [{x, z}, {x, y}]  # z came by the bus: not asked again
    assert kept == {x: b"bytes of " + x, y: b"bytes of " + y, z: b"bytes of z from the bus"}


def test_a_lying_member_that_answers_first_delays_the_bytes_but_never_replaces_them(
    tmp_path: Path,
):
    """Peers answer a request for submissions' bytes through the real sync service. A
    liar answers first every time: junk, then forged bytes beside the one genuine
    submission it holds, which makes its reply the answer. Forged bytes are never kept;
    what its answer left out is asked for again after the next commit, and the honest
    member's answer then gives it."""
    signer = MessageSigner(SigningKey.generate())
    liar, honest = MessageSigner(SigningKey.generate()), MessageSigner(SigningKey.generate())
    raws = [b"signed submission x", b"signed submission y", b"signed submission w"]
    x, y, w = (submission_id(raw) for raw in raws)
    genuine = dict(zip((x, y, w), raws, strict=True))
    committee, commits = _solo_commits(signer, [[x, y], [w]])
    asked: list[set[bytes]] = []

    async def scenario() -> tuple[dict[bytes, bytes | None], int]:
        service: SyncService | None = None

        def reply(rid: bytes, responder: MessageSigner, entries: list[object]) -> bytes:
            return pack(
                {
                    "v": 1,
                    "request_id": rid,
                    "responder": responder.key.public_key,
                    "entries": entries,
                }
            )

        async def publish(topic: str, payload: bytes) -> None:
            request = unpack(payload)
            ids = set(request["ids"])
            asked.append(ids)
            rid = request["request_id"]
            forged = [b"forged bytes for " + i for i in ids]
            replies = [
                reply(rid, liar, ["junk", 7, *forged]),  # nothing hashes to an id: passed over
                reply(rid, liar, [*forged, *([genuine[y]] if y in ids else [])]),
                reply(rid, honest, [genuine[i] for i in ids]),
            ]

            async def deliver() -> None:
                assert service is not None
                for raw in replies:
                    await service.on_reply(raw)

            asyncio.get_running_loop().call_soon(asyncio.ensure_future, deliver())

        store = StoreThread(Store(tmp_path / "s.db"))
        service = SyncService(signer, committee, PREFIX, store, publish)
        metrics = Metrics(CollectorRegistry())
        driver = _driver(committee, signer, store, metrics, service)
        await driver._commit(commits[0])
        await asyncio.gather(*driver._background)
        assert await store.missing_raw([x, y]) == [x]  # the liar's answer won this request
        assert metrics.sync_bytes_wanted._value.get() == 1
        await driver._commit(commits[1])
        await asyncio.gather(*driver._background)
        kept = {i: await store.raw_submission(i) for i in (x, y, w)}
        assert metrics.sync_bytes_wanted._value.get() == 0
        store.close()
        return kept, service.refused_replies

    kept, refused = asyncio.run(scenario())
    assert asked == [{x, y}, {x, w}]
    assert kept == genuine  # never a forged byte
    assert refused == 3  # the junk reply each time, and the liar's forgeries once y was had


def test_replies_and_requests_with_hostile_values_are_dropped_and_the_node_goes_on(
    tmp_path: Path,
):
    """Found from the outside: an unsigned reply whose request_id was a list or a map
    (unhashable) raised out of the driver and ended the node, and again on every
    restart (its QoS 1 redelivery); a member's request for rounds from 2**63 - 1
    overflowed SQLite's signed integer. Both go through the real driver's handler,
    which also drops (and counts) any other error of its own on one message."""
    committee, (me, other) = members(2)
    sent: list[tuple[str, bytes]] = []

    async def publish(topic: str, payload: bytes) -> None:
        sent.append((topic, payload))

    async def scenario() -> Metrics:
        store = StoreThread(Store(tmp_path / "s.db"))
        store.store.commit_round(
            CommittedRound(0, b"v" * 32, b"b" * 32, pack({"round": 0}), b"summary", b"p"),
            [],
            [],
            1,
        )
        metrics = Metrics(CollectorRegistry())
        sync = SyncService(me, committee, PREFIX, store, publish)
        driver = _driver(committee, me, store, metrics, sync)
        for request_id in ([], {}, [b"x"], None, 5):
            reply = {"v": 1, "request_id": request_id, "responder": bytes(32), "entries": []}
            await driver.on_message(sync.reply_topic, pack(reply))
        for first in (2**63 - 1, 2**63 - 10, 2**64 - 1, -1, 0):
            request = other.signed_bytes(
                "poc/v1/sync-request",
                {
                    "v": 1,
                    "requester": other.key.public_key,
                    "request_id": b"r" * 16,
                    "kind": "rounds",
                    "first": first,
                },
            )
            await driver.on_message(sync.request_topic, request)
        await asyncio.gather(*driver._background)

        def broken(payload: bytes) -> None:
            raise KeyError("a defect in the evidence handler")

        driver._evidence_received = broken  # type: ignore[assignment,method-assign]
        await driver.on_message(f"{PREFIX}/consensus/evidence", b"\x80")
        store.close()
        return metrics

    metrics = asyncio.run(scenario())
    # only the request for rounds from 0 is answered (round 0 is the one committed)
    assert [unpack(p)["entries"][0]["round"] for _, p in sent] == [0]
    # the injected defect, and nothing before it, was an error of the node's own
    assert metrics.internal_errors.labels(stage="consensus")._value.get() == 1


def _widest_record(dim: int) -> bytes:
    longest = max((reason for reason in Reason), key=lambda r: len(str(r)))
    entry = EmbeddingEntry(Modality.VIDEO, b"\xff" * (2 * dim), False)
    return RoundRecord(
        b"i" * 32,
        b"s" * 32,
        "rejected",
        longest,
        2**64 - 1,
        (entry, entry),
        2**64 - 1,
        (2**64 - 1, 2**64 - 1),
        2**64 - 1,
        2**64 - 1,
        (b"h" * 32, b"k" * 32),
    ).to_bytes()


@pytest.mark.parametrize(("max_records", "dim"), [(256, 256), (16, 1024), (1, 8)])
def test_an_honest_proposal_of_max_records_widest_records_fits_the_bound(max_records, dim):
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    committee = Committee(0, 1, 10, (Member("solo", me, 1),))
    machine = RoundMachine(committee, me, signer, first_round=0, beacon=b"b" * 32)
    build = next(a for a in machine.round_closed(0) if isinstance(a, BuildProposal))
    actions = machine.proposal_built(0, build.view, [_widest_record(dim)] * max_records)
    [proposal] = [a.message for a in actions if isinstance(a, Broadcast)][:1]
    assert len(encode_proposal(proposal)) <= proposal_bytes_max(max_records, dim)


def test_proposals_and_evidence_larger_than_an_honest_members_are_refused_unread(
    tmp_path: Path,
):
    """Found from the outside: a member's 20 MiB proposals for future rounds were held
    until their round (up to 64 MiB each, per round, view and member)."""
    committee, (me, _) = members(2)

    async def nowhere(topic: str, payload: bytes) -> None:
        raise AssertionError("nothing is published")

    async def scenario() -> Metrics:
        store = StoreThread(Store(tmp_path / "s.db"))
        metrics = Metrics(CollectorRegistry())
        sync = SyncService(me, committee, PREFIX, store, nowhere)
        driver = _driver(committee, me, store, metrics, sync)
        limit = proposal_bytes_max(load_config().rounds.max_records, 8)
        await driver.on_message(f"{PREFIX}/consensus/proposals", b"\x00" * (limit + 1))
        await driver.on_message(f"{PREFIX}/consensus/evidence", b"\x00" * (2 * limit + 4097))
        await driver.on_message(f"{PREFIX}/consensus/proposals", b"\x00" * limit)  # malformed
        store.close()
        return metrics

    metrics = asyncio.run(scenario())
    assert metrics.consensus_rejected.labels(reason="too_large")._value.get() == 2
    assert metrics.consensus_rejected.labels(reason="malformed")._value.get() == 1


def test_evidence_about_rounds_nobody_decides_is_refused(tmp_path: Path):
    """Found from the outside: a member's proof of its own equivocation at round
    2**63 - 1 was kept, counted and listed by the audit. Evidence is held to the
    window of every other consensus message."""
    committee, (me, other) = members(2)

    async def nowhere(topic: str, payload: bytes) -> None:
        raise AssertionError("nothing is published")

    def equivocation(round_number: int) -> bytes:
        signed = []
        for records in ((b"a",), (b"b",)):
            proposal = Proposal(round_number, 0, other.key.public_key, records, NO_VIEW)
            signed.append(SignedProposal(proposal, other.sign(Proposal.DOMAIN, proposal.body())))
        return encode_evidence(Evidence(signed[0], signed[1]))

    async def scenario() -> tuple[Metrics, int]:
        store = StoreThread(Store(tmp_path / "s.db"))
        metrics = Metrics(CollectorRegistry())
        sync = SyncService(me, committee, PREFIX, store, nowhere)
        driver = _driver(committee, me, store, metrics, sync)
        driver._machine = RoundMachine(committee, me.key.public_key, me)  # at round 0
        for round_number in (2**63 - 1, 8, 0):
            await driver.on_message(f"{PREFIX}/consensus/evidence", equivocation(round_number))
        kept = len(store.store.evidence())
        store.close()
        return metrics, kept

    metrics, kept = asyncio.run(scenario())
    assert metrics.consensus_rejected.labels(reason="evidence_too_far_ahead")._value.get() == 2
    assert kept == 1  # round 0, the round being decided
    assert metrics.equivocations.labels(member="v1")._value.get() == 1


def test_a_fetched_round_is_taken_only_with_its_view_proposers_proposal(tmp_path: Path):
    """A member answering sync could send a certified value in a proposal it signed
    itself: the round would be refused (not_proposer) after the reply was chosen, and
    a liar answering first would hold the requester back. Such a reply is passed over."""
    from consensus.messages import QuorumCertificate, Value, Vote, VoteKind
    from node.rounds.consensus_wire import encode_certificate, encode_signed

    committee, signers = members(3)
    me = signers[0]
    store = StoreThread(Store(tmp_path / "s.db"))
    driver = _driver(committee, me, store, Metrics(CollectorRegistry()), None)  # type: ignore[arg-type]
    driver._machine = RoundMachine(committee, me.key.public_key, me)  # at round 0
    by_key = {s.key.public_key: s for s in signers}
    proposer = by_key[driver.machine.proposer(0).public_key]
    other = next(s for s in signers if s is not proposer)
    records = (b"r",)
    value_hash = Value(0, records).digest(me)
    votes = []
    for voter in signers:
        vote = Vote(VoteKind.PRECOMMIT, 0, 0, voter.key.public_key, value_hash)
        votes.append((voter.key.public_key, voter.sign(Vote.DOMAIN, vote.body())))
    certificate = encode_certificate(QuorumCertificate(0, 0, value_hash, tuple(votes)))

    def proposal_by(signer: MessageSigner) -> bytes:
        proposal = Proposal(0, 0, signer.key.public_key, records, NO_VIEW)
        return encode_signed(
            SignedProposal(proposal, signer.sign(Proposal.DOMAIN, proposal.body()))
        )

    assert driver._valid_round(FetchedRound(0, certificate, proposal_by(proposer)))
    assert not driver._valid_round(FetchedRound(0, certificate, proposal_by(other)))
    store.close()


@pytest.mark.parametrize(
    ("failure", "lasting"),
    [
        (EncoderUnavailable("encoder workers died twice"), False),
        (KeyError("a defect"), False),
        (Unavailable("unknown here and to peers"), False),
        (Undecided("decoding took longer than 8 s and was stopped"), False),
        (Mismatch("embedding differs by 0.3"), True),
    ],
)
def test_only_a_judgement_of_the_value_refuses_it_past_its_view(
    tmp_path: Path, failure: Exception, lasting: bool
):
    """A check that raised anything but Mismatch was never answered: the value stayed
    'being verified' for the rest of the round, and this member never prevoted it,
    in any view. Now the machine hears 'no, for this view'; so it does where the
    bytes were out of reach or their decoding was stopped here (under load, one
    member times out on an item the others decode, and a verdict kept for the
    round would leave it out of every later view's quorum)."""
    from consensus.actions import VerifyProposal

    committee, (me, _) = members(2)
    store = StoreThread(Store(tmp_path / "s.db"))
    metrics = Metrics(CollectorRegistry())
    driver = _driver(committee, me, store, metrics, None)  # type: ignore[arg-type]
    heard: list[tuple[int, bytes, bool, bool]] = []

    class Machine:
        next_round = 0

        def value_verified(self, round_number, value_hash, ok, *, lasting=True):
            heard.append((round_number, value_hash, ok, lasting))
            return []

        def proposer(self, view):
            return committee.members[view % len(committee.members)]

    class Verifier:
        async def check(self, records, before_round=None, *, round_number=None):
            raise failure

    driver._machine = Machine()  # type: ignore[assignment]
    driver._verifier = Verifier()  # type: ignore[assignment]
    asyncio.run(driver._verify(VerifyProposal(0, 1, b"h" * 32, (b"r",))))
    store.close()
    assert heard == [(0, b"h" * 32, False, lasting)]
    expected = 1 if isinstance(failure, KeyError) else 0
    assert metrics.internal_errors.labels(stage="consensus")._value.get() == expected
