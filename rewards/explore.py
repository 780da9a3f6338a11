"""The gap explorer's pure math: a deterministic 2-D map of the history, and its open gaps.

The map is a PCA of a sample of the history: at most ``size`` items, the ones
whose key (a hash of the item's identity, ``item_key``) is smallest, so that
the same history always gives the same sample, and appending items changes
the sample only by the new items whose keys are small enough to enter it.
The two axes come from a float64 SVD of the centred sample; the sign of each
axis is fixed so that its largest loading (by absolute value, the first such
dimension on a tie) is positive. Same history, same coordinates.

A *gap* is measured with the scoring rule's own quantity (``rewards.curiosity``):
around a centre C, the normalized mean of some k nearest, its size is
``d_nn``, the mean distance of C's k nearest to their own centroid. A gap is
*open* when an item placed at its centre would qualify now (``gap_scores``
says so). ``open_gaps`` proposes centres from seed items (each seed's k
nearest give one), scores each centre with ``gap_scores``, and keeps the
open ones, largest first.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from rewards.curiosity import ScoringRules, gap_scores, neighbourhoods
from rewards.history import History, quantize


def item_key(identity: bytes) -> int:
    """The sample key of an item: the first 8 bytes of SHA-256 of its identity, big-endian."""
    return int.from_bytes(hashlib.sha256(identity).digest()[:8], "big")


def sample_ids(keys: npt.ArrayLike, size: int) -> npt.NDArray[np.int64]:
    """Ids (positions in ``keys``) of the ``size`` smallest keys, ties by id; in id order."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    array = np.asarray(keys, dtype=np.uint64)
    if len(array) <= size:
        return np.arange(len(array), dtype=np.int64)
    order = np.lexsort((np.arange(len(array)), array))[:size]
    return np.sort(order).astype(np.int64)


@dataclass(frozen=True)
class Projection:
    """A linear map to two dimensions: ``(v - mean) @ axes.T``."""

    mean: npt.NDArray[np.float64]
    axes: npt.NDArray[np.float64]
    """``[2, dim]``: unit rows (or zero rows where the sample spans fewer dimensions)."""

    def apply(self, vectors: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """``[n, 2]`` coordinates of ``[n, dim]`` vectors."""
        points = np.asarray(vectors, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != len(self.mean):
            raise ValueError(f"expected [n, {len(self.mean)}] vectors, got {points.shape}")
        return np.asarray((points - self.mean) @ self.axes.T, dtype=np.float64)


def fit_projection(vectors: npt.NDArray[Any]) -> Projection:
    """The PCA of ``vectors`` (``[n, dim]``), in float64, with fixed signs (module doc)."""
    points = np.asarray(vectors, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] == 0:
        raise ValueError(f"expected [n, dim] vectors, got {points.shape}")
    dim = points.shape[1]
    axes = np.zeros((2, dim), dtype=np.float64)
    if len(points) == 0:
        return Projection(np.zeros(dim, dtype=np.float64), axes)
    mean = points.sum(axis=0) / len(points)
    centred = points - mean
    if len(points) > 1:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        scale = singular[0] if len(singular) else 0.0
        for row in range(min(2, len(vt))):
            if singular[row] <= scale * 1e-12:
                break  # the sample spans fewer dimensions: that axis stays zero
            axis = vt[row]
            if axis[int(np.argmax(np.abs(axis)))] < 0:
                axis = -axis
            axes[row] = axis
    return Projection(mean, axes)


@dataclass(frozen=True)
class Gap:
    """An open gap: where it is, which modality its seed had, and how large it is."""

    centre: npt.NDArray[np.float64]
    modality: str
    size: float
    """``d_nn`` at the centre: the gap score an item there would earn (as a float)."""
    score_ppm: int
    neighbours: npt.NDArray[np.int64]
    """History ids of the centre's k nearest, nearest first."""


def open_gaps(
    history: History,
    seeds: npt.NDArray[Any],
    seed_modalities: Sequence[str],
    rules: ScoringRules,
    top: int,
) -> list[Gap]:
    """The ``top`` largest open gaps around ``seeds`` (``[n, dim]``), largest first.

    One centre per distinct neighbourhood; gaps of equal size keep the seeds'
    order. Empty while the history holds fewer than k embeddings.
    """
    if top <= 0 or len(seeds) == 0:
        return []
    half = quantize(seeds, history.dim)
    found = neighbourhoods(history, half, rules.k)
    if not found:
        return []
    seen: set[bytes] = set()
    centres: list[npt.NDArray[np.float64]] = []
    modalities: list[str] = []
    for around, modality in zip(found, seed_modalities, strict=True):
        signature = np.sort(around.ids).tobytes()
        if signature in seen:
            continue
        seen.add(signature)
        centres.append(around.centroid)
        modalities.append(modality)
    stacked = quantize(np.stack(centres), history.dim)
    scores = gap_scores(history, stacked, rules.k, rules.qualify_ratio)
    around_centres = neighbourhoods(history, stacked, rules.k)
    gaps = [
        Gap(stacked[i].astype(np.float64), modalities[i], score.d_nn, score.score_ppm, near.ids)
        for i, (score, near) in enumerate(zip(scores, around_centres, strict=True))
        if score.qualified
    ]
    gaps.sort(key=lambda gap: -gap.size)
    return gaps[:top]
