"""``score_in_order`` against a plain reference: the same verdicts, to the last bit.

The node's ``score_in_order`` searches H once per round for both the gap and
the near-duplicate candidates, fetches stored rows a chunk of items at a
time and keeps the round's context in place. The reference below is the
straightforward version it replaced (one search per modality for
near-duplicates, one fetch per item): scores feed consensus, so a faster
path must give every verdict exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import curiosity
from rewards.curiosity import (
    NEAREST_CANDIDATES,
    NOT_SCORED,
    ItemVerdict,
    RoundItem,
    ScoringRules,
    candidate_count,
    cosine_distances,
    score_in_order,
)
from rewards.history import History, quantize

DIM = 12
MODALITIES = ("text", "image", "audio")


def reference(
    history: History, submissions: Sequence[Sequence[RoundItem]], rules: ScoringRules
) -> list[list[ItemVerdict]]:
    """Each item judged alone: its own searches of H, its own fetches, the context copied."""
    k = rules.k
    flat = [item for items in submissions for item in items]
    if not flat:
        return [[] for _ in submissions]
    queries = quantize(np.stack([np.asarray(item.vector) for item in flat]), history.dim)
    exact = queries.astype(np.float64)
    size = len(history)
    gap_candidates = history.neighbours(queries, candidate_count(k, size)) if size else None
    near: dict[int, npt.NDArray[np.int64]] = {}
    junk_distance = np.full(len(flat), 2.0)
    for position, item in enumerate(flat):
        row = history.nearest_of(item.modality, queries[position : position + 1], 4)[0]
        near[position] = row[row >= 0]
        known_junk = history.junk
        if known_junk is not None and item.modality in rules.junk_radius:
            found = known_junk.nearest_of(item.modality, queries[position : position + 1], 4)[0]
            if (found >= 0).any():
                points = known_junk.vectors(found[found >= 0])
                junk_distance[position] = float(cosine_distances(points, exact[position]).min())
    context: list[tuple[str, npt.NDArray[np.float64]]] = []
    verdicts: list[list[ItemVerdict]] = []
    position = 0
    for items in submissions:
        own: list[ItemVerdict] = []
        for item in items:
            query = exact[position]
            same = [row for modality, row in context if modality == item.modality]
            pool = [history.vectors(near[position])] if len(near[position]) else []
            pool += [np.array(same)] if same else []
            nearest = float(cosine_distances(np.concatenate(pool), query).min()) if pool else 2.0
            to_junk = float(junk_distance[position])
            if (
                item.byte_duplicate
                or nearest <= rules.duplicate_radius.get(item.modality, 0.0)
                or to_junk <= rules.junk_radius.get(item.modality, -1.0)
            ):
                own.append(ItemVerdict(True, NOT_SCORED, nearest, to_junk))
            elif size + len(context) < k:
                own.append(ItemVerdict(False, NOT_SCORED, nearest, to_junk))
            else:
                ids = size + np.arange(len(context), dtype=np.int64)
                stored = np.array([row for _, row in context], dtype=np.float32).reshape(-1, DIM)
                if gap_candidates is not None:
                    row = gap_candidates[position]
                    found = np.unique(row[row >= 0])
                    ids = np.concatenate([found, ids])
                    stored = np.concatenate([history.stored(found), stored])
                ids, points = curiosity._shortlist(query, [(ids, stored)], k)
                gap = curiosity._score_one(query, ids, points, k, rules.qualify_ratio)
                own.append(ItemVerdict(False, gap, nearest, to_junk))
            position += 1
        start = position - len(items)
        for offset, verdict in enumerate(own):
            if not verdict.duplicate:
                context.append((items[offset].modality, exact[start + offset]))
        verdicts.append(own)
    return verdicts


def _world(seed: int, history_size: int, junk: int) -> tuple[History, np.ndarray[Any, Any]]:
    """A clustered history (three modalities, some exact copies) and its cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, DIM))
    picks = rng.integers(0, len(centres), history_size)
    rows = centres[picks] + 0.2 * rng.standard_normal((history_size, DIM))
    if history_size > 4:
        rows[-2:] = rows[:2]  # exact copies: ties in every distance
    history = History(DIM)
    if history_size:
        history.add([MODALITIES[i % 3] for i in range(history_size)], rows)
    if junk:
        history.add_junk([MODALITIES[i % 3] for i in range(junk)], rng.standard_normal((junk, DIM)))
    return history, centres


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    history_size=st.sampled_from([0, 3, 20, 150, 400]),
    junk=st.sampled_from([0, 9]),
    k=st.integers(1, 20),
    submissions=st.integers(1, 90),
)
def test_a_round_gets_the_verdicts_of_the_plain_reference(
    seed: int, history_size: int, junk: int, k: int, submissions: int
) -> None:
    """Near-duplicates of H and of the round, byte duplicates, junk, single items and pairs,
    histories smaller than k, and rounds longer than one fetched chunk: every verdict equal."""
    history, centres = _world(seed, history_size, junk)
    rng = np.random.default_rng(seed + 1)
    stored = history.vectors(np.arange(len(history), dtype=np.int64))
    round_items: list[list[RoundItem]] = []
    for index in range(submissions):
        items = []
        for slot in range(1 + index % 2):
            modality = MODALITIES[(index + slot) % 3]
            roll = rng.random()
            if roll < 0.2 and len(stored):  # a near-copy of an item of H
                vector = stored[rng.integers(len(stored))] + 1e-3 * rng.standard_normal(DIM)
            elif roll < 0.3 and round_items:  # a copy of an earlier item of the round
                vector = np.asarray(round_items[-1][0].vector)
            else:
                vector = centres[rng.integers(len(centres))] + 0.3 * rng.standard_normal(DIM)
            items.append(RoundItem(modality, vector, byte_duplicate=bool(rng.random() < 0.05)))
        round_items.append(items)
    rules = ScoringRules(
        k=k,
        qualify_ratio=1.2,
        duplicate_radius={"text": 1e-4, "image": 5e-3},
        junk_radius={"image": 0.3, "audio": 0.3},
    )
    assert score_in_order(history, round_items, rules) == reference(history, round_items, rules)


