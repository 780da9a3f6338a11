"""The durable store: SQLite in WAL mode (DESIGN.md §8).

Every state change of a submission, together with the Result it produces, is
written in one transaction before the node acts on it: the Result goes to an
outbox that the publisher drains, so a Result is never lost to a broker outage
or a crash, and is published at least once. A finalized round's history,
ledger entries and submission states are committed in one transaction, keyed
by round, so nothing is paid twice. The ledger is append-only and unique per
submission.

The class is synchronous and confined to one thread; coroutines call it
through :class:`node.store.thread.StoreThread`, so the event loop never
waits on ``fsync``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

SCHEMA_VERSION = 4


def _int64(nonce: int) -> int:
    """A nonce (a uint64 on the wire) as the signed 64-bit integer SQLite stores.

    SQLite's INTEGER is signed: binding 2**63 or more raises ``OverflowError``.
    The same 64 bits read as two's complement keep equal nonces equal and
    distinct ones distinct, which is all a replay check asks; values below
    2**63 (every nonce stored before) are unchanged.
    """
    return nonce - (1 << 64) if nonce >= 1 << 63 else nonce


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    id BLOB PRIMARY KEY,
    submitter BLOB NOT NULL,
    nonce INTEGER,
    created_ms INTEGER,
    received_ms INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    intake_round INTEGER,
    prepared BLOB,
    round INTEGER
);
CREATE INDEX IF NOT EXISTS submissions_state ON submissions (state);
CREATE TABLE IF NOT EXISTS submission_bytes (
    id BLOB PRIMARY KEY,
    raw BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS certified (
    id BLOB PRIMARY KEY,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fetched_bytes (
    id BLOB PRIMARY KEY,
    raw BLOB NOT NULL,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nonces (
    submitter BLOB NOT NULL,
    nonce INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (submitter, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_created ON nonces (created_ms);
CREATE TABLE IF NOT EXISTS data_claims (
    sha256 BLOB PRIMARY KEY,
    submission_id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    value_hash BLOB NOT NULL,
    proposal BLOB,
    beacon_after BLOB NOT NULL,
    certificate BLOB NOT NULL,
    summary BLOB NOT NULL,
    committed_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS signed (
    round INTEGER NOT NULL,
    view INTEGER NOT NULL,
    kind TEXT NOT NULL,
    message BLOB NOT NULL,
    PRIMARY KEY (round, view, kind)
);
CREATE TABLE IF NOT EXISTS evidence (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    view INTEGER NOT NULL,
    kind TEXT NOT NULL,
    offender BLOB NOT NULL,
    evidence BLOB NOT NULL UNIQUE,
    recorded_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    submission_id BLOB NOT NULL,
    item INTEGER NOT NULL,
    modality TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (submission_id, item)
);
CREATE TABLE IF NOT EXISTS own_vectors (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    submission_id BLOB NOT NULL,
    item INTEGER NOT NULL,
    modality TEXT NOT NULL,
    vector BLOB NOT NULL,
    UNIQUE (submission_id, item)
);
CREATE TABLE IF NOT EXISTS accepted_items (
    sha256 BLOB PRIMARY KEY,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    submitter BLOB NOT NULL,
    submission_id BLOB NOT NULL UNIQUE,
    amount INTEGER NOT NULL CHECK (amount >= 0)
);
CREATE INDEX IF NOT EXISTS ledger_submitter ON ledger (submitter);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0
);
"""


class State(StrEnum):
    """Where a submission is on its path."""

    RECEIVED = "received"  # verified and stored, not yet decoded and encoded
    ACCEPTED = "accepted"  # encoded, waiting for its round
    FINAL = "final"
    REJECTED = "rejected"


class Admission(StrEnum):
    """What the stateful intake checks decided."""

    ADMITTED = "admitted"
    KNOWN = "known"  # the same bytes again (a QoS 1 redelivery): nothing to do
    REPLAY = "replay"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Outgoing:
    """A message to publish once the transaction that produced it has committed."""

    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class OutboxEntry:
    seq: int
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class StoredSubmission:
    id: bytes
    submitter: bytes
    state: State
    raw: bytes | None
    intake_round: int | None
    prepared: bytes | None


