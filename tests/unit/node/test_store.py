"""The store on a real SQLite file: admission, rejections, commits, outbox."""

import sqlite3
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.store.sqlite import (
    EVIDENCE_PER_OFFENDER,
    Admission,
    CommittedRound,
    Finalization,
    Outgoing,
    State,
    Store,
)

WINDOW = 600_000


def admit(store, ident, submitter=b"s" * 32, nonce=1, hashes=(b"h" * 32,), now=1_000_000):
    return store.admit(ident, submitter, nonce, now, list(hashes), b"raw", now, 0, WINDOW)


def test_admission_replay_duplicate_and_redelivery(tmp_path):
    store = Store(tmp_path / "s.db")
    assert admit(store, b"a" * 32) is Admission.ADMITTED
    assert admit(store, b"a" * 32) is Admission.KNOWN
    assert admit(store, b"b" * 32, nonce=1, hashes=[b"x" * 32]) is Admission.REPLAY
    assert admit(store, b"c" * 32, nonce=2) is Admission.DUPLICATE
    assert (
        admit(store, b"d" * 32, nonce=2, submitter=b"t" * 32, hashes=[b"y" * 32])
        is Admission.ADMITTED
    )


@pytest.mark.parametrize("high", [2**63 - 1, 2**63, 2**64 - 1])
def test_every_uint64_nonce_is_stored_and_its_replay_found(tmp_path, high):
    """SQLite's INTEGER is signed: a nonce of 2**63 or more must still be stored
    (it raised OverflowError, and killed the node), and stay distinct."""
    store = Store(tmp_path / "s.db")
    assert admit(store, b"a" * 32, nonce=high) is Admission.ADMITTED
    assert store.replayed(b"s" * 32, high)
    assert admit(store, b"b" * 32, nonce=high, hashes=[b"x" * 32]) is Admission.REPLAY
    for other in (high - 1, (high + 1) % 2**64, high ^ 2**63):  # other nonces
        assert not store.replayed(b"s" * 32, other)
    assert store.reject(
        b"c" * 32, b"s" * 32, "duplicate", 5, Outgoing("t", b"r"), nonce=(2**64 - 2, 1_000_000)
    )
    assert store.replayed(b"s" * 32, 2**64 - 2)


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "s.db"
    store = Store(path)
    admit(store, b"a" * 32)
    store.close()
    again = Store(path)
    assert admit(again, b"b" * 32, nonce=1, hashes=[b"z" * 32]) is Admission.REPLAY
    assert [s.id for s in again.submissions_in(State.RECEIVED)] == [b"a" * 32]


def test_rejection_releases_data_claims_and_queues_its_result(tmp_path):
    store = Store(tmp_path / "s.db")
    admit(store, b"a" * 32)
    assert store.reject(b"a" * 32, b"s" * 32, "undecodable", 5, Outgoing("t", b"r"))
    assert store.submission_state(b"a" * 32) == (State.REJECTED, "undecodable")
    assert admit(store, b"b" * 32, nonce=9) is Admission.ADMITTED  # same data, now free
    assert [(e.topic, e.payload) for e in store.outbox(0, 10)] == [("t", b"r")]
    assert not store.reject(b"a" * 32, b"s" * 32, "stale", 6, Outgoing("t", b"again"))


def test_commit_is_once_per_round_and_pays_once(tmp_path):
    store = Store(tmp_path / "s.db")
    admit(store, b"a" * 32)
    assert store.accept(b"a" * 32, b"prepared", Outgoing("t", b"accepted"))
    assert not store.accept(b"a" * 32, b"prepared", Outgoing("t", b"accepted"))
    committed = CommittedRound(3, b"p" * 32, b"b" * 32, b"cert", b"summary")
    outcome = Finalization(
        b"a" * 32,
        b"s" * 32,
        State.FINAL,
        None,
        ((0, "text", b"v1"), (1, "image", b"v2")),
        (b"h" * 32, b"k" * 32),
        70,
    )
    assert store.accepted_hashes([b"h" * 32, b"x" * 32]) == set()
    assert store.commit_round(committed, [outcome], [Outgoing("t", b"final")], 9)
    assert not store.commit_round(committed, [outcome], [Outgoing("t", b"final")], 9)
    assert store.balances() == {b"s" * 32: 70}
    assert store.history_items() == [("text", b"v1"), ("image", b"v2")]
    assert store.accepted_hashes([b"h" * 32, b"x" * 32]) == {b"h" * 32}
    assert store.accepted_hashes([b"h" * 32], before_round=3) == set()  # an audit's replay
    assert store.accepted_hashes([b"h" * 32], before_round=4) == {b"h" * 32}
    assert store.last_round() == committed
    assert store.submission_state(b"a" * 32) == (State.FINAL, None)
    entries = store.outbox(0, 10)
    assert [e.payload for e in entries] == [b"accepted", b"final"]
    store.published([entries[0].seq])
    assert [e.payload for e in store.outbox(0, 10)] == [b"final"]


