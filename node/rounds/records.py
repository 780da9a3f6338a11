"""The records core: from encoder output to the records a round certifies, and back.

The one place where the round-record rules live, used alike by the proposer
(``score_round``), by every member judging a proposer's records
(``compare_record``, ``check_round_scores``) and by ``poc-node audit``.

A *prepared* submission is what the expensive pure path produced (decode,
encode, fuse): its embeddings quantized to float16 and the pair decision.
A round *record* adds what depends on the history and on the other
submissions of the round: gap scores, the submission score and the reward.
Both are canonical msgpack, so a record hashes and compares the same on every
validator. This module translates between ``encoders`` and ``rewards``, which
know nothing of each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.embedding import ItemEmbedding
from encoders.fusion import PairOutcome, cosine_distance
from encoders.modality import Modality
from node.errors import Reason
from node.intake.codec import pack, unpack
from node.intake.wire import EmbeddingEntry
from node.ops.config import ConsensusSection, ScoringSection
from rewards.curiosity import GapScore, gap_scores, submission_score
from rewards.history import EmbeddingIndex
from rewards.payout import round_payout

PPM = 1_000_000
Delta = Callable[[Any, Any], float]
"""δ of a modality pair: the pair distance beyond which a pair is too far."""


class Mismatch(Exception):
    """A proposer's record this member does not accept; the message says which and why."""


@dataclass(frozen=True)
class Tolerances:
    """How far a proposer's numbers may be from this member's own (DESIGN.md §7)."""

    embedding: float
    distance_ppm: int
    score_ppm: int

    @classmethod
    def of(cls, section: ConsensusSection) -> Tolerances:
        return cls(
            section.embedding_tolerance, section.distance_tolerance_ppm, section.score_tolerance_ppm
        )


def to_float16(vector: npt.NDArray[Any]) -> bytes:
    """D little-endian float16 values, the wire form of an embedding."""
    return np.asarray(vector, dtype="<f2").tobytes()


def from_float16(raw: bytes) -> npt.NDArray[np.float16]:
    return np.frombuffer(raw, dtype="<f2")


@dataclass(frozen=True)
class PreparedItem:
    modality: Modality
    vector: bytes  # fused when the pair is valid, else the item's own embedding
    fused: bool
    quality_ppm: int


