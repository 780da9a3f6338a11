"""One round scored in order, against a history of several modalities."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import History, RoundItem, ScoringRules, gap_scores, score_in_order

DIM = 16
MODALITIES = ("text", "image", "audio", "video")


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def filled(rng: np.random.Generator, n: int) -> tuple[History, list[str], np.ndarray]:
    labels = [MODALITIES[int(i)] for i in rng.integers(0, 4, n)]
    vectors = unit_rows(rng, n)
    history = History(DIM)
    history.add(labels, vectors)
    return history, labels, vectors


def test_global_ids_keep_the_order_of_addition_across_modalities() -> None:
    rng = np.random.default_rng(1)
    history, labels, vectors = filled(rng, 300)
    assert len(history) == 300 and sum(history.modalities().values()) == 300
    ids = np.array([299, 0, 17, 42])
    assert (history.vectors(ids) == vectors[ids].astype(np.float16).astype(np.float64)).all()
    assert history.modality_of(ids) == [labels[i] for i in ids]


def test_neighbours_contain_the_exact_k_nearest_of_all_modalities() -> None:
    rng = np.random.default_rng(2)
    history, _, vectors = filled(rng, 500)
    queries = unit_rows(rng, 20)
    half = vectors.astype(np.float16).astype(np.float64)
    for query, row in zip(queries, history.neighbours(queries, 8), strict=True):
        q = query.astype(np.float16).astype(np.float64)
        nearest = set(np.argsort(((half - q) ** 2).sum(axis=1), kind="stable")[:8].tolist())
        assert nearest <= set(row[row >= 0].tolist())


def test_nearest_of_searches_one_modality() -> None:
    rng = np.random.default_rng(3)
    history, labels, vectors = filled(rng, 200)
    found = history.nearest_of("audio", vectors[:5], 1)[:, 0]
    assert all(labels[i] == "audio" for i in found)
    assert (History(DIM).nearest_of("audio", vectors[:2], 3) == -1).all()


def test_scoring_in_order_equals_scoring_against_the_history_grown_by_earlier_items() -> None:
    """The definition of DESIGN.md §6: H plus the round's earlier non-duplicate items."""
    rng = np.random.default_rng(4)
    history, labels, vectors = filled(rng, 200)
    round_vectors = unit_rows(rng, 6)
    round_labels = ["image", "text", "image", "audio", "video", "image"]
    rules = ScoringRules(k=16, qualify_ratio=1.5, duplicate_radius=dict.fromkeys(MODALITIES, 0.0))
    verdicts = score_in_order(
        history,
        [[RoundItem(m, v)] for m, v in zip(round_labels, round_vectors, strict=True)],
        rules,
    )
    grown = History(DIM)
    grown.add(labels, vectors)
    for (verdict,), label, vector in zip(verdicts, round_labels, round_vectors, strict=True):
        (want,) = gap_scores(grown, vector[None], k=16, qualify_ratio=1.5)
        assert verdict.gap == want
        grown.add([label], vector[None])


def test_both_items_of_one_submission_share_their_context() -> None:
    rng = np.random.default_rng(5)
    history, _, _ = filled(rng, 100)
    a, b = unit_rows(rng, 2)
    rules = ScoringRules(k=16, qualify_ratio=2.0, duplicate_radius=dict.fromkeys(MODALITIES, 0.0))
    [[first, second]] = score_in_order(
        history, [[RoundItem("text", a), RoundItem("image", b)]], rules
    )
    assert first.gap == gap_scores(history, a[None], k=16, qualify_ratio=2.0)[0]
    assert second.gap == gap_scores(history, b[None], k=16, qualify_ratio=2.0)[0]


def test_a_copy_within_the_radius_is_a_duplicate_and_joins_nothing() -> None:
    rng = np.random.default_rng(6)
    history, _, _ = filled(rng, 100)
    x = unit_rows(rng, 1)[0]
    copy = x + 1e-3 * unit_rows(rng, 1)[0]
    rules = ScoringRules(k=16, qualify_ratio=2.0, duplicate_radius=dict.fromkeys(MODALITIES, 1e-3))
    verdicts = score_in_order(
        history,
        [[RoundItem("image", x)], [RoundItem("image", copy)], [RoundItem("image", copy)]],
        rules,
    )
    assert [v[0].duplicate for v in verdicts] == [False, True, True]
    assert verdicts[1][0].nearest < 1e-3 and verdicts[1][0].gap.score_ppm == 0


def test_scoring_rules_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        ScoringRules(k=0)
    with pytest.raises(ValueError):
        ScoringRules(duplicate_radius={"image": 2.5})


