"""A leader's records against this node's own computation."""

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from encoders.modality import Modality
from node.errors import Reason
from node.intake.wire import WireLimits
from node.ops.config import load_config
from node.rounds.records import (
    Candidate,
    Prepared,
    PreparedItem,
    RoundRecord,
    RoundRules,
    score_round,
    to_float16,
)
from node.rounds.verify import Mismatch, RecordVerifier, Tolerances
from node.store.sqlite import Store
from node.store.thread import StoreThread
from rewards.curiosity import ScoringRules
from rewards.history import History

CONFIG = load_config()
DELTA = 0.5
RULES = RoundRules(
    ScoringRules(16, 1.0, dict.fromkeys(["text", "image", "audio", "video"], 1e-6)),
    CONFIG.scoring.emission,
    CONFIG.scoring.top_k,
)


CENTRE = np.ones(16) / 4.0


def unit(seed: int, spread: float = 0.005) -> np.ndarray:
    """Near the centre of the history's cluster, so that items qualify and earn."""
    vector = CENTRE + spread * np.random.default_rng(seed).standard_normal(16)
    return vector / np.linalg.norm(vector)


def prepared(seed: int, pair: bool, distance: float = 0.3) -> Prepared:
    modalities = [Modality.TEXT, Modality.IMAGE] if pair else [Modality.TEXT]
    too_far = pair and distance > DELTA
    items = tuple(
        PreparedItem(
            m,
            to_float16(unit(seed + i)),
            pair and not too_far,
            900_000,
            bytes([seed % 256, i]) * 16,
            to_float16(unit(seed + 50 + i)) if pair and not too_far else None,
        )
        for i, m in enumerate(modalities)
    )
    return Prepared(0, items, round(distance * 1e6) if pair else None, too_far)


def make(tmp_path: Path, mine: dict[bytes, Prepared], history_size: int = 80):
    store = Store(tmp_path / "s.db")
    for identity, prep in mine.items():
        store.admit(
            identity,
            b"s" * 32,
            int.from_bytes(identity[:4], "big"),
            0,
            [identity],
            b"raw",
            0,
            0,
            600_000,
        )
        store.accept(identity, prep.to_bytes(), _outgoing())
    history = cluster_history(history_size)

    async def no_recompute(submission, epoch):
        raise AssertionError("everything is prepared locally")

    async def no_fetch(ids):
        return {}

    verifier = verifier_over(store, no_recompute, no_fetch, history)
    candidates = [Candidate(i, b"s" * 32, p) for i, p in mine.items()]
    records = score_round(candidates, history, RULES, set())
    return verifier, records


def verifier_over(store: Store, recompute, fetch, history: History) -> RecordVerifier:
    return RecordVerifier(
        StoreThread(store),
        recompute,
        fetch,
        lambda a, b: DELTA,
        history,
        RULES,
        Tolerances(0.02, 20_000, 1_000),
        WireLimits(),
        asyncio.Lock(),
    )


def cluster_history(size: int = 80) -> History:
    history = History(16)
    history.add(["image"] * size, np.stack([unit(1000 + i, 0.05) for i in range(size)]))
    return history


def _outgoing():
    from node.store.sqlite import Outgoing

    return Outgoing("t", b"x")


def check(verifier: RecordVerifier, records: list[RoundRecord]) -> None:
    asyncio.run(verifier.check([r.to_bytes() for r in records]))


MINE = {bytes([i]) * 32: prepared(i * 10, pair=i % 2 == 0) for i in range(1, 6)}


def test_the_leaders_honest_records_are_accepted(tmp_path: Path):
    verifier, records = make(tmp_path, MINE)
    assert any(r.reward for r in records)
    check(verifier, records)


