"""Combining a shard's encoders into one embedding per item (DESIGN §4).

Outlier rule. An encoder whose embedding or loss is not finite is always
dropped (degenerate). With three or more encoders, an encoder is also dropped
when its cosine distance to the normalised coordinate-wise median of the
shard's finite embeddings exceeds ``outlier_distance`` (by more than
``ROUNDING``, so that a copy of the median direction is never dropped for
float rounding in how its distance was summed) — unless that would drop
every encoder, which means the shard has no consensus direction at all (as
with untrained weights) and then all are kept. With one or two encoders a
median cannot tell which one is wrong, so only degenerate ones are dropped.
The kept encoders are averaged with weights ``softmax(-L_j/τ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from encoders.embedding import ItemEmbedding
from encoders.errors import EncodingFailedError

OUTLIER_DISTANCE = 0.5
"""Default bound on the cosine distance to the shard's median embedding."""
ROUNDING = 1e-12
"""Slack on that bound: a float64 cosine distance of unit vectors of a few hundred
dimensions is off by at most ~1e-13, and which way depends on the order of the sum
(an encoder equal to the median came out at 0 or at 1.1e-16 by the array's shape)."""


@dataclass(frozen=True)
class EnsembleRule:
    """The temperature of the loss weighting and the outlier bound."""

    tau: float = 1.0
    outlier_distance: float = OUTLIER_DISTANCE

    def __post_init__(self) -> None:
        if not self.tau > 0.0:
            raise ValueError(f"tau={self.tau} must be positive")


def combine(
    embeddings: npt.NDArray[np.float64], losses: npt.NDArray[np.float64], rule: EnsembleRule
) -> ItemEmbedding:
    """Ensemble ``[J, D]`` unit embeddings with their ``[J]`` differential losses."""
    return combine_batch(embeddings[:, None], losses[:, None], rule)[0]


def combine_batch(
    embeddings: npt.NDArray[np.float64], losses: npt.NDArray[np.float64], rule: EnsembleRule
) -> list[ItemEmbedding]:
    """Ensemble ``[J, B, D]`` embeddings with ``[J, B]`` losses: B items at once, each
    by the rule of the module, in array operations over the batch."""
    b = embeddings.shape[1]
    finite = np.all(np.isfinite(embeddings), axis=2) & np.isfinite(losses)
    counts = finite.sum(axis=0)
    if not counts.all():
        failed = np.flatnonzero(counts == 0).tolist()
        raise EncodingFailedError(
            f"every encoder of the shard gave a non-finite output for item(s) {failed}"
        )
    used = finite.copy()
    voted = np.flatnonzero(counts >= 3)
    if voted.size:
        used[:, voted] = _inliers(embeddings[:, voted], finite[:, voted], rule.outlier_distance)
    kept = np.where(used, losses, np.inf)
    lowest = kept.min(axis=0)
    logits = np.where(used, -(np.where(used, losses, 0.0) - lowest) / rule.tau, -np.inf)
    weights = np.exp(logits) / np.exp(logits).sum(axis=0)
    present = np.where(used[..., None], embeddings, 0.0)
    mixed = _weighted_sum(weights[..., None], present)
    norms = np.linalg.norm(mixed, axis=1)
    flat = ~(norms > 1e-12)
    if flat.any():
        heaviest = np.argmax(weights, axis=0)
        mixed[flat] = present[heaviest[flat], np.flatnonzero(flat)]
        norms[flat] = 1.0
    vectors = (mixed / norms[:, None]).astype(np.float32)
    diff_losses = _weighted_sum(weights, np.where(used, losses, 0.0))
    qualities = np.exp(-diff_losses / rule.tau)
    reported = np.where(finite, losses, np.nan)
    return [
        ItemEmbedding(
            vector=vectors[i].copy(),
            diff_loss=float(diff_losses[i]),
            quality=float(qualities[i]),
            encoder_losses=tuple(float(x) for x in reported[:, i]),
            used=tuple(bool(x) for x in used[:, i]),
        )
        for i in range(b)
    ]


def _weighted_sum(
    weights: npt.NDArray[np.float64], values: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """``Σ_j weights[j]·values[j]``, added in encoder order: an item's result never
    depends on the other items of its batch (a library reduction may order the
    additions by the array's shape)."""
    total: npt.NDArray[np.float64] = weights[0] * values[0]
    for j in range(1, len(values)):
        total = total + weights[j] * values[j]
    return total


def _inliers(
    embeddings: npt.NDArray[np.float64], finite: npt.NDArray[np.bool_], bound: float
) -> npt.NDArray[np.bool_]:
    """``[J, B]``: the finite encoders within ``bound`` of their item's median direction;
    all finite ones where the median is zero or would leave none."""
    values = np.where(finite[..., None], embeddings, np.nan)
    median = np.nanmedian(values, axis=0)
    norm = np.linalg.norm(median, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = values / np.linalg.norm(values, axis=2, keepdims=True)
        distance = 1.0 - (unit * (median / norm[:, None])).sum(axis=2)
    inliers = finite & (distance <= bound + ROUNDING)
    judged = (norm > 0.0) & inliers.any(axis=0)
    return np.where(judged, inliers, finite)
