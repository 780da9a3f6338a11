"""The store on a real SQLite file: admission, rejections, commits, outbox."""

from node.store.sqlite import (
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
    outcome = Finalization(b"a" * 32, b"s" * 32, State.FINAL, None, (b"v1", b"v2"), 70)
    assert store.commit_round(committed, [outcome], [Outgoing("t", b"final")], 9)
    assert not store.commit_round(committed, [outcome], [Outgoing("t", b"final")], 9)
    assert store.balances() == {b"s" * 32: 70}
    assert store.history_vectors() == [b"v1", b"v2"]
    assert store.last_round() == committed
    assert store.submission_state(b"a" * 32) == (State.FINAL, None)
    entries = store.outbox(0, 10)
    assert [e.payload for e in entries] == [b"accepted", b"final"]
    store.published([entries[0].seq])
    assert [e.payload for e in store.outbox(0, 10)] == [b"final"]


def test_a_signed_vote_is_never_replaced(tmp_path):
    store = Store(tmp_path / "s.db")
    assert store.record_vote(4, b"first") == b"first"
    assert store.record_vote(4, b"second") == b"first"
    assert store.signed_vote(4) == b"first"
