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

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.embedding import ItemEmbedding
from encoders.fusion import PairOutcome, cosine_distance, distance_ppm, too_far_ppm
from encoders.modality import Modality
from encoders.weights import ScoringCalibration
from node.errors import Reason
from node.intake.codec import pack, unpack
from node.intake.wire import EmbeddingEntry
from node.ops.config import ConsensusSection, ScoringSection
from rewards.curiosity import (
    GapScore,
    ItemVerdict,
    RoundItem,
    ScoringRules,
    score_in_order,
    submission_score,
)
from rewards.history import History
from rewards.payout import round_payout

PPM = 1_000_000
Delta = Callable[[Any, Any], float]
"""δ of a modality pair: the pair distance beyond which a pair is too far."""


class Mismatch(Exception):
    """A proposer's record this member does not accept; the message says which and why."""


class Transient(Mismatch):
    """A refusal for the view it was asked in only: this member could not judge the
    record now, which is not a judgement of the value.

    The member asks again when the value is proposed in a later view. Kept for
    the round, such a verdict could split a committee for good: members that
    judged the value lock on it, and one that could not never prevotes it.
    """


class Unavailable(Transient):
    """A record's submission neither held here nor sent by any peer in time.

    The bytes may reach this member later: a peer that fetched them to verify
    keeps and serves them.
    """


class Undecided(Transient):
    """A record's item whose decoding was stopped here (time or memory limit, or
    the decoder process died): under less load, this member may decode it."""


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


@dataclass(frozen=True)
class RoundRules:
    """Everything that decides a round's records besides the history."""

    scoring: ScoringRules
    emission: int
    top_k: int

    @classmethod
    def of(cls, section: ScoringSection, calibration: ScoringCalibration) -> RoundRules:
        """The configuration's economics with the manifest's calibration (or its overrides)."""
        radius = (
            {str(m): r for m, r in calibration.duplicate_radius.items()}
            if section.duplicate_radius is None
            else dict(section.duplicate_radius)
        )
        ratio = (
            calibration.qualify_ratio if section.qualify_ratio is None else section.qualify_ratio
        )
        junk = {str(m): r for m, r in calibration.junk_radius.items()}
        return cls(
            ScoringRules(section.k, ratio, radius, section.pair_bonus_ppm, junk),
            section.emission,
            section.top_k,
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
    sha256: bytes  # of the item's data: a byte duplicate is judged on it
    own: bytes | None = None
    """A fused item's own embedding (near-duplicates are judged on it too); else None."""


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

    def own_vectors(self) -> tuple[bytes, ...]:
        """The items' own embeddings when they are fused (a valid pair), else empty."""
        if not all(item.fused and item.own is not None for item in self.items):
            return ()
        return tuple(item.own for item in self.items if item.own is not None)

    @property
    def stale(self) -> bool:
        """Prepared by a release that kept no own embeddings beside the fused ones."""
        return any(item.fused and item.own is None for item in self.items)

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
                        "sha256": item.sha256,
                        **({} if item.own is None else {"own": item.own}),
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
                    Modality(item["modality"]),
                    item["vector"],
                    item["fused"],
                    item["quality_ppm"],
                    item["sha256"],
                    item.get("own"),
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
    hashes: Sequence[bytes],
) -> Prepared:
    """Quantize the shard's output (and the pair's fusion) into a :class:`Prepared`."""
    if pair is None or pair.fused is None:
        vectors = [embedding.vector for embedding in embeddings]
        fused = False
    else:
        vectors = list(pair.fused)
        fused = True
    items = tuple(
        PreparedItem(
            modality,
            to_float16(vector),
            fused,
            round(embedding.quality * PPM),
            digest,
            to_float16(embedding.vector) if fused else None,
        )
        for modality, vector, embedding, digest in zip(
            modalities, vectors, embeddings, hashes, strict=True
        )
    )
    return Prepared(
        epoch=epoch,
        items=items,
        pair_distance_ppm=None if pair is None else distance_ppm(pair.distance),
        too_far=pair is not None and pair.too_far,
    )


def proposal_bytes_max(max_records: int, dim: int) -> int:
    """The most bytes an honest member's signed proposal can take: ``max_records``
    records, each of at most two items with their D float16 values, hashes and
    scores, with room to spare.

    A member's proposal for a future round is held until that round (one per
    round, view and member, within the machine's windows); without this bound
    one member could pin gigabytes of 64 MiB proposals in every peer's memory.
    """
    item = 4 * dim + 160  # its vector and own vector, modality, fused, sha256, score
    return 4096 + max_records * (2 * item + 512)