def test_an_audit_judges_a_record_certified_before_own_embeddings_as_it_was(tmp_path: Path):
    """Rounds certified by a release whose records carried no own embeddings: live
    members refuse such a record, an audit of the old round does not."""
    from node.rounds.records import compare_record

    _, records = make(tmp_path, MINE)
    identity, record = next((r.submission_id, r) for r in records if r.own_vectors)
    older = dataclasses.replace(record, own_vectors=())
    tolerances = Tolerances(0.02, 20_000, 1_000)
    with pytest.raises(Mismatch, match="own embeddings missing"):
        compare_record(MINE[identity], older, lambda a, b: DELTA, tolerances)
    compare_record(MINE[identity], older, lambda a, b: DELTA, tolerances, own_required=False)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: dataclasses.replace(r, own_vectors=()),
        lambda r: dataclasses.replace(r, own_vectors=r.own_vectors[:1]),
        lambda r: dataclasses.replace(r, own_vectors=(to_float16(-unit(999)), r.own_vectors[1])),
        lambda r: dataclasses.replace(r, own_vectors=(b"\x00" * 31, r.own_vectors[1])),
    ],
)
def test_a_pair_record_without_its_own_embeddings_is_refused(tmp_path: Path, tamper):
    """Near-duplicates are judged on a pair's own embeddings too: a proposer that
    leaves them out, or puts others, would let copies of paid data through."""
    verifier, records = make(tmp_path, MINE)
    paired = next(i for i, r in enumerate(records) if r.own_vectors)
    assert len(records[paired].own_vectors) == 2
    check(verifier, records)
    records[paired] = tamper(records[paired])
    with pytest.raises(Mismatch, match="own embedding"):
        check(verifier, records)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: dataclasses.replace(r, reward=r.reward + 1),
        lambda r: dataclasses.replace(r, score=r.score + 5),
        lambda r: dataclasses.replace(r, scores_ppm=tuple(s + 5000 for s in r.scores_ppm)),
        lambda r: dataclasses.replace(r, scores_ppm=(None,) * len(r.scores_ppm)),
        lambda r: dataclasses.replace(
            r, status="rejected", reason=Reason.DUPLICATE, scores_ppm=None, score=0, reward=0
        ),
        lambda r: dataclasses.replace(r, item_sha256=tuple(b"\x00" * 32 for _ in r.item_sha256)),
        lambda r: dataclasses.replace(
            r,
            embeddings=tuple(
                dataclasses.replace(e, vector=to_float16(-unit(999))) for e in r.embeddings
            ),
        ),
        lambda r: dataclasses.replace(r, submitter=b"x" * 32),
    ],
)
def test_a_false_record_is_refused(tmp_path: Path, tamper):
    verifier, records = make(tmp_path, MINE)
    best = max(range(len(records)), key=lambda i: records[i].reward)
    records[best] = tamper(records[best])
    with pytest.raises(Mismatch):
        check(verifier, records)


def test_unsorted_records_and_unknown_submissions_are_refused(tmp_path: Path):
    verifier, records = make(tmp_path, MINE)
    with pytest.raises(Mismatch, match="sorted"):
        check(verifier, records[::-1])
    stranger = dataclasses.replace(records[0], submission_id=b"\xff" * 32)
    with pytest.raises(Mismatch, match="unknown"):
        check(verifier, [*records, stranger])


def test_a_decision_near_delta_follows_the_leader(tmp_path: Path):
    identity = b"\x07" * 32
    near = prepared(70, pair=True, distance=DELTA + 0.01)  # mine: too far
    verifier, _ = make(tmp_path, {identity: near})
    leader_view = dataclasses.replace(
        near,
        too_far=False,
        pair_distance_ppm=round((DELTA - 0.005) * 1e6),
        items=tuple(dataclasses.replace(i, fused=True, own=i.vector) for i in near.items),
    )
    history = cluster_history()
    records = score_round([Candidate(identity, b"s" * 32, leader_view)], history, RULES, set())
    check(verifier, records)
    far_view = dataclasses.replace(leader_view, pair_distance_ppm=round((DELTA - 0.2) * 1e6))
    records = score_round([Candidate(identity, b"s" * 32, far_view)], history, RULES, set())
    with pytest.raises(Mismatch):
        check(verifier, records)


