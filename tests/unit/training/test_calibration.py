from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from training.calibration import calibrate_delta, rates


def test_separated_sets_give_the_middle_of_the_gap() -> None:
    assert calibrate_delta([0.1, 0.2, 0.3], [0.7, 0.9]) == pytest.approx(0.5)
    measured = rates([0.1, 0.2, 0.3], [0.7, 0.9], 0.5)
    assert measured.accepted == 1.0 and measured.rejected == 1.0


def test_overlap_maximises_acceptance_plus_rejection() -> None:
    matched = [0.1, 0.2, 0.3, 0.6]
    mismatched = [0.5, 0.55, 0.7, 0.8, 0.9]
    delta = calibrate_delta(matched, mismatched)
    assert 0.3 < delta < 0.5
    measured = rates(matched, mismatched, delta)
    assert (measured.accepted, measured.rejected) == (0.75, 1.0)


def test_a_distance_equal_to_delta_is_accepted() -> None:
    assert rates([0.4], [0.4], 0.4).accepted == 1.0
    assert rates([0.4], [0.4], 0.4).rejected == 0.0


def test_empty_sets_are_refused() -> None:
    with pytest.raises(ValueError):
        calibrate_delta([], [0.5])


distances = st.lists(st.floats(0.0, 2.0, allow_nan=False), min_size=1, max_size=30)


@given(distances, distances, st.floats(-0.1, 2.1, allow_nan=False))
def test_no_threshold_does_better(
    matched: list[float], mismatched: list[float], other: float
) -> None:
    best = rates(matched, mismatched, calibrate_delta(matched, mismatched))
    alternative = rates(matched, mismatched, other)
    assert best.accepted + best.rejected >= alternative.accepted + alternative.rejected - 1e-9


def test_a_sparing_junk_radius_spares_genuine_data_and_keeps_a_margin() -> None:
    """Where noise and genuine data overlap, the radius spares 99 % of genuine data."""
    from training.scoring import JUNK_MARGIN, JUNK_SPARED, sparing_radius

    few = [0.19, 0.25, 0.3, 0.5] + [0.6] * 37  # 41 items: none may fall inside
    assert sparing_radius(few) == pytest.approx(0.19 - JUNK_MARGIN)
    many = sorted([0.1, 0.104, 0.3] + [0.2 + 0.003 * i for i in range(197)])  # 200: two may
    radius = sparing_radius(many)
    assert sum(d <= radius for d in many) <= (1 - JUNK_SPARED) * len(many)
    assert radius == pytest.approx(0.2 - JUNK_MARGIN)
    close = sorted([0.1, 0.196, 0.3] + [0.2 + 0.003 * i for i in range(197)])
    assert sparing_radius(close) == pytest.approx(0.198)  # halfway: the one before is too near