@dataclass(frozen=True)
class RoundRecord:
    """The certified outcome of one submission in one round.

    ``scores_ppm`` has one entry per item: its gap score, or None for a
    duplicate item (which earns nothing and does not join the history); it is
    None as a whole for a rejection.
    """

    submission_id: bytes
    submitter: bytes
    status: str  # "final" or "rejected"
    reason: Reason | None
    epoch: int
    embeddings: tuple[EmbeddingEntry, ...]
    pair_distance_ppm: int | None
    scores_ppm: tuple[int | None, ...] | None
    score: int
    reward: int
    item_sha256: tuple[bytes, ...] = ()
    own_vectors: tuple[bytes, ...] = ()
    """A valid pair's own (unfused) float16 embeddings, item by item; empty otherwise.

    Certified like the fused ones: near-duplicates are judged on both, and
    every member must judge from the same floats."""

    def body(self) -> dict[str, Any]:
        own = {"own_vectors": list(self.own_vectors)} if self.own_vectors else {}
        return {
            **own,
            "submission_id": self.submission_id,
            "submitter": self.submitter,
            "status": self.status,
            "reason": None if self.reason is None else str(self.reason),
            "epoch": self.epoch,
            "embeddings": [entry.body() for entry in self.embeddings],
            "item_sha256": list(self.item_sha256),
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
            item_sha256=tuple(body["item_sha256"]),
            own_vectors=tuple(body.get("own_vectors", ())),
        )

    @property
    def history_items(self) -> tuple[tuple[int, str, bytes], ...]:
        """What joins the history: (item, modality, vector) of a final submission's new items."""
        if self.status != "final" or self.scores_ppm is None:
            return ()
        return tuple(
            (index, str(entry.modality), entry.vector)
            for index, (entry, score) in enumerate(
                zip(self.embeddings, self.scores_ppm, strict=True)
            )
            if score is not None
        )

    @property
    def own_items(self) -> tuple[tuple[int, str, bytes], ...]:
        """The own embeddings of the pair items that join the history (beside H, for
        near-duplicates): (item, modality, vector)."""
        joining = {index for index, _, _ in self.history_items}
        return tuple(
            (index, str(entry.modality), own)
            for index, (entry, own) in enumerate(
                zip(self.embeddings, self.own_vectors, strict=False)
            )
            if index in joining
        )

    @property
    def accepted_hashes(self) -> tuple[bytes, ...]:
        """Item bytes this record makes accepted: every item of a final submission."""
        return self.item_sha256 if self.status == "final" else ()


@dataclass(frozen=True)
class Candidate:
    submission_id: bytes
    submitter: bytes
    prepared: Prepared


def _round_items(
    items: Sequence[tuple[Modality, bytes, bytes]],
    own_vectors: Sequence[bytes],
    certified: Collection[bytes],
    earlier: set[bytes],
) -> list[RoundItem]:
    """Scoring's view of one submission's items; records its hashes in ``earlier``."""
    owns: Sequence[bytes | None] = own_vectors or [None] * len(items)
    out = [
        RoundItem(
            str(modality),
            from_float16(vector),
            digest in certified or digest in earlier,
            None if own is None else from_float16(own),
        )
        for (modality, vector, digest), own in zip(items, owns, strict=True)
    ]
    earlier.update(digest for _, _, digest in items)
    return out


def _submission_score(verdicts: Sequence[ItemVerdict], pair_bonus_ppm: int) -> int:
    """Qualified new items' scores; the pair bonus only when both items are new."""
    new = [verdict.gap for verdict in verdicts if not verdict.duplicate]
    valid_pair = len(verdicts) == 2 and len(new) == 2
    return submission_score(new, valid_pair=valid_pair, pair_bonus_ppm=pair_bonus_ppm)


