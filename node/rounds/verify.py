"""Judging a leader's records against this validator's own computation (DESIGN.md §7).

A record for a submission this member already finalized (or that a certified
round rejected), or one it never received whose nonce or data another
submission already holds here, is refused: a value certified once is never
certified again. A submission this member rejected at intake by its own
policy is recomputed from its bytes like any other (see
``CERTIFIED_REJECTIONS``). Every
record must match what this node computes itself, within the
configured tolerances: the embeddings (cosine distance), the pair distance,
the pair decision (a decision within the tolerance of δ follows the
leader), the gap scores (recomputed from the leader's float16 embeddings
against this node's history, which is identical on honest members), and the
rewards (recomputed exactly from the leader's scores). A record about a
submission this node never prepared is recomputed from its bytes, fetched
from the peers when missing. Anything that cannot be checked is refused: a
check that cannot run never passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from encoders.errors import DecodingStoppedError, EncoderError
from node.errors import Reason, Rejected
from node.intake.codec import CodecError
from node.intake.wire import Submission, WireLimits, parse_submission
from node.rounds.records import (
    Candidate,
    Delta,
    Mismatch,
    Prepared,
    RoundRecord,
    RoundRules,
    Tolerances,
    Unavailable,
    Undecided,
    check_round_scores,
    compare_record,
)
from node.store.sqlite import State
from node.store.thread import StoreThread
from rewards.history import History

log = logging.getLogger("poc.verify")

PPM = 1_000_000
CERTIFIED_REJECTIONS = frozenset({str(Reason.PAIR_TOO_FAR)})
"""Rejections decided by a certified round: the same on every honest member.

Every other rejection (rate_limited, stale, duplicate bytes, expired...) is
this member's own intake policy, which honest members may apply differently
(a flood reaches each member's rate limit at a different message): a value
holding such a submission is judged on its content like any other, so that
those differences can never stall the committee.
"""
Recompute = Callable[[Submission, int], Awaitable[Prepared]]
Fetch = Callable[[list[bytes]], Awaitable[dict[bytes, bytes]]]


class RecordVerifier:
    """Checks a proposal's records; one instance per node."""

    def __init__(
        self,
        store: StoreThread,
        recompute: Recompute,
        fetch: Fetch,
        delta: Delta,
        history: History,
        rules: RoundRules,
        tolerances: Tolerances,
        wire_limits: WireLimits,
        history_lock: asyncio.Lock,
        *,
        recompute_always: bool = False,
        max_records: int | None = None,
    ) -> None:
        self._max_records = max_records
        self._history_lock = history_lock
        self._recompute_always = recompute_always
        self._store = store
        self._recompute = recompute
        self._fetch = fetch
        self._delta = delta
        self._history = history
        self._rules = rules
        self._tolerances = tolerances
        self._wire_limits = wire_limits

    async def check(
        self,
        records: Sequence[bytes],
        before_round: int | None = None,
        *,
        round_number: int | None = None,
    ) -> None:
        """Return when every record is acceptable; raise :class:`Mismatch` otherwise.

        ``before_round`` (an audit replaying history) counts as accepted only
        the item bytes of rounds before it; live, every committed round is.
        ``round_number`` (live: the proposal's round) keeps the bytes fetched
        from peers for it, so that this member serves them in turn. A record
        whose submission no peer sent raises :class:`Unavailable`, one whose
        decoding was stopped here :class:`Undecided`: both refuse the value for
        its view only (:class:`Transient`).
        """
        if self._max_records is not None and len(records) > self._max_records:
            raise Mismatch(f"{len(records)} records, more than rounds.max_records")
        try:
            decoded = [RoundRecord.from_bytes(raw) for raw in records]
        except (CodecError, KeyError, ValueError, TypeError) as error:
            raise Mismatch(f"undecodable record: {error}") from None
        ids = [record.submission_id for record in decoded]
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise Mismatch("records are not sorted by distinct submission id")
        for record in decoded:
            await self._check_record(record, round_number)
        certified = await self._store.accepted_hashes(
            [digest for record in decoded for digest in record.item_sha256], before_round
        )
        async with self._history_lock:
            await asyncio.to_thread(self._check_scores, decoded, certified)

    async def _mine(self, record: RoundRecord, round_number: int | None) -> Prepared:
        """This node's own computation of the record's submission.

        ``recompute_always`` (an audit of committed rounds) ignores what was
        stored and recomputes from the submission's bytes.
        """
        known = None
        if not self._recompute_always:
            known = await self._store.prepared_of(record.submission_id)
        name = record.submission_id.hex()[:16]
        if known is not None:
            state, reason, submitter, prepared = known
            if state is State.FINAL or reason in CERTIFIED_REJECTIONS:
                raise Mismatch(f"{name} is {state} here already (round certified)")
            if submitter != record.submitter:
                raise Mismatch(f"{record.submission_id.hex()[:16]} names another submitter")
            if prepared is not None:
                stored = Prepared.from_bytes(prepared)
                if not stored.stale:  # else prepared by an older release: recomputed below
                    return stored
        raw = await self._store.raw_submission(record.submission_id)
        fetched = raw is None
        if raw is None:
            raw = (await self._fetch([record.submission_id])).get(record.submission_id)
        if raw is None:
            raise Unavailable(f"{record.submission_id.hex()[:16]} is unknown here and to peers")
        try:
            submission = parse_submission(raw, self._wire_limits)
        except Rejected as rejected:
            raise Mismatch(f"{record.submission_id.hex()[:16]} is {rejected.reason}") from None
        if submission.submitter != record.submitter:
            raise Mismatch(f"{name} names another submitter")
        if fetched and round_number is not None:
            await self._store.keep_fetched(record.submission_id, raw, round_number)
        # Never seen here: its nonce must be new by this member's records too. (Its
        # data may repeat data held here: the round's scoring judges that per item.)
        if (
            known is None
            and not self._recompute_always
            and await self._store.replayed(submission.submitter, submission.nonce)
        ):
            raise Mismatch(f"{name} is not new here: its nonce was seen (replay)")
        try:
            return await self._recompute(submission, record.epoch)
        except DecodingStoppedError as error:
            raise Undecided(f"{record.submission_id.hex()[:16]}: {error}") from None
        except EncoderError as error:
            raise Mismatch(f"{record.submission_id.hex()[:16]}: {error}") from None

    def own_refusals(
        self, candidates: Sequence[Candidate], records: Sequence[RoundRecord]
    ) -> dict[bytes, str]:
        """The records of this member's own proposal it would refuse from another
        proposer, by submission id, with why: none, unless building and checking a
        record have come apart (a defect, or a submission prepared by an older
        release). Proposed anyway, such a record is refused by every other member
        in every view, and the committee stalls."""
        mine = {candidate.submission_id: candidate.prepared for candidate in candidates}
        refused: dict[bytes, str] = {}
        for record in records:
            try:
                compare_record(mine[record.submission_id], record, self._delta, self._tolerances)
            except Mismatch as mismatch:
                refused[record.submission_id] = str(mismatch)
        return refused

    async def _check_record(self, record: RoundRecord, round_number: int | None) -> None:
        mine = await self._mine(record, round_number)
        compare_record(
            mine, record, self._delta, self._tolerances, own_required=not self._recompute_always
        )

    def _check_scores(self, records: list[RoundRecord], certified: set[bytes]) -> None:
        check_round_scores(records, self._history, self._rules, self._tolerances, certified)
