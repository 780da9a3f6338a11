"""Judging a leader's records against this validator's own computation (DESIGN.md §7).

Every record must match what this node computes itself, within the
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
from dataclasses import dataclass
from typing import Any

import numpy as np

from encoders.errors import EncoderError
from encoders.fusion import cosine_distance
from node.intake.codec import CodecError
from node.ops.config import ConsensusSection, ScoringSection
from node.errors import Reason, Rejected
from node.rounds.records import Prepared, RoundRecord, from_float16
from node.store.sqlite import State, StoreCall
from node.intake.wire import Submission, WireLimits, parse_submission
from rewards.curiosity import GapScore, gap_scores, submission_score
from rewards.history import EmbeddingIndex
from rewards.payout import round_payout

log = logging.getLogger("poc.verify")

PPM = 1_000_000
Recompute = Callable[[Submission, int], Awaitable[Prepared]]
Fetch = Callable[[list[bytes]], Awaitable[dict[bytes, bytes]]]
Delta = Callable[[Any, Any], float]


class Mismatch(Exception):
    """A leader's record this node does not accept; the message says which and why."""


@dataclass(frozen=True)
class Tolerances:
    embedding: float
    distance_ppm: int
    score_ppm: int

    @classmethod
    def of(cls, section: ConsensusSection) -> Tolerances:
        return cls(
            section.embedding_tolerance, section.distance_tolerance_ppm, section.score_tolerance_ppm
        )