def score_round(
    candidates: Sequence[Candidate],
    history: History,
    rules: RoundRules,
    certified: Collection[bytes],
) -> list[RoundRecord]:
    """Score a round's submissions in submission-id order and share the emission.

    ``certified`` holds those of the round's item hashes that earlier rounds
    accepted. Each submission is judged against the history plus the
    round's earlier non-duplicate items (DESIGN.md §3, §6): a one-item
    submission whose item is a duplicate, or a pair whose two items are, is
    rejected ``duplicate``; a pair with one duplicate item is scored on its
    new item without the pair bonus. Records come out sorted by submission
    id, the order a proposal carries them in.
    """
    ordered = sorted(candidates, key=lambda candidate: candidate.submission_id)
    eligible = [candidate for candidate in ordered if not candidate.prepared.too_far]
    earlier: set[bytes] = set()
    batches = [
        _round_items(
            [(i.modality, i.vector, i.sha256) for i in candidate.prepared.items],
            candidate.prepared.own_vectors(),
            certified,
            earlier,
        )
        for candidate in eligible
    ]
    verdicts = dict(
        zip(
            (c.submission_id for c in eligible),
            score_in_order(history, batches, rules.scoring),
            strict=True,
        )
    )
    totals = {
        submission_id: _submission_score(own, rules.scoring.pair_bonus_ppm)
        for submission_id, own in verdicts.items()
        if not all(verdict.duplicate for verdict in own)
    }
    rewards = round_payout(totals, rules.emission, rules.top_k)

    records = []
    for candidate in ordered:
        prepared = candidate.prepared
        hashes = tuple(item.sha256 for item in prepared.items)
        own = verdicts.get(candidate.submission_id)
        if own is None or candidate.submission_id not in totals:
            records.append(
                RoundRecord(
                    candidate.submission_id,
                    candidate.submitter,
                    "rejected",
                    Reason.PAIR_TOO_FAR if prepared.too_far else Reason.DUPLICATE,
                    prepared.epoch,
                    prepared.entries(),
                    prepared.pair_distance_ppm,
                    None,
                    0,
                    0,
                    hashes,
                    prepared.own_vectors(),
                )
            )
            continue
        records.append(
            RoundRecord(
                candidate.submission_id,
                candidate.submitter,
                "final",
                None,
                prepared.epoch,
                prepared.entries(),
                prepared.pair_distance_ppm,
                tuple(None if v.duplicate else v.gap.score_ppm for v in own),
                totals[candidate.submission_id],
                rewards.get(candidate.submission_id, 0),
                hashes,
                prepared.own_vectors(),
            )
        )
    return records


def judge_alone(
    prepared: Prepared, history: History, rules: RoundRules, certified: Collection[bytes]
) -> list[ItemVerdict]:
    """The verdicts ``score_round`` gives a submission's items when it is alone in a round.

    The explorer's what-if (``node.ops.explore``); nothing is kept. Empty for
    a pair too far apart (``score_round`` rejects it unscored).
    """
    if prepared.too_far:
        return []
    items = _round_items(
        [(i.modality, i.vector, i.sha256) for i in prepared.items],
        prepared.own_vectors(),
        certified,
        set(),
    )
    return score_in_order(history, [items], rules.scoring)[0]