def test_the_comparison_sees_every_kind_of_verdict() -> None:
    """On one large round the compared verdicts include scores, qualified items and
    every kind of duplicate (of H, of the round, of bytes, of junk)."""
    history, centres = _world(11, 400, 9)
    rng = np.random.default_rng(12)
    stored = history.vectors(np.arange(len(history), dtype=np.int64))
    junk = history.junk
    assert junk is not None
    junk_rows = junk.vectors(np.arange(len(junk), dtype=np.int64))
    round_items = []
    kinds = []
    for index in range(150):
        modality = MODALITIES[index % 3]
        kind = index % 10 if index >= 3 else 9
        if kind == 0:  # a near-copy of an item of H
            vector = stored[index] + 1e-4 * rng.standard_normal(DIM)
        elif kind == 1:  # a copy of an earlier item of the round, of its modality
            vector = np.asarray(round_items[-3][0].vector)
        elif kind == 2:  # a copy of known junk of its modality
            vector = junk_rows[MODALITIES.index(modality) + 3 * (index % 3)]
        else:
            vector = centres[rng.integers(len(centres))] + 0.3 * rng.standard_normal(DIM)
        round_items.append([RoundItem(modality, vector, byte_duplicate=kind == 3)])
        kinds.append(kind)
    rules = ScoringRules(
        k=8,
        qualify_ratio=1.2,
        duplicate_radius={"text": 1e-3, "image": 1e-3, "audio": 1e-3},
        junk_radius={"image": 0.05, "audio": 0.05},
    )
    got = score_in_order(history, round_items, rules)
    assert got == reference(history, round_items, rules)
    verdicts = [verdict for [verdict] in got]
    assert sum(verdict.gap.qualified for verdict in verdicts) > 10
    assert len({verdict.gap.score_ppm for verdict in verdicts}) > 10
    for kind in (0, 1, 3):  # near H, a copy in the round, byte duplicates
        assert all(v.duplicate for v, j in zip(verdicts, kinds, strict=True) if j == kind)
    junk_hits = [v for i, (v, j) in enumerate(zip(verdicts, kinds, strict=True)) if j == 2]
    assert any(v.duplicate and v.junk < 0.05 for v in junk_hits)


def test_a_round_longer_than_a_chunk_fetches_each_chunk_once() -> None:
    """The stored rows of CHUNK items come from H in one call, not one call per item."""
    history, centres = _world(3, 400, 0)
    rng = np.random.default_rng(4)
    vectors = centres[rng.integers(0, 6, 3 * curiosity.CHUNK)] + 0.3 * rng.standard_normal(
        (3 * curiosity.CHUNK, DIM)
    )
    round_items = [[RoundItem(MODALITIES[i % 3], vector)] for i, vector in enumerate(vectors)]
    calls = []
    original = history.stored

    def counted(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        calls.append(len(ids))
        return original(ids)

    history.stored = counted  # type: ignore[method-assign]
    got = score_in_order(history, round_items, ScoringRules(k=8))
    history.stored = original  # type: ignore[method-assign]
    assert got == reference(history, round_items, ScoringRules(k=8))
    assert len(calls) == 3


def test_one_search_gives_the_gap_and_the_near_duplicate_candidates() -> None:
    """``History.search``'s near columns are what ``nearest_of`` finds, from one scan per index."""
    history, centres = _world(5, 300, 0)
    rng = np.random.default_rng(6)
    queries = centres[rng.integers(0, 6, 30)] + 0.3 * rng.standard_normal((30, DIM))
    own = [MODALITIES[i % 3] for i in range(30)]
    found, near = history.search(queries, 16, own, NEAREST_CANDIDATES)
    assert (found == history.neighbours(queries, 16)).all()
    for modality in MODALITIES:
        rows = [i for i, m in enumerate(own) if m == modality]
        expected = history.nearest_of(modality, queries[rows], NEAREST_CANDIDATES)
        assert (np.sort(near[rows], axis=1) == np.sort(expected, axis=1)).all()
    # A k below NEAREST_CANDIDATES still finds them all.
    _, few = history.search(queries, 1, own, NEAREST_CANDIDATES)
    assert (np.sort(few, axis=1) == np.sort(near, axis=1)).all()