@dataclass(frozen=True)
class Waiting:
    """An accepted submission waiting for its round, without its bytes."""

    id: bytes
    submitter: bytes
    intake_round: int
    prepared: bytes


@dataclass(frozen=True)
class Finalization:
    """The committed outcome of one submission in a certified round."""

    submission_id: bytes
    submitter: bytes
    state: State
    reason: str | None
    history: tuple[tuple[int, str, bytes], ...]  # (item, modality, float16 vector) joining H
    accepted: tuple[bytes, ...]  # item hashes this outcome makes accepted (byte duplicates)
    reward: int
    own: tuple[tuple[int, str, bytes], ...] = ()
    """Own (unfused) embeddings of the pair items joining H, kept beside it."""


@dataclass(frozen=True)
class EvidenceRow:
    """One kept proof of equivocation."""

    round: int
    view: int
    kind: str
    offender: bytes
    evidence: bytes
    recorded_ms: int


class StoreError(RuntimeError):
    """The store cannot be used as it is (a schema from another version)."""


EVIDENCE_PER_OFFENDER = 64
"""Equivocation proofs kept against one member at most."""


def store_failed(error: BaseException) -> bool:
    """Whether ``error`` says the store itself cannot keep what it is given (a full or
    failing disk, a damaged file, a locked database) rather than that one call was
    wrong: then nothing more should be acknowledged as kept."""
    return (
        isinstance(error, sqlite3.OperationalError | StoreError | OSError)
        or type(error) is sqlite3.DatabaseError  # "database disk image is malformed"
    )


_WANTS_BYTES = (
    "(EXISTS (SELECT 1 FROM certified WHERE id = :id) "
    "OR EXISTS (SELECT 1 FROM submissions WHERE id = :id AND state = :final))"
)
"""Whether a submission's bytes are kept: a certified round holds it (stores older than
the ``certified`` table know it as ``final`` only)."""


@dataclass(frozen=True)
class CommittedRound:
    """A finalized round: its value hash, certificate, and a signed proposal of its value."""

    round: int
    value_hash: bytes
    beacon_after: bytes
    certificate: bytes
    summary: bytes
    proposal: bytes | None = None


