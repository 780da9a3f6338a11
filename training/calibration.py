"""Choosing δ, the largest cosine distance a matched pair may have.

δ is set where accepting matched pairs and rejecting mismatched ones are
balanced best: among thresholds halfway between consecutive observed
distances, the one that maximises acceptance + rejection, and the middle one
of those if several tie. When the two sets are separated, that is the
midpoint of the gap between the farthest matched and the nearest mismatched
pair, which leaves the same margin to new data on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairRates:
    """Shares of matched pairs accepted and of mismatched pairs rejected under δ."""

    accepted: float
    rejected: float


def rates(matched: Sequence[float], mismatched: Sequence[float], delta: float) -> PairRates:
    """A pair is accepted when its distance is at most δ (the node's rule)."""
    m = np.asarray(matched, dtype=np.float64)
    n = np.asarray(mismatched, dtype=np.float64)
    return PairRates(float(np.mean(m <= delta)), float(np.mean(n > delta)))


def calibrate_delta(matched: Sequence[float], mismatched: Sequence[float]) -> float:
    """The δ that best separates matched from mismatched distances (see module doc)."""
    if not matched or not mismatched:
        raise ValueError("calibration needs matched and mismatched pairs")
    m = np.sort(np.asarray(matched, dtype=np.float64))
    n = np.sort(np.asarray(mismatched, dtype=np.float64))
    values = np.unique(np.concatenate([m, n]))
    candidates = np.concatenate(
        [[values[0] - 1e-6], (values[:-1] + values[1:]) / 2.0, [values[-1] + 1e-6]]
    )
    accepted = np.searchsorted(m, candidates, side="right") / len(m)
    rejected = 1.0 - np.searchsorted(n, candidates, side="right") / len(n)
    score = accepted + rejected
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(candidates[best[len(best) // 2]])