def test_an_item_near_known_junk_repeats_it_and_junk_is_not_in_the_history() -> None:
    """Noise lands as far from every concept as new data does; it repeats known junk."""
    rng = np.random.default_rng(7)
    history, _, _ = filled(rng, 100)
    junk = unit_rows(rng, 3)
    history.add_junk(["image"] * 3, junk)
    assert len(history) == 100 and history.junk is not None and len(history.junk) == 3
    noise = junk[0] + 0.05 * unit_rows(rng, 1)[0]
    genuine = unit_rows(rng, 1)[0]
    rules = ScoringRules(
        k=16,
        qualify_ratio=2.0,
        duplicate_radius=dict.fromkeys(MODALITIES, 1e-3),
        junk_radius={"image": 0.05},
    )
    verdicts = score_in_order(
        history,
        [[RoundItem("image", noise)], [RoundItem("image", genuine)], [RoundItem("text", noise)]],
        rules,
    )
    assert verdicts[0][0].duplicate and verdicts[0][0].junk < 0.05
    assert not verdicts[1][0].duplicate and verdicts[1][0].gap.score_ppm > 0
    assert not verdicts[2][0].duplicate  # no junk radius for text: left to the cutoff
    # without a junk radius the same noise is scored like new data
    (plain,) = score_in_order(history, [[RoundItem("image", noise)]], ScoringRules(16, 2.0))
    assert not plain[0].duplicate and plain[0].gap.score_ppm > 0


def _fused(own: np.ndarray, partner: np.ndarray) -> np.ndarray:
    mixed = 0.75 * own + 0.25 * partner
    return np.asarray(mixed / np.linalg.norm(mixed))


def _near(rng: np.random.Generator, vector: np.ndarray, distance: float) -> np.ndarray:
    """A unit vector ``distance`` (cosine) from ``vector``: a copy of the datum."""
    noise = rng.standard_normal(DIM)
    noise -= (noise @ vector) * vector
    noise /= np.linalg.norm(noise)
    angle = np.arccos(1.0 - distance)
    return np.asarray(np.cos(angle) * vector + np.sin(angle) * noise)


@pytest.mark.parametrize("how", ["alone", "paired_again", "original_alone"])
def test_a_copy_is_a_duplicate_whatever_it_is_paired_with(how: str) -> None:
    """Found from the outside: fusion moves a pair item by more than the radius, so a
    copy of a datum paid in a pair, re-sent alone or beside another partner (or a
    datum paid alone, re-sent in a pair), was judged against the wrong point and
    paid again. Its own embedding is what the copy lies near."""
    rng = np.random.default_rng(11)
    history, _, _ = filled(rng, 200)
    datum, caption, other = unit_rows(rng, 3)
    fused = _fused(datum, caption)
    radius = 0.01
    assert 1 - fused @ datum > 2 * radius  # the pair moved the datum past the radius
    rules = ScoringRules(
        k=16, qualify_ratio=2.0, duplicate_radius=dict.fromkeys(MODALITIES, radius)
    )
    if how == "original_alone":
        history.add(["image"], datum[None])
    else:
        history.add(["image"], fused[None])
        history.add_own(["image"], datum[None])
    copy = _near(rng, datum, radius / 4)
    if how == "alone":
        item = RoundItem("image", copy)
    else:
        item = RoundItem("image", _fused(copy, other), own=copy)
    [[verdict]] = score_in_order(history, [[item]], rules)
    assert verdict.duplicate and verdict.nearest <= radius
    # A new datum is not one, alone or paired: the check fires on copies only.
    fresh = unit_rows(rng, 1)[0]
    [[alone], [paired]] = score_in_order(
        history,
        [[RoundItem("image", fresh)], [RoundItem("image", _fused(fresh, other), own=fresh)]],
        rules,
    )
    assert not alone.duplicate and alone.gap.qualified
    assert paired.duplicate  # the same datum, after the first in the round


def test_a_copy_of_a_pair_item_earlier_in_the_round_is_a_duplicate() -> None:
    rng = np.random.default_rng(12)
    history, _, _ = filled(rng, 200)
    datum, caption = unit_rows(rng, 2)
    rules = ScoringRules(k=16, qualify_ratio=2.0, duplicate_radius=dict.fromkeys(MODALITIES, 0.01))
    pair = [
        RoundItem("image", _fused(datum, caption), own=datum),
        RoundItem("text", _fused(caption, datum), own=caption),
    ]
    copy = RoundItem("image", _near(rng, datum, 0.002))
    [[first, second], [again]] = score_in_order(history, [pair, [copy]], rules)
    assert not first.duplicate and not second.duplicate
    assert again.duplicate