def test_a_signed_message_is_never_replaced_and_is_pruned_at_commit(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store.record_signed(4, 0, "prevote", b"first") == b"first"
    assert store.record_signed(4, 0, "prevote", b"second") == b"first"
    assert store.record_signed(4, 1, "prevote", b"view1") == b"view1"
    assert store.record_signed(4, 1, "precommit", b"pc") == b"pc"
    assert store.record_signed(5, 0, "proposal", b"p5") == b"p5"
    assert store.signed_since(4) == [b"first", b"pc", b"view1", b"p5"]
    assert store.signed_since(5) == [b"p5"]
    committed = CommittedRound(4, b"v" * 32, b"b" * 32, b"cert", b"summary")
    assert store.commit_round(committed, [], [], 1, prune_signed_before=5)
    assert store.signed_since(0) == [b"p5"]


def test_a_certified_record_never_flips_a_decided_submission(tmp_path):
    """A locally rejected or finalized submission keeps its state; the ledger pays once."""
    store = Store(tmp_path / "s.db")
    admit(store, b"a" * 32)
    store.reject(b"a" * 32, b"s" * 32, "rate_limited", 5, Outgoing("t", b"rejected"))
    admit(store, b"b" * 32, nonce=2, hashes=[b"q" * 32])
    store.accept(b"b" * 32, b"prepared", Outgoing("t", b"accepted"))
    outcomes = [
        Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, ((0, "text", b"va"),), (), 10),
        Finalization(b"b" * 32, b"s" * 32, State.FINAL, None, ((0, "text", b"vb"),), (), 20),
    ]
    assert store.decided_states([b"a" * 32, b"b" * 32]) == {b"a" * 32: State.REJECTED}
    assert store.commit_round(CommittedRound(1, b"v" * 32, b"b" * 32, b"c", b"s"), outcomes, [], 9)
    assert store.submission_state(b"a" * 32) == (State.REJECTED, "rate_limited")
    assert store.submission_state(b"b" * 32) == (State.FINAL, None)
    # the same records certified again in another round (a replay) pay nothing more
    assert store.commit_round(CommittedRound(2, b"w" * 32, b"b" * 32, b"c", b"s"), outcomes, [], 9)
    assert store.balances() == {b"s" * 32: 30}
    assert store.history_items() == [("text", b"va"), ("text", b"vb")]


def test_a_store_of_the_old_schema_is_refused_with_a_message(tmp_path):
    import sqlite3

    import pytest

    from node.store.sqlite import StoreError

    path = tmp_path / "old.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"1",))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema 1"):
        Store(path)


def test_conflict_of_names_a_nonce_or_data_held_here(tmp_path):
    store = Store(tmp_path / "s.db")
    admit(store, b"a" * 32)
    assert store.conflict_of(b"s" * 32, 1, [b"z" * 32]) is Admission.REPLAY
    assert store.conflict_of(b"s" * 32, 7, [b"h" * 32]) is Admission.DUPLICATE
    assert store.conflict_of(b"s" * 32, 7, [b"z" * 32]) is None
    # duplicates are judged per item: a pair with one new item is not refused here
    assert store.conflict_of(b"s" * 32, 7, [b"h" * 32, b"z" * 32]) is None
    assert admit(store, b"c" * 32, nonce=8, hashes=[b"h" * 32, b"z" * 32]) is Admission.ADMITTED


