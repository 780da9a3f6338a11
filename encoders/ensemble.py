"""Combining a shard's encoders into one embedding per item (DESIGN §4).

Outlier rule. An encoder whose embedding or loss is not finite is always
dropped (degenerate). With three or more encoders, an encoder is also dropped
when its cosine distance to the normalised coordinate-wise median of the
shard's finite embeddings exceeds ``outlier_distance`` — unless that would drop
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
    finite = np.all(np.isfinite(embeddings), axis=1) & np.isfinite(losses)
    if not finite.any():
        raise EncodingFailedError("every encoder of the shard gave a non-finite output")
    used = finite.copy()
    if int(finite.sum()) >= 3:
        median = np.median(embeddings[finite], axis=0)
        norm = float(np.linalg.norm(median))
        if norm > 0.0:
            unit = embeddings[finite] / np.linalg.norm(embeddings[finite], axis=1, keepdims=True)
            distance = 1.0 - unit @ (median / norm)
            inliers = distance <= rule.outlier_distance
            if inliers.any():
                used[np.flatnonzero(finite)] = inliers
    kept_losses = losses[used]
    logits = -(kept_losses - kept_losses.min()) / rule.tau
    weights = np.exp(logits) / np.exp(logits).sum()
    mixed = weights @ embeddings[used]
    norm = float(np.linalg.norm(mixed))
    if not norm > 1e-12:
        mixed, norm = embeddings[used][int(np.argmax(weights))], 1.0
    diff_loss = float(weights @ kept_losses)
    return ItemEmbedding(
        vector=(mixed / norm).astype(np.float32),
        diff_loss=diff_loss,
        quality=float(np.exp(-diff_loss / rule.tau)),
        encoder_losses=tuple(
            float(x) if ok else float("nan") for x, ok in zip(losses, finite, strict=True)
        ),
        used=tuple(bool(x) for x in used),
    )