def compare_record(
    mine: Prepared,
    record: RoundRecord,
    delta: Delta,
    tolerances: Tolerances,
    *,
    own_required: bool = True,
) -> None:
    """Raise :class:`Mismatch` unless ``record`` agrees with this member's ``mine``.

    Embeddings within the cosine tolerance, the pair distance within its
    tolerance, the pair decision equal (a distance within the tolerance of δ
    follows the proposer), status and fused flags as the decision implies;
    a fused pair's own embeddings within the cosine tolerance too (without
    ``own_required``, an audit of rounds certified before records carried
    them, a record with none is judged as it was then).
    """
    name = record.submission_id.hex()[:16]
    if [item.modality for item in mine.items] != [e.modality for e in record.embeddings]:
        raise Mismatch(f"{name}: modalities differ")
    if tuple(item.sha256 for item in mine.items) != record.item_sha256:
        raise Mismatch(f"{name}: item hashes differ")
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
        pair_delta = delta(mine.items[0].modality, mine.items[1].modality)
        leader_too_far = too_far_ppm(record.pair_distance_ppm, pair_delta)
        near_threshold = (
            abs(record.pair_distance_ppm - distance_ppm(pair_delta)) <= tolerances.distance_ppm
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
    if too_far:
        if record.status != "rejected":
            raise Mismatch(f"{name}: status {record.status}, expected rejected")
    elif record.status != "final" and record.reason is not Reason.DUPLICATE:
        raise Mismatch(f"{name}: status {record.status} ({record.reason}), expected final")
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
    if own_required or record.own_vectors:
        _compare_own(mine, record, fused, tolerances)


def _compare_own(mine: Prepared, record: RoundRecord, fused: bool, tolerances: Tolerances) -> None:
    """A fused pair's own embeddings: both there, unit length, within the tolerance of
    this member's (its own, or its unfused ones where a decision near δ differed)."""
    name = record.submission_id.hex()[:16]
    if not fused:
        if record.own_vectors:
            raise Mismatch(f"{name}: own embeddings without a fused pair")
        return
    if len(record.own_vectors) != len(mine.items):
        raise Mismatch(f"{name}: own embeddings missing")
    for item, own in zip(mine.items, record.own_vectors, strict=True):
        mine_own = item.own if item.fused else item.vector
        if mine_own is None:
            raise Mismatch(f"{name}: prepared by an older release, with no own embeddings")
        if not isinstance(own, bytes) or len(own) != len(mine_own):
            raise Mismatch(f"{name}: own embedding of the wrong shape")
        theirs = from_float16(own).astype(np.float64)
        if not np.isfinite(theirs).all() or abs(np.linalg.norm(theirs) - 1.0) > 0.01:
            raise Mismatch(f"{name}: own embedding is not unit length")
        distance = cosine_distance(from_float16(mine_own).astype(np.float64), theirs)
        if distance > tolerances.embedding:
            raise Mismatch(f"{name}: own embedding differs by {distance:.4f}")


def check_round_scores(
    records: list[RoundRecord],
    history: History,
    rules: RoundRules,
    tolerances: Tolerances,
    certified: Collection[bytes],
) -> None:
    """Raise :class:`Mismatch` unless the records' outcomes follow from their embeddings.

    The round is scored again, in order, from the proposer's float16
    embeddings and item hashes against this member's history and accepted
    hashes (identical on honest members): duplicate items and ``duplicate``
    rejections must be the same, gap scores within the score tolerance;
    submission scores and rewards are recomputed exactly from the
    proposer's gap scores.
    """
    if [r.submission_id for r in records] != sorted(r.submission_id for r in records):
        raise Mismatch("records are not in submission-id order")
    eligible = [record for record in records if record.reason is not Reason.PAIR_TOO_FAR]
    earlier: set[bytes] = set()
    batches = []
    for record in eligible:
        if len(record.item_sha256) != len(record.embeddings):
            raise Mismatch(f"{record.submission_id.hex()[:16]}: item hashes missing")
        if record.own_vectors and len(record.own_vectors) != len(record.embeddings):
            raise Mismatch(f"{record.submission_id.hex()[:16]}: own embeddings missing")
        batches.append(
            _round_items(
                [
                    (entry.modality, entry.vector, digest)
                    for entry, digest in zip(record.embeddings, record.item_sha256, strict=True)
                ],
                record.own_vectors,
                certified,
                earlier,
            )
        )
    verdicts = score_in_order(history, batches, rules.scoring)
    totals: dict[bytes, int] = {}
    for record, mine in zip(eligible, verdicts, strict=True):
        name = record.submission_id.hex()[:16]
        if all(verdict.duplicate for verdict in mine):
            if record.status != "rejected" or record.reason is not Reason.DUPLICATE:
                raise Mismatch(f"{name}: every item is a duplicate, yet {record.status}")
            continue
        if record.status != "final" or record.reason is not None:
            raise Mismatch(f"{name}: {record.status} {record.reason}, yet it has a new item")
        theirs = record.scores_ppm or ()
        if len(theirs) != len(mine):
            raise Mismatch(f"{name}: gap scores differ")
        for verdict, score in zip(mine, theirs, strict=True):
            if verdict.duplicate != (score is None):
                raise Mismatch(f"{name}: duplicate items differ")
            if score is not None and abs(verdict.gap.score_ppm - score) > tolerances.score_ppm:
                raise Mismatch(f"{name}: gap scores differ")
        expected = _submission_score(
            [
                ItemVerdict(score is None, GapScore(bool(score), score or 0, 0.0, 0.0), 0.0)
                for score in theirs
            ],
            rules.scoring.pair_bonus_ppm,
        )
        if record.score != expected:
            raise Mismatch(f"{name}: score does not follow")
        totals[record.submission_id] = record.score
    for record in records:
        if record.status != "final" and (record.score or record.reward):
            raise Mismatch(f"{record.submission_id.hex()[:16]}: a rejection is paid")
    rewards = round_payout(totals, rules.emission, rules.top_k)
    for record in records:
        if rewards.get(record.submission_id, 0) != record.reward:
            raise Mismatch(f"{record.submission_id.hex()[:16]}: reward does not follow")