class Store:
    """The node's SQLite database."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION).encode())
        elif int(version) == 3:
            self._migrate_from_3()
        elif int(version) != SCHEMA_VERSION:
            self._db.close()
            raise StoreError(
                f"{path} has schema {int(version)}, this node reads {SCHEMA_VERSION} "
                "(schema 1 predates consensus with views: start with an empty data_dir)"
            )

    def _migrate_from_3(self) -> None:
        """Schema 3 kept a submission's bytes in its row, rewritten on every change of state.

        Schema 4 keeps them in ``submission_bytes``: a state change, or a round
        reading the accepted submissions, no longer touches up to 8 MiB a row.
        """
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO submission_bytes (id, raw) "
                "SELECT id, raw FROM submissions WHERE raw IS NOT NULL"
            )
            self._db.execute("ALTER TABLE submissions DROP COLUMN raw")
            self.set_meta("schema_version", str(SCHEMA_VERSION).encode())

    def close(self) -> None:
        self._db.close()

    # -- meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- intake -------------------------------------------------------------

    def knows(self, submission_id: bytes) -> bool:
        return _knows(self._db, submission_id)

    def known_ids(self) -> KnownIds:
        """``knows`` for any thread, without a trip to the store's own thread."""
        return KnownIds(self.path)

    def admit(
        self,
        submission_id: bytes,
        submitter: bytes,
        nonce: int,
        created_ms: int,
        item_hashes: Sequence[bytes],
        raw: bytes,
        now_ms: int,
        intake_round: int,
        window_ms: int,
    ) -> Admission:
        """Replay and duplicate checks and the durable write of a verified submission.

        Admitted bytes are stored with their nonce and data claims in one
        transaction; a refused one writes nothing (the caller records the
        rejection with :meth:`reject`).
        """
        with self._transaction():
            if self.knows(submission_id):
                # Finalized meanwhile by a round learned by sync (the intake found it
                # unknown a moment ago): these bytes are the ones its peers and audits need.
                self.keep_raw(submission_id, raw)
                return Admission.KNOWN
            self._db.execute("DELETE FROM nonces WHERE created_ms < ?", (now_ms - 2 * window_ms,))
            conflict = self.conflict_of(submitter, nonce, item_hashes)
            if conflict is not None:
                return conflict
            self._db.execute(
                "INSERT INTO nonces (submitter, nonce, created_ms) VALUES (?, ?, ?)",
                (submitter, _int64(nonce), created_ms),
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO data_claims (sha256, submission_id) VALUES (?, ?)",
                [(digest, submission_id) for digest in item_hashes],
            )
            self._db.execute(
                "INSERT INTO submissions (id, submitter, nonce, created_ms, received_ms, state, "
                "intake_round) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    submission_id,
                    submitter,
                    _int64(nonce),
                    created_ms,
                    now_ms,
                    State.RECEIVED,
                    intake_round,
                ),
            )
            self._db.execute(
                "INSERT INTO submission_bytes (id, raw) VALUES (?, ?)", (submission_id, raw)
            )
        return Admission.ADMITTED

    def reject(
        self,
        submission_id: bytes,
        submitter: bytes,
        reason: str,
        now_ms: int,
        outgoing: Outgoing,
        *,
        nonce: tuple[int, int] | None = None,
    ) -> bool:
        """Record a rejection and its Result; release the data claims it held.

        ``nonce`` (nonce, created_ms) marks the nonce as seen, for rejections
        of messages whose signature held. Returns False, writing nothing, when
        the submission already reached a final state.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT state FROM submissions WHERE id = ?", (submission_id,)
            ).fetchone()
            if row is not None and row[0] in (State.FINAL, State.REJECTED):
                return False
            if nonce is not None:
                self._db.execute(
                    "INSERT OR IGNORE INTO nonces (submitter, nonce, created_ms) VALUES (?, ?, ?)",
                    (submitter, _int64(nonce[0]), nonce[1]),
                )
            self._db.execute("DELETE FROM data_claims WHERE submission_id = ?", (submission_id,))
            self._db.execute("DELETE FROM submission_bytes WHERE id = ?", (submission_id,))
            self._db.execute(
                "INSERT INTO submissions (id, submitter, received_ms, state, reason) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state, "
                "reason = excluded.reason, prepared = NULL",
                (submission_id, submitter, now_ms, State.REJECTED, reason),
            )
            self._enqueue([outgoing])
        return True

    def accept(self, submission_id: bytes, prepared: bytes, outgoing: Outgoing) -> bool:
        """Store the prepared (encoded and fused) form of a received submission."""
        with self._transaction():
            updated = self._db.execute(
                "UPDATE submissions SET state = ?, prepared = ? WHERE id = ? AND state = ?",
                (State.ACCEPTED, prepared, submission_id, State.RECEIVED),
            ).rowcount
            if updated:
                self._enqueue([outgoing])
        return bool(updated)

    def submissions_in(self, state: State) -> list[StoredSubmission]:
        """Every submission in ``state``, oldest first, with its bytes (resuming after a stop)."""
        rows = self._db.execute(
            "SELECT s.id, s.submitter, s.state, b.raw, s.intake_round, s.prepared "
            "FROM submissions s LEFT JOIN submission_bytes b ON b.id = s.id "
            "WHERE s.state = ? ORDER BY s.received_ms, s.id",
            (state,),
        ).fetchall()
        return [
            StoredSubmission(
                bytes(r[0]),
                bytes(r[1]),
                State(r[2]),
                None if r[3] is None else bytes(r[3]),
                r[4],
                None if r[5] is None else bytes(r[5]),
            )
            for r in rows
        ]

    def waiting(self, limit: int, min_intake_round: int | None = None) -> list[Waiting]:
        """At most ``limit`` accepted submissions, oldest first, as a proposal takes them.

        ``min_intake_round`` leaves out those received before it (they expire).
        Their bytes are not read: a round needs only their prepared form.
        """
        rows = self._db.execute(
            "SELECT id, submitter, intake_round, prepared FROM submissions "
            "WHERE state = ? AND prepared IS NOT NULL AND COALESCE(intake_round, 0) >= ? "
            "ORDER BY received_ms, id LIMIT ?",
            (State.ACCEPTED, -1 if min_intake_round is None else min_intake_round, limit),
        ).fetchall()
        return [Waiting(bytes(r[0]), bytes(r[1]), r[2] or 0, bytes(r[3])) for r in rows]

    def expiring(self, before_round: int) -> list[tuple[bytes, bytes]]:
        """(id, submitter) of the accepted submissions received before ``before_round``."""
        rows = self._db.execute(
            "SELECT id, submitter FROM submissions "
            "WHERE state = ? AND COALESCE(intake_round, 0) < ? ORDER BY received_ms, id",
            (State.ACCEPTED, before_round),
        ).fetchall()
        return [(bytes(r[0]), bytes(r[1])) for r in rows]

    def submission_state(self, submission_id: bytes) -> tuple[State, str | None] | None:
        row = self._db.execute(
            "SELECT state, reason FROM submissions WHERE id = ?", (submission_id,)
        ).fetchone()
        return None if row is None else (State(row[0]), row[1])

    def rejection_of(self, submission_id: bytes) -> tuple[bytes, str, int | None] | None:
        """(submitter, reason, round) of a rejected submission; None otherwise."""
        row = self._db.execute(
            "SELECT submitter, reason, round FROM submissions WHERE id = ? AND state = ?",
            (submission_id, State.REJECTED),
        ).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]), row[2])

    # -- rounds -------------------------------------------------------------

    def record_signed(self, round_number: int, view: int, kind: str, message: bytes) -> bytes:
        """Durably keep a message this member signed, or return the one already kept.

        One proposal, prevote and precommit per (round, view): the node signs
        nothing twice, even across a crash between signing and sending.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT message FROM signed WHERE round = ? AND view = ? AND kind = ?",
                (round_number, view, kind),
            ).fetchone()
            if row is not None:
                return bytes(row[0])
            self._db.execute(
                "INSERT INTO signed (round, view, kind, message) VALUES (?, ?, ?, ?)",
                (round_number, view, kind, message),
            )
        return message

    def signed_since(self, round_number: int) -> list[bytes]:
        """Messages this member signed for ``round_number`` and later, by round and view."""
        rows = self._db.execute(
            "SELECT message FROM signed WHERE round >= ? ORDER BY round, view, kind",
            (round_number,),
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    _ROUND_COLUMNS = "round, value_hash, beacon_after, certificate, summary, proposal"

    def last_round(self) -> CommittedRound | None:
        row = self._db.execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY round DESC LIMIT 1"
        ).fetchone()
        return None if row is None else self._committed(row)

    def committed_round(self, round_number: int) -> CommittedRound | None:
        row = self._db.execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round = ?", (round_number,)
        ).fetchone()
        return None if row is None else self._committed(row)

    def committed_rounds(self, first: int, last: int, limit: int) -> list[CommittedRound]:
        rows = self._db.execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round BETWEEN ? AND ? "
            "ORDER BY round LIMIT ?",
            (first, last, limit),
        ).fetchall()
        return [self._committed(row) for row in rows]

    @staticmethod
    def _committed(row: tuple[Any, ...]) -> CommittedRound:
        number, value_hash, beacon, certificate, summary, proposal = row
        return CommittedRound(
            int(number),
            bytes(value_hash),
            bytes(beacon),
            bytes(certificate),
            bytes(summary),
            None if proposal is None else bytes(proposal),
        )

    def record_evidence(
        self, round_number: int, view: int, kind: str, offender: bytes, evidence: bytes, now_ms: int
    ) -> bool:
        """Keep proof of an equivocation; False if this exact proof is already kept, or if
        ``EVIDENCE_PER_OFFENDER`` proofs against this member are (one proves it; a
        member that equivocates without end must not fill the disk)."""
        (kept,) = self._db.execute(
            "SELECT COUNT(*) FROM evidence WHERE offender = ?", (offender,)
        ).fetchone()
        if kept >= EVIDENCE_PER_OFFENDER:
            return False
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO evidence (round, view, kind, offender, evidence, recorded_ms) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (round_number, view, kind, offender, evidence, now_ms),
        )
        return cursor.rowcount == 1

    def evidence(self) -> list[EvidenceRow]:
        """Every equivocation proof kept, oldest first."""
        rows = self._db.execute(
            "SELECT round, view, kind, offender, evidence, recorded_ms FROM evidence ORDER BY seq"
        )
        return [
            EvidenceRow(int(r[0]), int(r[1]), str(r[2]), bytes(r[3]), bytes(r[4]), int(r[5]))
            for r in rows
        ]

    def raw_submission(self, submission_id: bytes) -> bytes | None:
        """The signed bytes of a submission held here: stored, or fetched to verify a round."""
        row = self._db.execute(
            "SELECT raw FROM submission_bytes WHERE id = ? "
            "UNION ALL SELECT raw FROM fetched_bytes WHERE id = ? LIMIT 1",
            (submission_id, submission_id),
        ).fetchone()
        return None if row is None else bytes(row[0])

    def keep_fetched(self, submission_id: bytes, raw: bytes, round_number: int) -> None:
        """Keep the bytes of a submission fetched from a peer to verify a proposal of a round.

        Served to peers by sync like stored bytes, until the round is decided:
        members that verified a value with bytes one member sent them alone can
        then hand them on to the others, whose verdict would otherwise depend
        on whether that member answers them (and one member could split the
        committee for good). A certified one's bytes stay (``commit_round``).
        """
        self._db.execute(
            "INSERT OR IGNORE INTO fetched_bytes (id, raw, round) VALUES (?, ?, ?)",
            (submission_id, raw, round_number),
        )

    def prepared_of(
        self, submission_id: bytes
    ) -> tuple[State, str | None, bytes, bytes | None] | None:
        """(state, reason, submitter, prepared form) of a submission this node stored."""
        row = self._db.execute(
            "SELECT state, reason, submitter, prepared FROM submissions WHERE id = ?",
            (submission_id,),
        ).fetchone()
        if row is None:
            return None
        return (
            State(row[0]),
            row[1],
            bytes(row[2]),
            None if row[3] is None else bytes(row[3]),
        )

    def ledger_entries(self) -> list[tuple[int, bytes, bytes, int]]:
        rows = self._db.execute(
            "SELECT round, submitter, submission_id, amount FROM ledger "
            "ORDER BY round, submission_id"
        )
        return [(int(r[0]), bytes(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    def history_rows(self, table: str = "history") -> list[tuple[int, bytes, int, str, bytes]]:
        """Every row of the history (or, ``table="own_vectors"``, of the own embeddings
        kept beside it): (round, submission id, item, modality, vector), in commit order."""
        if table not in ("history", "own_vectors"):
            raise ValueError(f"no history table {table!r}")
        rows = self._db.execute(
            f"SELECT round, submission_id, item, modality, vector FROM {table} ORDER BY seq"
        )
        return [(int(r[0]), bytes(r[1]), int(r[2]), str(r[3]), bytes(r[4])) for r in rows]

    def replayed(self, submitter: bytes, nonce: int) -> bool:
        """Whether ``(submitter, nonce)`` was seen inside the stale window (a replay)."""
        seen = self._db.execute(
            "SELECT 1 FROM nonces WHERE submitter = ? AND nonce = ?", (submitter, _int64(nonce))
        ).fetchone()
        return seen is not None

    def conflict_of(
        self, submitter: bytes, nonce: int, item_hashes: Sequence[bytes]
    ) -> Admission | None:
        """Why a submission would not be new here (``REPLAY``, ``DUPLICATE``), or None.

        Duplicates are judged per item (DESIGN.md §3): only a submission all
        of whose items are claimed is refused here; a pair with one claimed
        item goes on, and its round scores the new item alone.
        """
        if self.replayed(submitter, nonce):
            return Admission.REPLAY
        claimed = [
            self._db.execute("SELECT 1 FROM data_claims WHERE sha256 = ?", (digest,)).fetchone()
            for digest in item_hashes
        ]
        if claimed and all(row is not None for row in claimed):
            return Admission.DUPLICATE
        return None

    def missing_raw(self, submission_ids: Iterable[bytes]) -> list[bytes]:
        """Those of ``submission_ids`` a certified round holds, stored here without bytes."""
        missing = []
        for identity in submission_ids:
            row = self._db.execute(
                f"SELECT 1 WHERE {_WANTS_BYTES} "
                "AND NOT EXISTS (SELECT 1 FROM submission_bytes b WHERE b.id = :id)",
                {"id": identity, "final": State.FINAL},
            ).fetchone()
            if row is not None:
                missing.append(identity)
        return missing

    def finals_without_bytes(self, limit: int) -> list[bytes]:
        """Up to ``limit`` submissions certified rounds hold, stored here without bytes."""
        rows = self._db.execute(
            "SELECT id FROM ("
            "SELECT id FROM submissions WHERE state = ? UNION SELECT id FROM certified"
            ") c WHERE NOT EXISTS (SELECT 1 FROM submission_bytes b WHERE b.id = c.id) LIMIT ?",
            (State.FINAL, limit),
        )
        return [bytes(row[0]) for row in rows]

    def keep_raw(self, submission_id: bytes, raw: bytes) -> bool:
        """Keep the bytes of a certified submission stored without them (``id`` = their hash).

        A member that learned a round by sync has the certified records but not
        the submissions' bytes, which peers' sync and ``poc-node audit`` need;
        nor has one whose own intake refused a submission the committee
        certified (its rate limit met the message, say). Bytes of a submission no
        certified round holds are not kept: a flood of refused messages stays
        off the disk.
        """
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO submission_bytes (id, raw) "
            f"SELECT :id, :raw WHERE {_WANTS_BYTES}",
            {"id": submission_id, "raw": raw, "final": State.FINAL},
        )
        return cursor.rowcount == 1

    def decided_states(self, submission_ids: Iterable[bytes]) -> dict[bytes, State]:
        """The states of those of ``submission_ids`` that are final or rejected here."""
        decided: dict[bytes, State] = {}
        for identity in submission_ids:
            row = self._db.execute(
                "SELECT state FROM submissions WHERE id = ?", (identity,)
            ).fetchone()
            if row is not None and row[0] in (State.FINAL, State.REJECTED):
                decided[identity] = State(row[0])
        return decided

    def commit_round(
        self,
        committed: CommittedRound,
        outcomes: Iterable[Finalization],
        outgoing: Iterable[Outgoing],
        now_ms: int,
        *,
        prune_signed_before: int | None = None,
        epoch_beacon: tuple[int, bytes] | None = None,
        balance_messages: Callable[[Mapping[bytes, int]], Iterable[Outgoing]] | None = None,
    ) -> bool:
        """Commit a certified round in one transaction; False if it was already committed.

        ``epoch_beacon`` (epoch, beacon) is kept when the round's successor
        starts an epoch; ``prune_signed_before`` drops what this member signed
        for older rounds. ``balance_messages`` is given, inside the
        transaction, the ledger totals of the submitters this round credited
        (only those) and returns the messages that announce them, queued with
        the rest: a balance is published if and only if its round committed.

        History and ledger follow the certified records, so they are the same
        on every member. A submission's own row changes only while it is
        received or accepted here (or unknown: it is added); one this member
        already finalized or rejected keeps its state. Nothing is paid twice:
        the ledger and the history are unique per submission (and item).
        """
        with self._transaction():
            exists = self._db.execute(
                "SELECT 1 FROM rounds WHERE round = ?", (committed.round,)
            ).fetchone()
            if exists is not None:
                return False
            self._db.execute(
                "INSERT INTO rounds (round, value_hash, beacon_after, certificate, summary, "
                "proposal, committed_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    committed.round,
                    committed.value_hash,
                    committed.beacon_after,
                    committed.certificate,
                    committed.summary,
                    committed.proposal,
                    now_ms,
                ),
            )
            changed_balances: set[bytes] = set()
            for outcome in outcomes:
                # A certified submission keeps its bytes: peers fetch them by sync,
                # and an audit recomputes its record from them. An expired one does not.
                changed = self._db.execute(
                    "INSERT INTO submissions (id, submitter, received_ms, state, reason, round) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                    "state = excluded.state, reason = excluded.reason, round = excluded.round "
                    "WHERE state IN (?, ?)",
                    (
                        outcome.submission_id,
                        outcome.submitter,
                        now_ms,
                        outcome.state,
                        outcome.reason,
                        committed.round,
                        State.RECEIVED,
                        State.ACCEPTED,
                    ),
                ).rowcount
                if outcome.reason == "expired":
                    if changed:
                        self._db.execute(
                            "DELETE FROM submission_bytes WHERE id = ?", (outcome.submission_id,)
                        )
                else:
                    # Whatever this member's own row says (its intake may have refused
                    # it): the round holds it, so its bytes are kept when they come.
                    self._db.execute(
                        "INSERT OR IGNORE INTO certified (id, round) VALUES (?, ?)",
                        (outcome.submission_id, committed.round),
                    )
                if outcome.state is State.REJECTED:
                    self._db.execute(
                        "DELETE FROM data_claims WHERE submission_id = ?", (outcome.submission_id,)
                    )
                self._db.executemany(
                    "INSERT OR IGNORE INTO history (round, submission_id, item, modality, vector) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [
                        (committed.round, outcome.submission_id, index, modality, vector)
                        for index, modality, vector in outcome.history
                    ],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO own_vectors "
                    "(round, submission_id, item, modality, vector) VALUES (?, ?, ?, ?, ?)",
                    [
                        (committed.round, outcome.submission_id, index, modality, vector)
                        for index, modality, vector in outcome.own
                    ],
                )
                self._db.executemany(
                    "INSERT OR IGNORE INTO accepted_items (sha256, round) VALUES (?, ?)",
                    [(digest, committed.round) for digest in outcome.accepted],
                )
                if outcome.reward > 0:
                    credited = self._db.execute(
                        "INSERT OR IGNORE INTO ledger (round, submitter, submission_id, amount) "
                        "VALUES (?, ?, ?, ?)",
                        (committed.round, outcome.submitter, outcome.submission_id, outcome.reward),
                    ).rowcount
                    if credited:
                        changed_balances.add(outcome.submitter)
            # Bytes fetched to verify this round's proposals: a certified submission's
            # are its own from now on; the others were for values not decided.
            self._db.execute(
                "INSERT OR IGNORE INTO submission_bytes (id, raw) SELECT f.id, f.raw "
                "FROM fetched_bytes f JOIN certified c ON c.id = f.id WHERE f.round <= ?",
                (committed.round,),
            )
            self._db.execute("DELETE FROM fetched_bytes WHERE round <= ?", (committed.round,))
            if balance_messages is not None and changed_balances:
                outgoing = [*outgoing, *balance_messages(self._balances_of(changed_balances))]
            if prune_signed_before is not None:
                self._db.execute("DELETE FROM signed WHERE round < ?", (prune_signed_before,))
            if epoch_beacon is not None:
                self.set_meta(f"epoch_beacon/{epoch_beacon[0]}", epoch_beacon[1])
            self._enqueue(outgoing)
        return True

    def history_items(self) -> list[tuple[str, bytes]]:
        """Every history item as (modality, vector), in the order they were committed."""
        return [
            (str(row[0]), bytes(row[1]))
            for row in self._db.execute("SELECT modality, vector FROM history ORDER BY seq")
        ]

    def history_labels(self) -> list[tuple[int, bytes, int]]:
        """Every history item as (round, submission id, item), in commit order (the explorer)."""
        return [
            (int(row[0]), bytes(row[1]), int(row[2]))
            for row in self._db.execute(
                "SELECT round, submission_id, item FROM history ORDER BY seq"
            )
        ]

    def paid_since(self, first_round: int) -> list[tuple[int, bytes]]:
        """(round, submission id) of every payment of ``first_round`` or later."""
        rows = self._db.execute(
            "SELECT round, submission_id FROM ledger WHERE round >= ? AND amount > 0 "
            "ORDER BY round, submission_id",
            (first_round,),
        )
        return [(int(r[0]), bytes(r[1])) for r in rows]

    def history_chunks(
        self,
        dim: int,
        *,
        before_round: int | None = None,
        chunk_rows: int = 50_000,
        table: str = "history",
    ) -> Iterator[tuple[list[str], npt.NDArray[np.float16]]]:
        """The history in commit order: (modalities, float16 ``[n, dim]``) of ``chunk_rows`` items.

        A history of a million items is never in memory as Python objects:
        each chunk's vectors are one array over the joined bytes, and the
        caller adds it to the index before the next chunk is read.
        ``before_round`` yields only rounds before it (an audit's replay).
        ``table="own_vectors"`` reads the own embeddings of pair items kept
        beside H instead. The generator reads the database while it is
        consumed: consume it on the store's thread (``StoreThread.call``).
        """
        if table not in ("history", "own_vectors"):
            raise ValueError(f"no history table {table!r}")
        limit = 2**62 if before_round is None else before_round
        cursor = self._db.execute(
            f"SELECT modality, vector FROM {table} WHERE round < ? ORDER BY seq", (limit,)
        )
        try:
            while batch := cursor.fetchmany(chunk_rows):
                modalities = [str(modality) for modality, _ in batch]
                vectors = [vector for _, vector in batch]
                if any(len(vector) != 2 * dim for vector in vectors):
                    raise StoreError(f"a history vector is not {dim} float16 values")
                joined = np.frombuffer(b"".join(vectors), dtype="<f2")
                yield modalities, joined.reshape(len(batch), dim)
        finally:
            cursor.close()

    def accepted_hashes(
        self, hashes: Iterable[bytes], before_round: int | None = None
    ) -> set[bytes]:
        """Those of ``hashes`` whose bytes a certified round accepted (byte duplicates).

        ``before_round`` counts only rounds before it (an audit's replay).
        """
        limit = 2**62 if before_round is None else before_round
        found = set()
        for digest in set(hashes):
            row = self._db.execute(
                "SELECT 1 FROM accepted_items WHERE sha256 = ? AND round < ?", (digest, limit)
            ).fetchone()
            if row is not None:
                found.add(digest)
        return found

    # -- ledger -------------------------------------------------------------

    def balances(self, submitter: bytes | None = None) -> dict[bytes, int]:
        if submitter is None:
            rows = self._db.execute(
                "SELECT submitter, SUM(amount) FROM ledger GROUP BY submitter ORDER BY submitter"
            ).fetchall()
        else:
            rows = self._db.execute(
                "SELECT submitter, SUM(amount) FROM ledger WHERE submitter = ? GROUP BY submitter",
                (submitter,),
            ).fetchall()
        return {bytes(row[0]): int(row[1]) for row in rows}

    def _balances_of(self, submitters: Iterable[bytes]) -> dict[bytes, int]:
        """The ledger totals of ``submitters``, sorted by key (as the transaction sees them)."""
        totals = {}
        for submitter in sorted(submitters):
            row = self._db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE submitter = ?", (submitter,)
            ).fetchone()
            totals[submitter] = int(row[0])
        return totals

    # -- outbox -------------------------------------------------------------

    def _enqueue(self, outgoing: Iterable[Outgoing]) -> None:
        self._db.executemany(
            "INSERT INTO outbox (topic, payload, retain) VALUES (?, ?, ?)",
            [(item.topic, item.payload, int(item.retain)) for item in outgoing],
        )

    def enqueue(self, outgoing: Iterable[Outgoing]) -> None:
        """Queue messages that no state change goes with (a rejection answered again)."""
        with self._transaction():
            self._enqueue(outgoing)

    def outbox(self, after: int, limit: int) -> list[OutboxEntry]:
        rows = self._db.execute(
            "SELECT seq, topic, payload, retain FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit),
        ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), bytes(r[2]), bool(r[3])) for r in rows]

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def published(self, seqs: Sequence[int]) -> None:
        self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in seqs])

    # -- plumbing -----------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")


class KnownIds:
    """Whether a submission id is in the store, asked from any thread.

    Each calling thread reads through its own read-only connection: in WAL
    mode a reader sees every committed write and never waits for the writer.
    The intake asks it on the verifier's thread, before verifying, instead of
    a round trip to the store's thread for every message (a thread wake-up
    each way on the event loop). A submission admitted but not yet committed
    reads as unknown, as it could on the store's thread a moment earlier; its
    copy is then verified and found known at admission.
    """

    def __init__(self, path: Path) -> None:
        self._uri = f"{path.resolve().as_uri()}?mode=ro"
        self._local = threading.local()

    def __call__(self, submission_id: bytes) -> bool:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self._uri, uri=True)
            self._local.db = db
        return _knows(db, submission_id)


def _knows(db: sqlite3.Connection, submission_id: bytes) -> bool:
    """Whether the submissions table holds ``submission_id`` (in any state)."""
    row = db.execute("SELECT 1 FROM submissions WHERE id = ?", (submission_id,)).fetchone()
    return row is not None