class RecordVerifier:
    """Checks a proposal's records; one instance per node."""

    def __init__(
        self,
        store: StoreCall,
        recompute: Recompute,
        fetch: Fetch,
        delta: Delta,
        history: EmbeddingIndex,
        scoring: ScoringSection,
        tolerances: Tolerances,
        wire_limits: WireLimits,
        history_lock: asyncio.Lock,
        *,
        recompute_always: bool = False,
    ) -> None:
        self._history_lock = history_lock
        self._recompute_always = recompute_always
        self._store = store
        self._recompute = recompute
        self._fetch = fetch
        self._delta = delta
        self._history = history
        self._scoring = scoring
        self._tolerances = tolerances
        self._wire_limits = wire_limits

    async def check(self, records: Sequence[bytes]) -> None:
        """Return when every record is acceptable; raise :class:`Mismatch` otherwise."""
        try:
            decoded = [RoundRecord.from_bytes(raw) for raw in records]
        except (CodecError, KeyError, ValueError, TypeError) as error:
            raise Mismatch(f"undecodable record: {error}") from None
        ids = [record.submission_id for record in decoded]
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise Mismatch("records are not sorted by distinct submission id")
        for record in decoded:
            await self._check_record(record)
        async with self._history_lock:
            await asyncio.to_thread(self._check_scores, decoded)

    async def _mine(self, record: RoundRecord) -> Prepared:
        """This node's own computation of the record's submission.

        ``recompute_always`` (an audit of committed rounds) ignores what was
        stored and recomputes from the submission's bytes.
        """
        known = None
        if not self._recompute_always:
            known = await self._store(lambda store: store.prepared_of(record.submission_id))
        if known is not None:
            state, submitter, prepared = known
            if state is State.FINAL:
                raise Mismatch(f"{record.submission_id.hex()[:16]} was finalized before")
            if submitter != record.submitter:
                raise Mismatch(f"{record.submission_id.hex()[:16]} names another submitter")
            if prepared is not None:
                return Prepared.from_bytes(prepared)
        raw = await self._store(lambda store: store.raw_submission(record.submission_id))
        if raw is None:
            raw = (await self._fetch([record.submission_id])).get(record.submission_id)
        if raw is None:
            raise Mismatch(f"{record.submission_id.hex()[:16]} is unknown here and to peers")
        try:
            submission = parse_submission(raw, self._wire_limits)
        except Rejected as rejected:
            raise Mismatch(f"{record.submission_id.hex()[:16]} is {rejected.reason}") from None
        if submission.submitter != record.submitter:
            raise Mismatch(f"{record.submission_id.hex()[:16]} names another submitter")
        try:
            return await self._recompute(submission, record.epoch)
        except EncoderError as error:
            raise Mismatch(f"{record.submission_id.hex()[:16]}: {error}") from None

    async def _check_record(self, record: RoundRecord) -> None:
        mine = await self._mine(record)
        name = record.submission_id.hex()[:16]
        if [item.modality for item in mine.items] != [e.modality for e in record.embeddings]:
            raise Mismatch(f"{name}: modalities differ")
        for item, entry in zip(mine.items, record.embeddings, strict=True):
            theirs = from_float16(entry.vector).astype(np.float64)
            if theirs.shape != from_float16(item.vector).shape or not np.isfinite(theirs).all():
                raise Mismatch(f"{name}: embedding of the wrong shape")
            if abs(np.linalg.norm(theirs) - 1.0) > 0.01:
                raise Mismatch(f"{name}: embedding is not unit length")
        if len(mine.items) == 2:
            if record.pair_distance_ppm is None:
                raise Mismatch(f"{name}: pair without a distance")
            mine_ppm = mine.pair_distance_ppm or 0
            if abs(mine_ppm - record.pair_distance_ppm) > self._tolerances.distance_ppm:
                raise Mismatch(f"{name}: pair distance {record.pair_distance_ppm} vs {mine_ppm}")
            delta_ppm = round(self._delta(mine.items[0].modality, mine.items[1].modality) * PPM)
            leader_too_far = record.pair_distance_ppm > delta_ppm
            near_threshold = (
                abs(record.pair_distance_ppm - delta_ppm) <= self._tolerances.distance_ppm
            )
            if leader_too_far != mine.too_far and not near_threshold:
                raise Mismatch(f"{name}: pair decision differs")
            if leader_too_far != (record.reason is Reason.PAIR_TOO_FAR):
                raise Mismatch(f"{name}: status does not follow the pair distance")
            too_far = leader_too_far
        else:
            if record.pair_distance_ppm is not None:
                raise Mismatch(f"{name}: a single item with a pair distance")
            too_far = False
        expected_status = "rejected" if too_far else "final"
        if record.status != expected_status:
            raise Mismatch(f"{name}: status {record.status}, expected {expected_status}")
        fused = not too_far and len(mine.items) == 2
        for item, entry in zip(mine.items, record.embeddings, strict=True):
            if entry.fused != fused:
                raise Mismatch(f"{name}: fused flag is wrong")
            if item.fused != fused:
                continue  # a decision near δ follows the leader: nothing to compare with
            distance = cosine_distance(
                from_float16(item.vector).astype(np.float64),
                from_float16(entry.vector).astype(np.float64),
            )
            if distance > self._tolerances.embedding:
                raise Mismatch(f"{name}: embedding differs by {distance:.4f}")

    def _check_scores(self, records: list[RoundRecord]) -> None:
        eligible = [record for record in records if record.status == "final"]
        queries = [from_float16(entry.vector) for record in eligible for entry in record.embeddings]
        flat: list[GapScore] = (
            gap_scores(
                self._history,
                np.stack(queries),
                k=self._scoring.k,
                qualify_ratio=self._scoring.qualify_ratio,
            )
            if queries
            else []
        )
        position = 0
        for record in eligible:
            mine = flat[position : position + len(record.embeddings)]
            position += len(record.embeddings)
            theirs = record.scores_ppm or ()
            if len(theirs) != len(mine) or any(
                abs(a.score_ppm - b) > self._tolerances.score_ppm
                for a, b in zip(mine, theirs, strict=True)
            ):
                raise Mismatch(f"{record.submission_id.hex()[:16]}: gap scores differ")
            expected = submission_score(
                [GapScore(score > 0, score, 0.0, 0.0) for score in theirs],
                valid_pair=len(theirs) == 2,
                pair_bonus_ppm=self._scoring.pair_bonus_ppm,
            )
            if record.score != expected:
                raise Mismatch(f"{record.submission_id.hex()[:16]}: score does not follow")
        for record in records:
            if record.status != "final" and (record.score or record.reward):
                raise Mismatch(f"{record.submission_id.hex()[:16]}: a rejection is paid")
        rewards = round_payout(
            {r.submission_id: r.score for r in eligible},
            self._scoring.emission,
            self._scoring.top_k,
        )
        for record in eligible:
            if rewards.get(record.submission_id, 0) != record.reward:
                raise Mismatch(f"{record.submission_id.hex()[:16]}: reward does not follow")
