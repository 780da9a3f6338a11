"""Invariants of the payout and of gap scoring."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards import GapScore, HistoryIndex, gap_scores, round_payout, submission_score

ids = st.binary(min_size=32, max_size=32)
score_maps = st.dictionaries(ids, st.integers(min_value=0, max_value=10**15), max_size=20)
emissions = st.integers(min_value=0, max_value=10**18)
top_ks = st.integers(min_value=1, max_value=25)


@given(score_maps, emissions, top_ks)
def test_payout_conserves_emission(scores: dict[bytes, int], emission: int, top_k: int) -> None:
    paid = round_payout(scores, emission, top_k)
    assert set(paid) == set(scores)
    assert all(v >= 0 for v in paid.values())
    expected = emission if any(s > 0 for s in scores.values()) else 0
    assert sum(paid.values()) == expected
    assert sum(1 for v in paid.values() if v > 0) <= top_k
    assert all(paid[s] == 0 for s, v in scores.items() if v == 0)


@given(score_maps, emissions, top_ks)
def test_payout_preserves_the_order_of_scores(
    scores: dict[bytes, int], emission: int, top_k: int
) -> None:
    paid = round_payout(scores, emission, top_k)
    for a in scores:
        for b in scores:
            if scores[a] > scores[b]:
                assert paid[a] >= paid[b]


@given(score_maps, emissions, top_ks, ids, st.integers(0, 10**15), st.integers(0, 10**15))
def test_raising_a_score_never_lowers_its_reward(
    scores: dict[bytes, int], emission: int, top_k: int, me: bytes, low: int, extra: int
) -> None:
    before = round_payout({**scores, me: low}, emission, top_k)[me]
    after = round_payout({**scores, me: low + extra}, emission, top_k)[me]
    assert after >= before


@given(score_maps, emissions, top_ks, st.randoms(use_true_random=False))
def test_payout_is_independent_of_order(
    scores: dict[bytes, int], emission: int, top_k: int, rnd: random.Random
) -> None:
    items = list(scores.items())
    rnd.shuffle(items)
    assert round_payout(dict(items), emission, top_k) == round_payout(scores, emission, top_k)


@given(st.lists(ids, min_size=2, max_size=10, unique=True), st.integers(1, 10**6), top_ks)
def test_equal_scores_rank_by_id(members: list[bytes], score: int, top_k: int) -> None:
    paid = round_payout(dict.fromkeys(members, score), 10**9, top_k)
    winners = sorted(members)[:top_k]
    assert [m for m in sorted(members) if paid[m] > 0] == [w for w in winners if paid[w] > 0]
    assert paid[winners[0]] == max(paid.values())


gap = st.builds(
    lambda ok, ppm: GapScore(ok, ppm if ok else 0, ppm / 1e6, 0.0),
    st.booleans(),
    st.integers(0, 10**9),
)


@given(st.lists(gap, max_size=3), st.booleans(), st.integers(0, 5_000_000))
def test_submission_score_arithmetic(items: list[GapScore], pair: bool, bonus: int) -> None:
    base = sum(i.score_ppm for i in items if i.qualified)
    got = submission_score(items, valid_pair=pair, pair_bonus_ppm=bonus)
    assert isinstance(got, int)
    assert got == (base * bonus // 1_000_000 if pair else base)
    if pair and bonus >= 1_000_000:
        assert got >= base


DIM = 16


def _history(seed: int, n: int) -> tuple[HistoryIndex, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, DIM))
    rows = centres[rng.integers(0, 8, n)] + 0.1 * rng.standard_normal((n, DIM))
    index = HistoryIndex(DIM)
    index.add(rows)
    return index, rows


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 24), st.integers(1, 40))
def test_gap_scores_do_not_depend_on_the_batch(seed: int, k: int, batch: int) -> None:
    index, rows = _history(seed, 400)
    rng = np.random.default_rng(seed + 1)
    queries = rows[rng.integers(0, len(rows), batch)] + 0.05 * rng.standard_normal((batch, DIM))
    together = gap_scores(index, queries, k=k)
    alone = [gap_scores(index, q[None], k=k)[0] for q in queries]
    assert together == alone
    half = queries.astype(np.float16)
    for dtype in (np.float16, np.float32, np.float64):
        assert gap_scores(index, half.astype(dtype), k=k) == together


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 24))
def test_nothing_scores_below_k_items(seed: int, k: int) -> None:
    index, rows = _history(seed, k - 1)
    assert all(s == GapScore(False, 0, 0.0, 0.0) for s in gap_scores(index, rows, k=k))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(2, 24),
    st.floats(0.05, 1.0),
    st.floats(-2.0, 2.0),
)
def test_a_query_moved_onto_a_centroid_qualifies(
    seed: int, k: int, spread: float, shift: float
) -> None:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(DIM)
    centre *= shift / np.linalg.norm(centre)
    cluster = centre + spread * rng.uniform(-1, 1, (k, DIM))
    far = centre + 50.0 + rng.standard_normal((100, DIM))
    index = HistoryIndex(DIM)
    index.add(np.concatenate([far[:50], cluster, far[50:]]))
    query = cluster + 20.0
    (before,) = gap_scores(index, query[:1], k=k)
    moved = index.vectors(np.arange(50, 50 + k)).mean(axis=0)
    (after,) = gap_scores(index, moved[None], k=k)
    assert not before.qualified
    assert after.qualified and after.score_ppm == round(after.d_nn * 1e6) > 0


def _every_candidate(query, parts, k):
    """The re-ranking's input without the float32 shortlist: every candidate, in float64."""
    parts = [(ids, points) for ids, points in parts if len(ids)]
    return np.concatenate([i for i, _ in parts]), np.concatenate([p for _, p in parts]).astype(
        np.float64
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 24),
    st.sampled_from([1.0, 0.01, 30.0]),
    st.integers(2, 12),
)
def test_the_float32_shortlist_never_changes_a_score(
    seed: int, k: int, scale: float, distinct: int
) -> None:
    """Many exact ties (copies of a few vectors, at several norms), three modalities and a
    round whose earlier items join the context: the same scores with and without it."""
    from rewards import curiosity
    from rewards.curiosity import RoundItem, ScoringRules, gap_scores, score_in_order
    from rewards.history import History

    rng = np.random.default_rng(seed)
    base = scale * rng.standard_normal((distinct, DIM))
    rows = base[rng.integers(0, distinct, 300)]
    history = History(DIM)
    history.add([("text", "image", "audio")[i % 3] for i in range(len(rows))], rows)
    queries = base[rng.integers(0, distinct, 12)] + scale * 1e-3 * rng.standard_normal((12, DIM))
    round_items = [
        [RoundItem("text", queries[i]), RoundItem("image", queries[i + 1])] for i in range(0, 12, 2)
    ]
    rules = ScoringRules(k=k, qualify_ratio=0.9)
    original = curiosity._shortlist
    sizes = []

    def counted(query, parts, k):
        kept = original(query, parts, k)
        sizes.append((sum(len(ids) for ids, _ in parts), len(kept[0])))
        return kept

    curiosity._shortlist = counted
    try:
        shortlisted = (
            score_in_order(history, round_items, rules),
            gap_scores(history, queries, k=k),
        )
        curiosity._shortlist = _every_candidate
        everything = (
            score_in_order(history, round_items, rules),
            gap_scores(history, queries, k=k),
        )
    finally:
        curiosity._shortlist = original
    assert shortlisted == everything
    # It did cut: candidates from three indexes, twice k each, shrank to their ties.
    assert sum(kept for _, kept in sizes) < sum(given for given, _ in sizes)
