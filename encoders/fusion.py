"""Cross-modal fusion of a pair (DESIGN §5), in numpy only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from encoders.embedding import ItemEmbedding
from encoders.modality import Modality

Vector = npt.NDArray[np.float32]

PPM = 1_000_000
"""A pair's distance travels in parts per million (DESIGN §3 ``pair_distance_ppm``)."""


def distance_ppm(distance: float) -> int:
    """``distance`` as the protocol carries it."""
    return round(distance * PPM)


def too_far_ppm(pair_distance_ppm: int, delta: float) -> bool:
    """The pair decision on the published figure: further than δ, both in ppm.

    Decided at the resolution a record carries, so that anyone holding the
    record can check it. On the exact distance, a pair within half a ppm
    above δ was too far for its proposer while its record said δ: every other
    member refused the record, and a submitter could craft one (found from
    the outside: a committee stalled for good on one such pair).
    """
    return pair_distance_ppm > distance_ppm(delta)


@dataclass(frozen=True)
class PairOutcome:
    """The pairing decision; ``fused`` is None exactly when ``too_far``."""

    distance: float
    too_far: bool
    fused: tuple[Vector, Vector] | None


def cosine_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """``1 - cos(a, b)`` in float64, in [0, 2]; zero vectors have no direction."""
    va = np.asarray(a, dtype=np.float64)
    vb = np.asarray(b, dtype=np.float64)
    norms = float(np.linalg.norm(va) * np.linalg.norm(vb))
    if not norms > 0.0:
        raise ValueError("cosine distance of a zero or non-finite vector")
    return float(np.clip(1.0 - float(va @ vb) / norms, 0.0, 2.0))


def fuse_pair(
    a: ItemEmbedding,
    b: ItemEmbedding,
    modality_a: Modality,
    modality_b: Modality,
    alpha: Mapping[Modality, float],
    delta: float,
) -> PairOutcome:
    """Fuse both items of a pair together, or declare the pair too far apart
    (:func:`too_far_ppm`).

    ``fused_a = normalize(alpha_a·q_a·e_a + (1-alpha_a)·q_b·e_b)`` and symmetrically
    for b. If a combination cancels out (possible only when δ admits
    opposite vectors), that item keeps its own embedding.
    """
    for modality in (modality_a, modality_b):
        if not 0.0 <= alpha[modality] <= 1.0:
            raise ValueError(f"alpha[{modality}]={alpha[modality]} is not in [0, 1]")
    distance = cosine_distance(a.vector, b.vector)
    if too_far_ppm(distance_ppm(distance), delta):
        return PairOutcome(distance=distance, too_far=True, fused=None)
    fused_a = _mix(a, b, alpha[modality_a])
    fused_b = _mix(b, a, alpha[modality_b])
    return PairOutcome(distance=distance, too_far=False, fused=(fused_a, fused_b))


def _mix(own: ItemEmbedding, other: ItemEmbedding, alpha: float) -> Vector:
    own_vector = np.asarray(own.vector, dtype=np.float64)
    mixed = alpha * own.quality * own_vector + (1.0 - alpha) * other.quality * np.asarray(
        other.vector, dtype=np.float64
    )
    norm = float(np.linalg.norm(mixed))
    if not norm > 1e-12:
        mixed, norm = own_vector, float(np.linalg.norm(own_vector))
    return (mixed / norm).astype(np.float32)
