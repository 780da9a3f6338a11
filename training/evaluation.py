"""Held-out evaluation through the node's own path: a loaded ``Shard``.

Every figure is measured on the test split, whose colour-shape combinations
never appeared in training, with voices never heard in training and, for
text, phrasings never seen in training. The held-out items are halved per
concept: the first half calibrates δ, the second half is evaluated.

Recall@k of a query is 1 when its own concept's item ranks among the k
nearest of a gallery holding one item per concept; galleries are redrawn
``trials`` times. Two items match when they share colour and shape (and
motion, when both carry one).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.fusion import cosine_distance, fuse_pair
from encoders.modality import PATCHED, Modality
from encoders.shard import Shard
from encoders.weights import pair_key
from training import robustness
from training.calibration import calibrate_delta, rates
from training.corpus import Corpus
from training.world import Concept, training_captions, unseen_captions

EVAL_BEACON = b"poc-eval-beacon"
ALPHA = dict.fromkeys(Modality, 0.75)
_BATCH = 32
DISTRACTORS_PER_CONCEPT = 4


@dataclass(frozen=True)
class Bank:
    """Embedded items of one modality with their concepts."""

    vectors: npt.NDArray[np.float64]
    embeddings: tuple[ItemEmbedding, ...]
    concepts: tuple[Concept, ...]


@dataclass(frozen=True)
class Halves:
    """Calibration and evaluation banks per modality; text has a still and a moving bank."""

    calibration: dict[str, Bank]
    evaluation: dict[str, Bank]
    distractors: dict[str, Bank]
    """A few training-split items of every training concept, per media modality."""


def _embed(shard: Shard, requests: list[EncodeRequest]) -> list[ItemEmbedding]:
    out: list[ItemEmbedding] = []
    for start in range(0, len(requests), _BATCH):
        out.extend(shard.embed(requests[start : start + _BATCH], EVAL_BEACON))
    return out


def _bank(
    shard: Shard, modality: Modality, media: Sequence[Any], concepts: Sequence[Concept]
) -> Bank:
    requests = []
    for item in media:
        raw = item.encode() if isinstance(item, str) else np.ascontiguousarray(item).tobytes()
        requests.append(EncodeRequest(modality, item, hashlib.sha256(raw).digest()))
    embeddings = _embed(shard, requests)
    vectors = np.stack([e.vector for e in embeddings]).astype(np.float64)
    return Bank(vectors, tuple(embeddings), tuple(concepts))


def embed_halves(shard: Shard, corpus: Corpus, seed: int = 0) -> Halves:
    """Embed the test split, halved per concept, and held-out captions (both halves)."""
    rng = random.Random(seed)
    halves: tuple[dict[str, Bank], dict[str, Bank]] = ({}, {})
    for modality, split in corpus.test.items():
        table = corpus.concepts_of(modality)
        seen: dict[int, int] = {}
        parts: tuple[list[int], list[int]] = ([], [])
        for row, concept_id in enumerate(split.concepts):
            position = seen.get(int(concept_id), 0)
            seen[int(concept_id)] = position + 1
            parts[position % 2].append(row)
        for half, rows in zip(halves, parts, strict=True):
            media = list(split.decoded(np.asarray(rows, dtype=np.int64)))
            concepts = [table[int(split.concepts[r])] for r in rows]
            half[str(modality)] = _bank(shard, modality, media, concepts)
    present_still = {
        corpus.still[int(i)]
        for part in (
            corpus.test[Modality.IMAGE],
            corpus.test[Modality.AUDIO],
            corpus.train[Modality.IMAGE],
        )
        for i in part.concepts
    }
    present_moving = {
        corpus.moving[int(i)]
        for part in (corpus.test[Modality.VIDEO], corpus.train[Modality.VIDEO])
        for i in part.concepts
    }
    for name, table, present in (
        ("text", corpus.still, present_still),
        ("text-moving", corpus.moving, present_moving),
    ):
        calibration: list[tuple[str, Concept]] = []
        evaluation: list[tuple[str, Concept]] = []
        for concept in table:
            if concept not in present:
                continue
            evaluation.extend((t, concept) for t in unseen_captions(concept))
            if concept.held_out:
                phrasings = training_captions(concept)
                calibration.extend(
                    (t, concept) for t in rng.sample(phrasings, 6 if name == "text" else 4)
                )
            else:
                calibration.append((rng.choice(training_captions(concept)), concept))
        for half, pool in zip(halves, (calibration, evaluation), strict=True):
            half[name] = _bank(shard, Modality.TEXT, [t for t, _ in pool], [c for _, c in pool])
    distractors = {}
    for modality, split in corpus.train.items():
        table = corpus.concepts_of(modality)
        taken: dict[int, int] = {}
        rows = []
        for row, concept_id in enumerate(split.concepts.tolist()):
            if taken.get(concept_id, 0) < DISTRACTORS_PER_CONCEPT:
                taken[concept_id] = taken.get(concept_id, 0) + 1
                rows.append(row)
        media = list(split.decoded(np.asarray(rows, dtype=np.int64)))
        concepts = [table[int(split.concepts[r])] for r in rows]
        distractors[str(modality)] = _bank(shard, modality, media, concepts)
    return Halves(halves[0], halves[1], distractors)


def _key(concept: Concept, with_motion: bool) -> tuple[str, ...]:
    return (
        (concept.colour, concept.shape, concept.motion)
        if with_motion
        else (concept.colour, concept.shape)
    )


def _bank_name(modality: Modality, other: Modality) -> str:
    if modality is Modality.TEXT and other is Modality.VIDEO:
        return "text-moving"
    return str(modality)


def _held_out_only(bank: Bank) -> Bank:
    keep = [i for i, c in enumerate(bank.concepts) if c.held_out]
    return Bank(
        bank.vectors[keep],
        tuple(bank.embeddings[i] for i in keep),
        tuple(bank.concepts[i] for i in keep),
    )


def _concat(a: Bank, b: Bank) -> Bank:
    return Bank(
        np.concatenate([a.vectors, b.vectors]), a.embeddings + b.embeddings, a.concepts + b.concepts
    )


def recall(
    query: Bank, gallery: Bank, with_motion: bool, trials: int, seed: int
) -> tuple[float, float]:
    """Mean R@1 and R@5 of every query against galleries of one item per concept."""
    rng = np.random.default_rng(seed)
    keys = [_key(c, with_motion) for c in gallery.concepts]
    by_key: dict[tuple[str, ...], list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    order = sorted(by_key)
    rows = [i for i, c in enumerate(query.concepts) if _key(c, with_motion) in by_key]
    own = np.array([order.index(_key(query.concepts[i], with_motion)) for i in rows])
    r1, r5 = [], []
    for _ in range(trials):
        picks = [by_key[k][int(rng.integers(len(by_key[k])))] for k in order]
        scores = query.vectors[rows] @ gallery.vectors[picks].T
        own_score = scores[np.arange(len(own)), own]
        rank = (scores > own_score[:, None]).sum(axis=1)
        r1.append(float(np.mean(rank < 1)))
        r5.append(float(np.mean(rank < 5)))
    return float(np.mean(r1)), float(np.mean(r5))


MISMATCH_KINDS = ("colour", "shape", "both")
"""How a mismatched partner differs: colour only, shape only, or both."""


@dataclass(frozen=True)
class PairDistances:
    """Distances of matched pairs, and of mismatched pairs by how they differ."""

    matched: list[float]
    mismatched: dict[str, list[float]]

    @property
    def all_mismatched(self) -> list[float]:
        return [d for kind in MISMATCH_KINDS for d in self.mismatched[kind]]


def _mismatch_kind(a: Concept, b: Concept) -> str | None:
    if (a.colour, a.shape) == (b.colour, b.shape):
        return None
    if a.shape == b.shape:
        return "colour"
    return "shape" if a.colour == b.colour else "both"


def pair_distances(a: Bank, b: Bank, seed: int) -> PairDistances:
    """Per item of ``a``: distances to a random matched item of ``b`` and, for each kind
    of mismatch that ``b`` offers, to a random partner that differs that way.

    Matched: same colour and shape (and motion if both have one). Drawing one
    partner per kind keeps the hard mismatches (one attribute changed) as
    frequent as the easy ones, where random partners would mostly differ in both.
    """
    rng = random.Random(seed)
    with_motion = bool(a.concepts[0].motion) and bool(b.concepts[0].motion)
    out = PairDistances([], {kind: [] for kind in MISMATCH_KINDS})
    for i, concept in enumerate(a.concepts):
        same = [
            j
            for j, c in enumerate(b.concepts)
            if _key(c, with_motion) == _key(concept, with_motion)
        ]
        if same:
            out.matched.append(cosine_distance(a.vectors[i], b.vectors[rng.choice(same)]))
        by_kind: dict[str, list[int]] = {kind: [] for kind in MISMATCH_KINDS}
        for j, c in enumerate(b.concepts):
            kind = _mismatch_kind(concept, c)
            if kind is not None:
                by_kind[kind].append(j)
        for kind in MISMATCH_KINDS:
            if by_kind[kind]:
                partner = rng.choice(by_kind[kind])
                out.mismatched[kind].append(cosine_distance(a.vectors[i], b.vectors[partner]))
    return out


def _pair_banks(banks: dict[str, Bank], a: Modality, b: Modality) -> tuple[Bank, Bank]:
    """Held-out items of the pair's media modality, and the partners they are paired with.

    With text, the media items are the queries and every caption (of any
    concept, held out or not) is a possible partner.
    """
    if a is Modality.TEXT:
        return _held_out_only(banks[_bank_name(b, a)]), banks[_bank_name(a, b)]
    return _held_out_only(banks[_bank_name(a, b)]), banks[_bank_name(b, a)]


def _pairs() -> list[tuple[Modality, Modality]]:
    return list(itertools.combinations(list(Modality), 2))


def calibrate(halves: Halves, seed: int = 0) -> dict[frozenset[Modality], float]:
    """δ per modality pair from the calibration half."""
    deltas = {}
    for a, b in _pairs():
        items, partners = _pair_banks(halves.calibration, a, b)
        distances = pair_distances(items, partners, seed)
        deltas[frozenset((a, b))] = calibrate_delta(distances.matched, distances.all_mismatched)
    return deltas


def evaluate(
    halves: Halves, deltas: dict[frozenset[Modality], float], trials: int = 20, seed: int = 1
) -> dict[str, Any]:
    """Every figure of ``poc-node eval`` on the evaluation half, as plain JSON values."""
    ev = halves.evaluation
    retrieval: dict[str, dict[str, float]] = {}
    for a, b in itertools.permutations(list(Modality), 2):
        query = _held_out_only(ev[_bank_name(a, b)])
        gallery = _held_out_only(ev[_bank_name(b, a)])
        with_motion = Modality.VIDEO in (a, b) and Modality.TEXT in (a, b)
        r1, r5 = recall(query, gallery, with_motion, trials, seed)
        retrieval[f"{a}->{b}"] = {"r1": r1, "r5": r5}
    every_concept: dict[str, dict[str, float]] = {}
    for media in PATCHED:
        text = ev[_bank_name(Modality.TEXT, media)]
        items = _held_out_only(ev[str(media)])
        gallery = _concat(items, halves.distractors[str(media)])
        with_motion = media is Modality.VIDEO
        for name, query, target in (
            (f"{media}->text", items, text),
            (f"text->{media}", _held_out_only(text), gallery),
        ):
            r1, r5 = recall(query, target, with_motion, trials, seed)
            every_concept[name] = {"r1": r1, "r5": r5}
    for a, b in itertools.permutations(PATCHED, 2):
        query = _held_out_only(ev[str(a)])
        target = _concat(_held_out_only(ev[str(b)]), halves.distractors[str(b)])
        r1, r5 = recall(query, target, False, trials, seed)
        every_concept[f"{a}->{b}"] = {"r1": r1, "r5": r5}
    pairs: dict[str, dict[str, float]] = {}
    for a, b in _pairs():
        items, partners = _pair_banks(ev, a, b)
        distances = pair_distances(items, partners, seed)
        delta = deltas[frozenset((a, b))]
        measured = rates(distances.matched, distances.all_mismatched, delta)
        row: dict[str, float] = {
            "delta": delta,
            "accepted": measured.accepted,
            "rejected": measured.rejected,
            "matched_pairs": len(distances.matched),
            "mismatched_pairs": len(distances.all_mismatched),
        }
        for kind, values in distances.mismatched.items():
            if values:
                row[f"rejected_{kind}"] = rates(distances.matched, values, delta).rejected
        pairs[pair_key(a, b)] = row
    return {
        "retrieval": retrieval,
        "retrieval_every_concept": every_concept,
        "pairs": pairs,
        "fusion": fusion_retrieval(halves, deltas, trials, seed),
    }


def fusion_retrieval(
    halves: Halves, deltas: dict[frozenset[Modality], float], trials: int, seed: int
) -> dict[str, dict[str, float]]:
    """Text retrieval R@1 from an item alone and from the item fused with a matched partner."""
    ev = halves.evaluation
    rng = random.Random(seed)
    text = _held_out_only(ev["text"])
    out = {}
    for a, b in itertools.permutations(PATCHED, 2):
        bank_a, bank_b = ev[str(a)], ev[str(b)]
        fused_vectors = []
        for i, concept in enumerate(bank_a.concepts):
            same = [
                j
                for j, c in enumerate(bank_b.concepts)
                if (c.colour, c.shape) == (concept.colour, concept.shape)
            ]
            vector = bank_a.embeddings[i].vector
            if same:
                partner = bank_b.embeddings[rng.choice(same)]
                outcome = fuse_pair(
                    bank_a.embeddings[i], partner, a, b, ALPHA, deltas[frozenset((a, b))]
                )
                if outcome.fused is not None:
                    vector = outcome.fused[0]
            fused_vectors.append(np.asarray(vector, dtype=np.float64))
        fused = Bank(np.stack(fused_vectors), bank_a.embeddings, bank_a.concepts)
        unfused_r1, _ = recall(bank_a, text, False, trials, seed)
        fused_r1, _ = recall(fused, text, False, trials, seed)
        out[f"{a}+{b}->text"] = {"unfused_r1": unfused_r1, "fused_r1": fused_r1}
    return out


def format_report(figures: dict[str, Any]) -> str:
    """The figures as the aligned text ``poc-node eval`` prints."""
    lines = [
        "retrieval on the held-out split (gallery: one item per concept)",
        f"{'query->gallery':<16}{'R@1':>8}{'R@5':>8}",
    ]
    for name, row in figures["retrieval"].items():
        lines.append(f"{name:<16}{row['r1']:>8.3f}{row['r5']:>8.3f}")
    lines.append("")
    lines.append(
        "retrieval of held-out items among every concept (training concepts as distractors)"
    )
    lines.append(f"{'query->gallery':<16}{'R@1':>8}{'R@5':>8}")
    for name, row in figures["retrieval_every_concept"].items():
        lines.append(f"{name:<16}{row['r1']:>8.3f}{row['r5']:>8.3f}")
    lines.append("")
    lines.append("pair check (matched accepted, mismatched rejected as pair_too_far)")
    header = f"{'pair':<14}{'delta':>8}{'accepted':>10}{'rejected':>10}"
    lines.append(header + "".join(f"{'~' + kind:>9}" for kind in MISMATCH_KINDS))
    for name, row in figures["pairs"].items():
        by_kind = "".join(
            f"{row[f'rejected_{kind}']:>9.3f}" if f"rejected_{kind}" in row else f"{'-':>9}"
            for kind in MISMATCH_KINDS
        )
        lines.append(
            f"{name:<14}{row['delta']:>8.4f}{row['accepted']:>10.3f}{row['rejected']:>10.3f}"
            + by_kind
        )
    lines.append("(~colour, ~shape, ~both: rejection of partners differing in that way)")
    lines.append("")
    lines.append("text retrieval R@1: item alone vs fused with a matched partner")
    lines.append(f"{'pair':<18}{'unfused':>9}{'fused':>9}")
    for name, row in figures["fusion"].items():
        lines.append(f"{name:<18}{row['unfused_r1']:>9.3f}{row['fused_r1']:>9.3f}")
    if "continuity" in figures:
        lines.append("")
        lines.append(
            robustness.format_report(
                figures["continuity"], figures["oblong_pairs"], robustness.EMBEDDING_TOLERANCE
            )
        )
    return "\n".join(lines)