def test_records_of_a_finalized_submission_are_refused_a_replay_of_a_committed_round(
    tmp_path: Path,
):
    """A proposer replaying records already committed gets its value refused."""
    from node.store.sqlite import CommittedRound, Finalization, State

    verifier, records = make(tmp_path, MINE)
    check(verifier, records)
    store = Store(tmp_path / "s.db")
    first = records[0]
    store.commit_round(
        CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"),
        [Finalization(first.submission_id, first.submitter, State.FINAL, None, (), (), 0)],
        [],
        1,
    )
    store.close()
    with pytest.raises(Mismatch, match="final here already"):
        check(verifier, records)


def test_a_submission_rejected_by_this_members_own_intake_is_judged_on_its_content(tmp_path: Path):
    """rate_limited here but accepted by the proposer: recomputed, not refused outright."""
    from node.store.sqlite import Outgoing

    verifier, records = make(tmp_path, MINE)
    store = Store(tmp_path / "s.db")
    store.reject(b"\x09" * 32, b"s" * 32, "rate_limited", 5, Outgoing("t", b"r"))
    store.close()
    ninth = dataclasses.replace(records[0], submission_id=b"\x09" * 32)
    with pytest.raises(Mismatch, match="unknown here and to peers"):  # no bytes to recompute
        check(verifier, [*records, ninth])


def test_a_value_with_more_records_than_a_round_holds_is_refused(tmp_path: Path):
    """A flood must not make one proposal outgrow the broker's packet limit."""
    verifier, records = make(tmp_path, MINE)
    verifier._max_records = len(records) - 1
    with pytest.raises(Mismatch, match="max_records"):
        check(verifier, records)
    verifier._max_records = len(records)
    check(verifier, records)


def test_an_unknown_submission_is_refused_for_a_seen_nonce_but_not_for_repeated_data(
    tmp_path: Path,
):
    """Replays are refused outright; repeated data is the round's per-item business."""
    import hashlib
    import time

    from tests.peer import Peer, submission_id

    peer = Peer()
    data = b"a caption this member already holds"
    raw = peer.submission([("text", "text/plain", data)])
    identity = submission_id(raw)
    prepared_here = Prepared(
        0,
        (
            PreparedItem(
                Modality.TEXT, to_float16(unit(3)), False, 900_000, hashlib.sha256(data).digest()
            ),
        ),
        None,
        False,
    )

    async def recompute(submission, epoch):
        return prepared_here

    async def fetch(ids):
        return {identity: raw}

    def over(store: Store) -> RecordVerifier:
        return verifier_over(store, recompute, fetch, cluster_history())

    records = score_round(
        [Candidate(identity, peer.public, prepared_here)], cluster_history(), RULES, set()
    )
    now = time.time_ns() // 10**6
    # another message of this member's store claims the same data: judged on content, accepted
    held = Store(tmp_path / "held.db")
    held.admit(
        b"\x66" * 32, b"o" * 32, 1, now, [hashlib.sha256(data).digest()], b"r", now, 0, 600_000
    )
    check(over(held), records)
    # the same key and nonce were seen here: a replay, refused
    seen = Store(tmp_path / "seen.db")
    seen.admit(b"\x77" * 32, peer.public, peer.nonce, now, [b"q" * 32], b"r", now, 0, 600_000)
    with pytest.raises(Mismatch, match="nonce was seen"):
        check(over(seen), records)