def test_bytes_of_a_round_learned_by_sync_are_kept_when_they_arrive(tmp_path):
    store = Store(tmp_path / "s.db")
    outcome = Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, ((0, "text", b"v"),), (), 0)
    store.commit_round(CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"), [outcome], [], 1)
    assert store.knows(b"a" * 32)
    assert store.missing_raw([b"a" * 32, b"z" * 32]) == [b"a" * 32]
    assert store.finals_without_bytes(10) == [b"a" * 32]  # what a restart asks peers for
    assert store.keep_raw(b"a" * 32, b"raw")
    assert not store.keep_raw(b"a" * 32, b"other")  # kept once
    assert store.raw_submission(b"a" * 32) == b"raw"
    assert store.missing_raw([b"a" * 32]) == []
    assert store.finals_without_bytes(10) == []


def test_bytes_of_a_submission_this_members_intake_refused_but_a_round_certified_are_kept(
    tmp_path,
):
    """Found from the outside: a member that lagged refused a burst `rate_limited`; the
    committee certified those submissions `final`. Its row rightly stays `rejected`
    (its one Result), but it never fetched their bytes, could not serve them, and
    `poc-node audit` failed on its store. A certified round's submissions are wanted
    whatever the member's own row says; a refused one no round holds is not kept."""
    store = Store(tmp_path / "s.db")
    refused, never = b"r" * 32, b"n" * 32
    for identity in (refused, never):
        store.reject(identity, b"s" * 32, "rate_limited", 1, Outgoing("t", b"x"))
    final = Finalization(refused, b"s" * 32, State.FINAL, None, ((0, "text", b"v"),), (), 5)
    expired = Finalization(b"e" * 32, b"s" * 32, State.REJECTED, "expired", (), (), 0)
    assert store.commit_round(
        CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"), [final, expired], [], 2
    )
    assert store.decided_states([refused]) == {refused: State.REJECTED}  # its own row stays
    assert store.missing_raw([refused, never, b"e" * 32]) == [refused]
    assert store.finals_without_bytes(10) == [refused]
    assert not store.keep_raw(never, b"flood")  # no round holds it: not kept
    assert not store.keep_raw(b"e" * 32, b"expired")
    assert store.keep_raw(refused, b"raw")
    assert store.raw_submission(refused) == b"raw"
    assert store.missing_raw([refused]) == [] and store.finals_without_bytes(10) == []
    assert store.raw_submission(never) is None


def test_bytes_fetched_to_verify_stay_for_a_certified_submission_only(tmp_path):
    store = Store(tmp_path / "s.db")
    store.reject(b"r" * 32, b"s" * 32, "rate_limited", 1, Outgoing("t", b"x"))
    for identity in (b"r" * 32, b"o" * 32):  # both fetched to verify round 3's proposals
        store.keep_fetched(identity, b"raw " + identity[:1], 3)
    assert store.raw_submission(b"o" * 32) == b"raw o"  # served to peers meanwhile
    final = Finalization(b"r" * 32, b"s" * 32, State.FINAL, None, (), (), 0)
    store.commit_round(CommittedRound(3, b"v" * 32, b"b" * 32, b"c", b"s"), [final], [], 2)
    assert store.raw_submission(b"r" * 32) == b"raw r"
    assert store.raw_submission(b"o" * 32) is None  # in a value that was not decided


def test_bytes_that_were_verified_while_sync_finalized_them_are_kept(tmp_path):
    """The intake found the submission unknown, verified it, and meanwhile a round
    learned by sync finalized it: admission answers KNOWN and keeps its bytes."""
    store = Store(tmp_path / "s.db")
    outcome = Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, ((0, "text", b"v"),), (), 0)
    store.commit_round(CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"), [outcome], [], 1)
    assert admit(store, b"a" * 32) is Admission.KNOWN
    assert store.raw_submission(b"a" * 32) == b"raw"
    assert store.missing_raw([b"a" * 32]) == []
    assert admit(store, b"a" * 32) is Admission.KNOWN  # once more: nothing changes
    assert store.raw_submission(b"a" * 32) == b"raw"


def test_a_round_reads_waiting_submissions_without_their_bytes(tmp_path):
    store = Store(tmp_path / "s.db")
    for index, intake_round in enumerate((1, 5, 9)):
        ident = bytes([index]) * 32
        store.admit(
            ident, b"s" * 32, index, 1, [ident], b"x" * 1_000_000, 1 + index, intake_round, WINDOW
        )
        assert store.accept(ident, f"prepared {index}".encode(), Outgoing("t", b"a"))
    admit(store, b"r" * 32, nonce=99, hashes=[b"r" * 32])  # received, not yet prepared
    waiting = store.waiting(10)
    assert [w.id for w in waiting] == [bytes([i]) * 32 for i in range(3)]  # oldest first
    assert [w.prepared for w in waiting] == [b"prepared 0", b"prepared 1", b"prepared 2"]
    assert [w.intake_round for w in waiting] == [1, 5, 9]
    assert [w.id for w in store.waiting(2)] == [bytes([0]) * 32, bytes([1]) * 32]
    assert [w.id for w in store.waiting(10, min_intake_round=5)] == [
        bytes([1]) * 32,
        bytes([2]) * 32,
    ]
    assert store.expiring(5) == [(bytes([0]) * 32, b"s" * 32)]


def test_an_expired_submission_loses_its_bytes_a_final_one_keeps_them(tmp_path):
    store = Store(tmp_path / "s.db")
    admit(store, b"a" * 32)
    admit(store, b"b" * 32, nonce=2, hashes=[b"y" * 32])
    for ident in (b"a" * 32, b"b" * 32):
        store.accept(ident, b"p", Outgoing("t", b"a"))
    outcomes = [
        Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, ((0, "text", b"v"),), (), 5),
        Finalization(b"b" * 32, b"s" * 32, State.REJECTED, "expired", (), (), 0),
    ]
    assert store.commit_round(CommittedRound(0, b"v" * 32, b"b" * 32, b"c", b"s"), outcomes, [], 1)
    assert store.raw_submission(b"a" * 32) == b"raw"
    assert store.raw_submission(b"b" * 32) is None
    assert store.submission_state(b"b" * 32) == (State.REJECTED, "expired")


