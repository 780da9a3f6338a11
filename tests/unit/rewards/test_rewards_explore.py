"""The explorer's pure math: a deterministic, bounded map, and gaps measured as scoring does."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.curiosity import ScoringRules, gap_scores, neighbourhoods
from rewards.explore import fit_projection, item_key, open_gaps, sample_ids
from rewards.history import History

DIM = 16


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def cloud(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Two clusters with a hole between them: there are gaps to find.
    centres = unit(rng.normal(size=(2, DIM)))
    rows = centres[rng.integers(0, 2, size=n)] + 0.3 * rng.normal(size=(n, DIM))
    return unit(rows).astype(np.float16).astype(np.float64)


def test_sample_is_the_smallest_keys_in_id_order_and_bounded() -> None:
    keys = [item_key(bytes([i])) for i in range(50)]
    chosen = sample_ids(keys, 10)
    assert len(chosen) == 10
    assert list(chosen) == sorted(chosen)
    assert set(chosen) == set(np.argsort(np.asarray(keys, dtype=np.uint64))[:10].tolist())
    assert list(sample_ids(keys[:5], 10)) == [0, 1, 2, 3, 4]
    assert len(sample_ids(keys, 0)) == 0
    with pytest.raises(ValueError):
        sample_ids(keys, -1)


def test_appending_only_lets_new_items_displace_old_ones() -> None:
    keys = [item_key(b"item" + bytes([i])) for i in range(200)]
    before = set(sample_ids(keys[:100], 20).tolist())
    after = set(sample_ids(keys, 20).tolist())
    # Old items that stayed in the sample are exactly the old items still among the 20 smallest.
    assert after - before <= set(range(100, 200))
    assert len(after) == 20


def test_sample_keys_tie_by_id() -> None:
    assert list(sample_ids([5, 1, 1, 1, 0], 3)) == [1, 2, 4]


def test_projection_is_deterministic_with_fixed_signs() -> None:
    points = cloud(300)
    first = fit_projection(points)
    second = fit_projection(points.copy())
    assert np.array_equal(first.axes, second.axes)
    assert np.array_equal(first.apply(points), second.apply(points))
    for axis in first.axes:
        assert axis[int(np.argmax(np.abs(axis)))] > 0
        assert abs(np.linalg.norm(axis) - 1) < 1e-9
    assert abs(float(first.axes[0] @ first.axes[1])) < 1e-9
    # The first axis carries at least as much variance as the second.
    xy = first.apply(points)
    assert xy[:, 0].var() >= xy[:, 1].var()


def test_projection_does_not_depend_on_the_sign_the_svd_picks() -> None:
    points = cloud(100, seed=3)
    flipped = fit_projection(-points)
    straight = fit_projection(points)
    # Negating the data negates the principal axes' data, not the fixed sign of the axes.
    assert np.allclose(np.abs(flipped.axes), np.abs(straight.axes))
    for axis in flipped.axes:
        assert axis[int(np.argmax(np.abs(axis)))] > 0


def test_projection_of_tiny_histories() -> None:
    empty = fit_projection(np.empty((0, DIM)))
    assert np.array_equal(empty.apply(cloud(3)), np.zeros((3, 2)))
    one = fit_projection(cloud(1))
    assert np.array_equal(one.apply(cloud(1)), np.zeros((1, 2)))
    two = fit_projection(cloud(2, seed=1))
    assert np.array_equal(two.axes[1], np.zeros(DIM))  # two points span one dimension
    with pytest.raises(ValueError):
        two.apply(np.zeros((1, DIM + 1)))


def history_of(points: np.ndarray) -> History:
    history = History(DIM)
    history.add(["image"] * len(points), points)
    return history


def test_neighbourhoods_are_what_gap_scores_use() -> None:
    points = cloud(120)
    history = history_of(points)
    queries = cloud(5, seed=9)
    found = neighbourhoods(history, queries, 8)
    assert len(found) == 5
    for around, query in zip(found, queries, strict=True):
        assert len(around.ids) == 8
        assert list(around.distances) == sorted(around.distances)
        # The same k nearest as a brute-force exact search.
        exact = np.sqrt(((points - query.astype(np.float16).astype(np.float64)) ** 2).sum(axis=1))
        assert set(around.ids.tolist()) == set(np.argsort(exact, kind="stable")[:8].tolist())
        # The centroid gives the d_nn that gap_scores reports.
        d_nn = float(np.linalg.norm(points[np.sort(around.ids)] - around.centroid, axis=1).mean())
        score = gap_scores(history, query[None, :], 8)[0]
        assert abs(score.d_nn - d_nn) < 1e-12
    assert neighbourhoods(history_of(points[:5]), queries, 8) == []


def test_open_gaps_are_open_largest_first_and_deduplicated() -> None:
    points = cloud(200)
    history = history_of(points)
    rules = ScoringRules(k=8, qualify_ratio=1.0)
    gaps = open_gaps(history, points[:60], ["image"] * 60, rules, top=10)
    assert 0 < len(gaps) <= 10
    sizes = [gap.size for gap in gaps]
    assert sizes == sorted(sizes, reverse=True)
    signatures = {np.sort(gap.neighbours).tobytes() for gap in gaps}
    assert len(signatures) == len(gaps)
    for gap in gaps:
        score = gap_scores(history, gap.centre[None, :], rules.k, rules.qualify_ratio)[0]
        assert score.qualified and score.d_nn == gap.size and score.score_ppm == gap.score_ppm
    again = open_gaps(history, points[:60], ["image"] * 60, rules, top=10)
    assert [g.size for g in again] == sizes
    assert open_gaps(history, points[:0], [], rules, top=10) == []
    assert open_gaps(history_of(points[:4]), points[:3], ["image"] * 3, rules, top=3) == []