def test_bytes_fetched_to_verify_are_kept_served_and_then_kept_or_dropped(tmp_path: Path):
    """Found from the outside: a proposer sent a submission to some members only; they
    verified its value with the bytes and kept nothing, so the others could never get
    them from anyone but the proposer. Fetched bytes are now served by sync like
    stored ones, until the round is decided; a certified submission keeps them."""
    import time

    from consensus.committee import Committee, Member
    from node.intake.codec import pack, unpack
    from node.intake.keys import SigningKey
    from node.intake.signing import MessageSigner
    from node.rounds.records import Unavailable
    from node.rounds.sync import SyncService
    from node.store.sqlite import CommittedRound, Finalization, State
    from tests.peer import Peer, submission_id

    peer = Peer()
    raws = [peer.submission([("text", "text/plain", f"caption {i}".encode())]) for i in range(2)]
    ids = [submission_id(raw) for raw in raws]
    here = {identity: prepared(40 + i, pair=False) for i, identity in enumerate(ids)}
    here = {  # recomputed with the bytes' own item hashes
        identity: dataclasses.replace(
            prep,
            items=(dataclasses.replace(prep.items[0], sha256=_item_hash(raw)),),
        )
        for (identity, prep), raw in zip(here.items(), raws, strict=True)
    }
    sent_by_proposer: dict[bytes, bytes] = dict(zip(ids, raws, strict=True))

    async def recompute(submission, epoch):
        return here[submission.id]

    async def fetch(wanted):
        return {i: sent_by_proposer[i] for i in wanted if i in sent_by_proposer}

    store = Store(tmp_path / "s.db")
    verifier = verifier_over(store, recompute, fetch, cluster_history())
    records = score_round(
        [Candidate(i, peer.public, p) for i, p in sorted(here.items())],
        cluster_history(),
        RULES,
        set(),
    )
    asyncio.run(verifier.check([r.to_bytes() for r in records], round_number=3))
    assert [store.raw_submission(i) for i in ids] == raws  # kept while round 3 is undecided

    # Another member asks: this one answers with the bytes it fetched.
    me, asker = MessageSigner(SigningKey.generate()), MessageSigner(SigningKey.generate())
    committee = Committee(
        0, 2, 60, (Member("a", me.key.public_key, 1), Member("b", asker.key.public_key, 1))
    )
    replies: list[bytes] = []

    async def publish(topic: str, payload: bytes) -> None:
        replies.append(payload)

    request = asker.signed_bytes(
        "poc/v1/sync-request",
        {
            "v": 1,
            "requester": asker.key.public_key,
            "request_id": b"r" * 16,
            "kind": "submissions",
            "ids": ids,
        },
    )
    asyncio.run(SyncService(me, committee, "poc", StoreThread(store), publish).on_request(request))
    assert unpack(replies[0])["entries"] == raws

    # The proposer withholds them from a member that has not got them: unavailable,
    # a verdict for the view only (the driver tells the machine so).
    sent_by_proposer.clear()
    verifier._store = StoreThread(Store(tmp_path / "elsewhere.db"))  # another member's
    with pytest.raises(Unavailable):
        asyncio.run(verifier.check([r.to_bytes() for r in records], round_number=3))
    verifier._store = StoreThread(store)

    # Round 3 decided with the first submission final: its bytes stay, the other's go.
    now = time.time_ns() // 10**6
    store.commit_round(
        CommittedRound(3, b"v" * 32, b"b" * 32, pack({"round": 3}), b"summary", b"p"),
        [Finalization(ids[0], peer.public, State.FINAL, None, (), (), 0)],
        [],
        now,
    )
    assert store.raw_submission(ids[0]) == raws[0]
    assert store.raw_submission(ids[1]) is None
    assert store.missing_raw(ids) == []


def _item_hash(raw: bytes) -> bytes:
    from node.intake.wire import WireLimits as Limits
    from node.intake.wire import parse_submission

    return parse_submission(raw, Limits()).items[0].sha256


@pytest.mark.parametrize(
    ("failure", "transient"),
    [
        ("decoding took longer than 8 s and was stopped", True),
        ("not a PNG image", False),
    ],
)
def test_a_decoding_stopped_here_refuses_for_the_view_only(
    tmp_path: Path, failure: str, transient: bool
):
    """A decoder timeout (or a decoder killed, or its memory cap) while verifying a
    fetched submission is this member's load, not the bytes: the others may have
    decoded them. It was a lasting mismatch, so under load one member could stay out
    of every later view's quorum of a value the others locked on."""
    from encoders.errors import DecodingStoppedError, UndecodableError
    from node.rounds.records import Transient, Undecided
    from tests.peer import Peer, submission_id

    peer = Peer()
    raw = peer.submission([("text", "text/plain", b"caption")])
    identity = submission_id(raw)
    prep = prepared(40, pair=False)
    prep = dataclasses.replace(
        prep, items=(dataclasses.replace(prep.items[0], sha256=_item_hash(raw)),)
    )
    error = (DecodingStoppedError if transient else UndecodableError)(failure)

    async def recompute(submission, epoch):
        raise error

    async def fetch(wanted):
        return {identity: raw}

    records = score_round([Candidate(identity, peer.public, prep)], cluster_history(), RULES, set())
    verifier = verifier_over(Store(tmp_path / "s.db"), recompute, fetch, cluster_history())
    with pytest.raises(Mismatch, match=failure) as refused:
        asyncio.run(verifier.check([r.to_bytes() for r in records], round_number=3))
    assert isinstance(refused.value, Undecided) is transient
    assert isinstance(refused.value, Transient) is transient


