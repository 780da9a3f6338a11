"""Deterministic token masks for the differential loss (DESIGN §4).

Every validator must draw the same masks for the same item in the same epoch,
so the masks depend only on the epoch beacon, the item's SHA-256 and the mask
index, and the draw uses only the parts of numpy's PCG64 whose output is
fixed across platforms: ``SeedSequence`` seeding and ``Generator.random``
doubles, ranked with a stable sort.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import numpy.typing as npt

from encoders.modality import Modality

MASK_SHARES: dict[Modality, float] = {
    Modality.TEXT: 0.15,
    Modality.IMAGE: 0.85,
    Modality.VIDEO: 0.90,
    Modality.AUDIO: 0.80,
}
"""Share of tokens each mask keeps, per modality (DESIGN §4)."""


def mask_seed(epoch_beacon: bytes, data_sha256: bytes, k: int) -> bytes:
    """``sha256(epoch_beacon ‖ data_sha256 ‖ k as 4-byte big-endian)``."""
    return hashlib.sha256(epoch_beacon + data_sha256 + k.to_bytes(4, "big")).digest()


def kept_count(n_tokens: int, share: float) -> int:
    """Tokens a mask keeps: ``share·n`` rounded half up, and both halves non-empty.

    Half-up (not Python's banker's rounding) so the rule reads the same in
    any language a peer implements it in.
    """
    if n_tokens <= 1:
        return n_tokens
    return min(n_tokens - 1, max(1, math.floor(share * n_tokens + 0.5)))


def token_masks(
    n_tokens: int, share: float, epoch_beacon: bytes, data_sha256: bytes, count: int
) -> npt.NDArray[np.bool_]:
    """Boolean ``[count, n_tokens]``: row k keeps ``kept_count`` tokens chosen by seed k."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"mask share {share} is not in (0, 1)")
    if n_tokens < 0 or count < 0:
        raise ValueError(f"negative n_tokens={n_tokens} or count={count}")
    keep = kept_count(n_tokens, share)
    masks = np.zeros((count, n_tokens), dtype=np.bool_)
    for k in range(count):
        seed = int.from_bytes(mask_seed(epoch_beacon, data_sha256, k), "big")
        draws = np.random.Generator(np.random.PCG64(seed)).random(n_tokens)
        masks[k, np.argsort(draws, kind="stable")[:keep]] = True
    return masks
