"""Round payout examples."""

from __future__ import annotations

import pytest

from rewards import ranking, round_payout


def sid(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_proportional_shares_with_remainder_to_the_top_scorer() -> None:
    scores = {sid(1): 1, sid(2): 1, sid(3): 1}
    assert round_payout(scores, 100, top_k=3) == {sid(1): 34, sid(2): 33, sid(3): 33}


def test_only_top_k_positive_scores_are_paid() -> None:
    scores = {sid(1): 5, sid(2): 0, sid(3): 10, sid(4): 7}
    paid = round_payout(scores, 1_000, top_k=2)
    assert paid == {sid(1): 0, sid(2): 0, sid(3): 589, sid(4): 411}
    assert ranking(scores) == [sid(3), sid(4), sid(1)]


def test_no_positive_score_pays_nothing() -> None:
    assert round_payout({sid(1): 0}, 1_000, top_k=3) == {sid(1): 0}
    assert round_payout({}, 1_000, top_k=3) == {}


def test_ties_at_the_cut_go_to_the_lower_id() -> None:
    scores = {sid(9): 4, sid(2): 4, sid(5): 4}
    assert round_payout(scores, 10, top_k=2) == {sid(2): 5, sid(5): 5, sid(9): 0}


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        round_payout({sid(1): -1}, 10, top_k=1)
    with pytest.raises(ValueError):
        round_payout({sid(1): 1}, -10, top_k=1)
    with pytest.raises(ValueError):
        round_payout({sid(1): 1}, 10, top_k=0)