def test_a_proposer_leaves_out_a_record_it_would_refuse_itself(tmp_path: Path):
    """A submission prepared by the release that decided pairs on the exact distance
    (a pair half a ppm above δ, too far at δ's own ppm) would be refused by every
    member in every proposal that held it, and stall the committee: a proposer now
    checks its own records as it checks others' and leaves such a one out."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from consensus.committee import Committee, Member
    from node.bus.client import Topics
    from node.intake.keys import SigningKey
    from node.intake.signing import MessageSigner
    from node.ops.metrics import Metrics
    from node.rounds.driver import RoundDriver

    knife = bytes([9]) * 32
    stale = prepared(90, pair=True, distance=DELTA + 2e-7)
    assert stale.too_far and stale.pair_distance_ppm == round(DELTA * 1e6)
    verifier, _ = make(tmp_path, {**MINE, knife: stale})
    signers = [MessageSigner(SigningKey.generate()) for _ in range(2)]
    committee = Committee(
        0, 2, 60, tuple(Member(f"v{i}", s.key.public_key, 1) for i, s in enumerate(signers))
    )
    metrics = Metrics(CollectorRegistry())
    driver = RoundDriver(
        CONFIG,
        committee,
        signers[0],
        verifier._store,
        verifier._history,
        RULES,
        SimpleNamespace(),  # type: ignore[arg-type]  # the beacon chain: not used to build
        metrics,
        Topics("poc"),
        lambda: None,
        verifier=verifier,
    )
    records = [RoundRecord.from_bytes(r) for r in asyncio.run(driver._proposal_records(0))]
    assert sorted(r.submission_id for r in records) == sorted(MINE)
    assert metrics.internal_errors.labels(stage="consensus")._value.get() == 1
    check(verifier, records)  # what it proposes, every member accepts


def test_a_pair_prepared_before_own_embeddings_is_prepared_again(tmp_path: Path):
    """A member upgraded with a pair in its store, prepared with no own embeddings:
    it recomputes that pair from its bytes instead of refusing the proposer's record."""
    import hashlib
    import time

    from tests.media import image_bytes
    from tests.peer import Peer, submission_id

    peer = Peer()
    data = [b"a red star", image_bytes("RGB")]
    raw = peer.submission([("text", "text/plain", data[0]), ("image", "image/png", data[1])])
    identity = submission_id(raw)
    hashes = [hashlib.sha256(d).digest() for d in data]
    fresh = prepared(80, pair=True)
    fresh = dataclasses.replace(
        fresh,
        items=tuple(
            dataclasses.replace(i, sha256=h) for i, h in zip(fresh.items, hashes, strict=True)
        ),
    )
    older = dataclasses.replace(
        fresh, items=tuple(dataclasses.replace(i, own=None) for i in fresh.items)
    )
    assert older.stale
    store = Store(tmp_path / "s.db")
    now = time.time_ns() // 10**6
    store.admit(identity, peer.public, peer.nonce, now, hashes, raw, now, 0, 600_000)
    store.accept(identity, older.to_bytes(), _outgoing())
    recomputed = []

    async def recompute(submission, epoch):
        recomputed.append(submission.submitter)
        return fresh

    async def no_fetch(ids):
        return {}

    records = score_round(
        [Candidate(identity, peer.public, fresh)], cluster_history(), RULES, set()
    )
    check(verifier_over(store, recompute, no_fetch, cluster_history()), records)
    assert recomputed == [peer.public]