@dataclass(frozen=True)
class Prepared:
    """A submission after decode, encode and fusion, waiting for its round."""

    epoch: int
    items: tuple[PreparedItem, ...]
    pair_distance_ppm: int | None
    too_far: bool

    @property
    def valid_pair(self) -> bool:
        return len(self.items) == 2 and not self.too_far

    def entries(self) -> tuple[EmbeddingEntry, ...]:
        return tuple(EmbeddingEntry(item.modality, item.vector, item.fused) for item in self.items)

    def to_bytes(self) -> bytes:
        return pack(
            {
                "epoch": self.epoch,
                "items": [
                    {
                        "modality": str(item.modality),
                        "vector": item.vector,
                        "fused": item.fused,
                        "quality_ppm": item.quality_ppm,
                    }
                    for item in self.items
                ],
                "pair_distance_ppm": self.pair_distance_ppm,
                "too_far": self.too_far,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Prepared:
        body = unpack(raw)
        return cls(
            epoch=body["epoch"],
            items=tuple(
                PreparedItem(
                    Modality(item["modality"]), item["vector"], item["fused"], item["quality_ppm"]
                )
                for item in body["items"]
            ),
            pair_distance_ppm=body["pair_distance_ppm"],
            too_far=body["too_far"],
        )


def prepare(
    epoch: int,
    modalities: Sequence[Modality],
    embeddings: Sequence[ItemEmbedding],
    pair: PairOutcome | None,
) -> Prepared:
    """Quantize the shard's output (and the pair's fusion) into a :class:`Prepared`."""
    if pair is None or pair.fused is None:
        vectors = [embedding.vector for embedding in embeddings]
        fused = False
    else:
        vectors = list(pair.fused)
        fused = True
    items = tuple(
        PreparedItem(modality, to_float16(vector), fused, round(embedding.quality * PPM))
        for modality, vector, embedding in zip(modalities, vectors, embeddings, strict=True)
    )
    return Prepared(
        epoch=epoch,
        items=items,
        pair_distance_ppm=None if pair is None else round(pair.distance * PPM),
        too_far=pair is not None and pair.too_far,
    )


@dataclass(frozen=True)
class RoundRecord:
    """The certified outcome of one submission in one round."""

    submission_id: bytes
    submitter: bytes
    status: str  # "final" or "rejected"
    reason: Reason | None
    epoch: int
    embeddings: tuple[EmbeddingEntry, ...]
    pair_distance_ppm: int | None
    scores_ppm: tuple[int, ...] | None
    score: int
    reward: int

    def body(self) -> dict[str, Any]:
        return {
            "submission_id": self.submission_id,
            "submitter": self.submitter,
            "status": self.status,
            "reason": None if self.reason is None else str(self.reason),
            "epoch": self.epoch,
            "embeddings": [entry.body() for entry in self.embeddings],
            "pair_distance_ppm": self.pair_distance_ppm,
            "scores_ppm": None if self.scores_ppm is None else list(self.scores_ppm),
            "score": self.score,
            "reward": self.reward,
        }

    def to_bytes(self) -> bytes:
        return pack(self.body())

    @classmethod
    def from_bytes(cls, raw: bytes) -> RoundRecord:
        body = unpack(raw)
        return cls(
            submission_id=body["submission_id"],
            submitter=body["submitter"],
            status=body["status"],
            reason=None if body["reason"] is None else Reason(body["reason"]),
            epoch=body["epoch"],
            embeddings=tuple(EmbeddingEntry.from_body(entry) for entry in body["embeddings"]),
            pair_distance_ppm=body["pair_distance_ppm"],
            scores_ppm=None if body["scores_ppm"] is None else tuple(body["scores_ppm"]),
            score=body["score"],
            reward=body["reward"],
        )

    @property
    def history_vectors(self) -> tuple[bytes, ...]:
        """What joins the history: every item of a final, non-disqualified submission."""
        if self.status != "final":
            return ()
        return tuple(entry.vector for entry in self.embeddings)


@dataclass(frozen=True)
class Candidate:
    submission_id: bytes
    submitter: bytes
    prepared: Prepared


def score_round(
    candidates: Sequence[Candidate], history: EmbeddingIndex, scoring: ScoringSection
) -> list[RoundRecord]:
    """Score a round's submissions against the history and share the emission.

    Every item is scored against the history as it stood before the round
    (DESIGN.md §6), in one batched search; records come out sorted by
    submission id, the order a proposal carries them in.
    """
    ordered = sorted(candidates, key=lambda candidate: candidate.submission_id)
    eligible = [candidate for candidate in ordered if not candidate.prepared.too_far]
    queries = [
        from_float16(item.vector) for candidate in eligible for item in candidate.prepared.items
    ]
    flat: list[GapScore] = (
        gap_scores(history, np.stack(queries), k=scoring.k, qualify_ratio=scoring.qualify_ratio)
        if queries
        else []
    )
    item_scores: dict[bytes, list[GapScore]] = {}
    position = 0
    for candidate in eligible:
        count = len(candidate.prepared.items)
        item_scores[candidate.submission_id] = flat[position : position + count]
        position += count
    totals = {
        submission_id: submission_score(
            scores, valid_pair=len(scores) == 2, pair_bonus_ppm=scoring.pair_bonus_ppm
        )
        for submission_id, scores in item_scores.items()
    }
    rewards = round_payout(totals, scoring.emission, scoring.top_k)

    records = []
    for candidate in ordered:
        prepared = candidate.prepared
        if prepared.too_far:
            records.append(
                RoundRecord(
                    candidate.submission_id,
                    candidate.submitter,
                    "rejected",
                    Reason.PAIR_TOO_FAR,
                    prepared.epoch,
                    prepared.entries(),
                    prepared.pair_distance_ppm,
                    None,
                    0,
                    0,
                )
            )
            continue
        scores = item_scores[candidate.submission_id]
        records.append(
            RoundRecord(
                candidate.submission_id,
                candidate.submitter,
                "final",
                None,
                prepared.epoch,
                prepared.entries(),
                prepared.pair_distance_ppm,
                tuple(score.score_ppm for score in scores),
                totals[candidate.submission_id],
                rewards.get(candidate.submission_id, 0),
            )
        )
    return records


def compare_record(
    mine: Prepared, record: RoundRecord, delta: Delta, tolerances: Tolerances
) -> None:
    """Raise :class:`Mismatch` unless ``record`` agrees with this member's ``mine``.

    Embeddings within the cosine tolerance, the pair distance within its
    tolerance, the pair decision equal (a distance within the tolerance of δ
    follows the proposer), status and fused flags as the decision implies.
    """
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
        if abs(mine_ppm - record.pair_distance_ppm) > tolerances.distance_ppm:
            raise Mismatch(f"{name}: pair distance {record.pair_distance_ppm} vs {mine_ppm}")
        delta_ppm = round(delta(mine.items[0].modality, mine.items[1].modality) * PPM)
        leader_too_far = record.pair_distance_ppm > delta_ppm
        near_threshold = (
            abs(record.pair_distance_ppm - delta_ppm) <= tolerances.distance_ppm
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
        if distance > tolerances.embedding:
            raise Mismatch(f"{name}: embedding differs by {distance:.4f}")


def check_round_scores(
    records: list[RoundRecord],
    history: EmbeddingIndex,
    scoring: ScoringSection,
    tolerances: Tolerances,
) -> None:
    """Raise :class:`Mismatch` unless the records' scores and rewards follow from their embeddings.

    Gap scores are recomputed from the proposer's float16 embeddings against
    this member's history (identical on honest members), within the score
    tolerance; submission scores and rewards are recomputed exactly.
    """
    eligible = [record for record in records if record.status == "final"]
    queries = [from_float16(entry.vector) for record in eligible for entry in record.embeddings]
    flat: list[GapScore] = (
        gap_scores(
            history,
            np.stack(queries),
            k=scoring.k,
            qualify_ratio=scoring.qualify_ratio,
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
            abs(a.score_ppm - b) > tolerances.score_ppm
            for a, b in zip(mine, theirs, strict=True)
        ):
            raise Mismatch(f"{record.submission_id.hex()[:16]}: gap scores differ")
        expected = submission_score(
            [GapScore(score > 0, score, 0.0, 0.0) for score in theirs],
            valid_pair=len(theirs) == 2,
            pair_bonus_ppm=scoring.pair_bonus_ppm,
        )
        if record.score != expected:
            raise Mismatch(f"{record.submission_id.hex()[:16]}: score does not follow")
    for record in records:
        if record.status != "final" and (record.score or record.reward):
            raise Mismatch(f"{record.submission_id.hex()[:16]}: a rejection is paid")
    rewards = round_payout(
        {r.submission_id: r.score for r in eligible},
        scoring.emission,
        scoring.top_k,
    )
    for record in eligible:
        if rewards.get(record.submission_id, 0) != record.reward:
            raise Mismatch(f"{record.submission_id.hex()[:16]}: reward does not follow")