def test_a_store_of_schema_3_is_migrated_keeping_every_submission_s_bytes(tmp_path):
    import sqlite3

    path = tmp_path / "v3.db"
    store = Store(path)
    admit(store, b"a" * 32)
    store.close()
    # Schema 3 kept the bytes in the submissions row.
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE submissions ADD COLUMN raw BLOB")
    db.execute(
        "UPDATE submissions SET raw = (SELECT raw FROM submission_bytes b "
        "WHERE b.id = submissions.id)"
    )
    db.execute("DROP TABLE submission_bytes")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (b"3",))
    db.commit()
    db.close()
    again = Store(path)
    assert again.get_meta("schema_version") == b"4"
    assert again.raw_submission(b"a" * 32) == b"raw"
    assert [s.raw for s in again.submissions_in(State.RECEIVED)] == [b"raw"]
    columns = [row[1] for row in again._db.execute("PRAGMA table_info(submissions)")]
    assert "raw" not in columns


def test_history_is_read_in_chunks_of_float16_rows_in_commit_order(tmp_path):
    import numpy as np
    import pytest

    from node.store.sqlite import StoreError

    store = Store(tmp_path / "s.db")
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((7, 4)).astype("<f2")
    labels = ["text", "image", "image", "audio", "text", "video", "image"]
    for number, (start, stop) in enumerate(((0, 3), (3, 5), (5, 7))):
        outcomes = [
            Finalization(
                bytes([i]) * 32,
                b"s" * 32,
                State.FINAL,
                None,
                ((0, labels[i], vectors[i].tobytes()),),
                (),
                0,
            )
            for i in range(start, stop)
        ]
        store.commit_round(
            CommittedRound(number, b"v" * 32, b"b" * 32, b"c", b"s"), outcomes, [], 1
        )
    chunks = list(store.history_chunks(4, chunk_rows=3))
    assert [len(m) for m, _ in chunks] == [3, 3, 1]
    assert all(v.dtype == np.float16 and v.shape == (len(m), 4) for m, v in chunks)
    assert [m for ms, _ in chunks for m in ms] == labels
    assert (np.concatenate([v for _, v in chunks]) == vectors).all()
    assert [
        (m, v.tobytes()) for ms, vs in chunks for m, v in zip(ms, vs, strict=True)
    ] == store.history_items()
    early = list(store.history_chunks(4, before_round=2))  # an audit's replay of round 2
    assert len(early) == 1 and early[0][0] == labels[:5]
    assert list(store.history_chunks(4, before_round=0)) == []
    with pytest.raises(StoreError, match="not 5 float16"):
        list(store.history_chunks(5))


def test_known_ids_answer_from_other_threads_read_only(tmp_path):
    """The intake asks whether it knows a message on the verifier's threads: each
    reads committed rows through its own read-only connection."""
    store = Store(tmp_path / "s.db")
    known = store.known_ids()
    admit(store, b"a" * 32)
    store.reject(b"r" * 32, b"s" * 32, "malformed", 1_000_000, Outgoing("results/s", b"r"))
    asked = [b"a" * 32, b"r" * 32, b"z" * 32]
    with ThreadPoolExecutor(max_workers=3) as pool:
        answers = list(pool.map(known, asked * 3))
    assert answers == [True, True, False] * 3
    admit(store, b"z" * 32, nonce=2, hashes=[b"y" * 32])  # written later, seen at once
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(known, b"z" * 32).result()
        db = pool.submit(lambda: (known(b"a" * 32), known._local.db)).result()[1]
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            pool.submit(db.execute, "DELETE FROM submissions").result()


def test_evidence_against_one_member_is_kept_up_to_a_cap(tmp_path):
    """One proof is enough; a member that equivocates without end must not fill the disk,
    nor crowd out the proofs against another."""
    store = Store(tmp_path / "s.db")
    for number in range(EVIDENCE_PER_OFFENDER + 10):
        kept = store.record_evidence(number, 0, "prevote", b"m" * 32, b"proof %d" % number, 1)
        assert kept == (number < EVIDENCE_PER_OFFENDER)
    assert store.record_evidence(0, 0, "prevote", b"o" * 32, b"another member's proof", 1)
    assert len(store.evidence()) == EVIDENCE_PER_OFFENDER + 1
