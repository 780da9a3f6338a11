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
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from encoders.modality import Modality
from encoders.pcg64 import draw_keys, seed_sequence_state, seed_words

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
    masks: npt.NDArray[np.bool_] = batch_token_masks(
        [n_tokens], share, epoch_beacon, [data_sha256], count
    )[0]
    return masks


def batch_token_masks(
    n_tokens: Sequence[int],
    share: float,
    epoch_beacon: bytes,
    data_sha256s: Sequence[bytes],
    count: int,
) -> npt.NDArray[np.bool_]:
    """Boolean ``[B, count, max(n_tokens)]``: the masks of B items at once.

    Row ``[b, k]`` keeps ``kept_count(n_b, share)`` of item b's first ``n_b``
    tokens: those whose draws of ``PCG64(int(mask_seed(…, k)))`` rank lowest
    (``Generator.random``, ties by position), the same as drawing each mask
    with its own numpy generator; the positions past ``n_b`` are False. Only
    the seeds' SHA-256 runs per mask; the generators run as arrays
    (``encoders.pcg64``).
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"mask share {share} is not in (0, 1)")
    if len(n_tokens) != len(data_sha256s):
        raise ValueError(f"{len(n_tokens)} token counts for {len(data_sha256s)} items")
    if count < 0 or any(n < 0 for n in n_tokens):
        raise ValueError(f"negative n_tokens={list(n_tokens)} or count={count}")
    width = max(n_tokens, default=0)
    if count == 0 or width == 0:
        return np.zeros((len(n_tokens), count, width), dtype=np.bool_)
    digests = b"".join(
        mask_seed(epoch_beacon, sha, k) for sha in data_sha256s for k in range(count)
    )
    keys = draw_keys(seed_sequence_state(seed_words(digests)), width)
    keys = keys.reshape(len(n_tokens), count, width)
    position = np.arange(width)
    sizes = np.asarray(n_tokens)[:, None, None]
    keys = np.where(position < sizes, keys, np.uint64(_PAST_END))
    order = np.argsort(keys, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(position, order.shape), axis=-1)
    kept = np.asarray([kept_count(n, share) for n in n_tokens])
    masks: npt.NDArray[np.bool_] = rank < kept[:, None, None]
    return masks


_PAST_END = 1 << 53
"""A rank key above every draw's (53 bits): positions past an item's tokens sort last."""
