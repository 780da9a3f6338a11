from __future__ import annotations

import numpy as np
import pytest

from encoders.ensemble import EnsembleRule, combine
from encoders.errors import EncodingFailedError


def unit(v: list[float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def test_weights_favour_the_lower_loss() -> None:
    e = np.stack([unit([1, 0, 0]), unit([0, 1, 0])])
    out = combine(e, np.array([0.1, 2.0]), EnsembleRule(tau=1.0))
    assert out.vector[0] > out.vector[1] > 0
    w = np.exp(-0.1) / (np.exp(-0.1) + np.exp(-2.0))
    assert out.diff_loss == pytest.approx(w * 0.1 + (1 - w) * 2.0)
    assert out.quality == pytest.approx(np.exp(-out.diff_loss))
    assert np.linalg.norm(out.vector) == pytest.approx(1.0, abs=1e-6)


def test_two_encoders_are_both_kept_even_when_far_apart() -> None:
    e = np.stack([unit([1, 0]), unit([-1, 0.1])])
    assert combine(e, np.array([0.5, 0.5]), EnsembleRule()).used == (True, True)


def test_non_finite_encoder_is_dropped_with_nan_loss() -> None:
    e = np.stack([unit([1, 0]), np.array([np.nan, 0.0])])
    out = combine(e, np.array([0.3, 0.1]), EnsembleRule())
    assert out.used == (True, False)
    assert np.isnan(out.encoder_losses[1])
    assert out.vector == pytest.approx(np.array([1.0, 0.0]))


def test_outlier_among_three_is_dropped() -> None:
    e = np.stack([unit([1, 0.1, 0]), unit([1, -0.1, 0]), unit([-1, 0, 0.2])])
    out = combine(e, np.array([0.2, 0.2, 0.0]), EnsembleRule())
    assert out.used == (True, True, False)
    assert out.encoder_losses[2] == 0.0


def test_no_consensus_keeps_everyone() -> None:
    e = np.eye(3)
    assert combine(e, np.zeros(3), EnsembleRule()).used == (True, True, True)


def test_all_degenerate_fails() -> None:
    with pytest.raises(EncodingFailedError):
        combine(np.full((2, 3), np.nan), np.zeros(2), EnsembleRule())
