"""numpy's PCG64 stream for many seeds at once, bit for bit, in array operations.

The masks of DESIGN §4 are specified as ``numpy.random.Generator(PCG64(seed))
.random(n)`` for a 256-bit seed (``encoders.masks``). Drawn one generator at a
time that costs about 20 µs of Python and object set-up per mask, which is
most of an item's cost on a GPU. This module computes the same draws for a
whole batch of seeds with numpy array arithmetic, no Python per seed (and no
torch: the sandboxed decoders import the ``encoders`` package):

1. ``SeedSequence(seed).generate_state(4, uint64)``: the entropy words of
   every seed hashed and mixed into a pool of four 32-bit words, then
   expanded (numpy's ``bit_generator.pyx``), on ``[G]`` uint32 arrays, whose
   products wrap mod 2^32 as the C code's do (``seed_sequence_state``).
2. PCG64's seeding (``pcg64_set_seed``: state and increment from those
   words, two LCG steps) and the ``n`` next states of every generator at once
   by jump-ahead, one affine map of the seed mod 2^128, computed as one
   float64 matrix product of 16-bit limbs; then PCG64's
   XSL-RR output of each state. ``random()`` is the output's top 53 bits times
   2^-53, so those 53 bits (``draw_keys``) order the draws exactly as the
   doubles do.

In the jump-ahead, 128-bit numbers are 16-bit limbs and 32-bit words summed
exactly in float64, carried in int64; the output is uint64, whose shifts and
rotations numpy defines for every amount used here (below 64). The tests compare both
steps with numpy on seeds of every length.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

_M16 = 0xFFFF
_M32 = 0xFFFF_FFFF
_M128 = (1 << 128) - 1
_LIMBS = 8
"""16-bit limbs of a 128-bit number."""

# SeedSequence (numpy/random/bit_generator.pyx)
_POOL = 4
_INIT_A = 0x43B0D7E5
_MULT_A = 0x931E8875
_INIT_B = 0x8B51F9DD
_MULT_B = 0x58F38DED
_MIX_MULT_L = 0xCA01F9DD
_MIX_MULT_R = 0x4973F715
_XSHIFT = 16

PCG_MULTIPLIER = (2549297995355413924 << 64) + 4865540595714422341
"""PCG64's LCG multiplier (numpy/random/src/pcg64/pcg64.h)."""

Words = npt.NDArray[np.uint32]


def seed_words(digests: bytes) -> Words:
    """The 32-bit words ``[G, 8]``, least significant first, of 256-bit seeds given
    as concatenated big-endian 32-byte digests: each seed's integer value."""
    words: Words = np.frombuffer(digests, dtype=">u4").reshape(-1, 8)[:, ::-1].astype(np.uint32)
    return words


@lru_cache(maxsize=64)
def _consts(start: int, mult: int, count: int) -> tuple[Words, Words, int]:
    """A hash constant multiplied by ``mult`` before each of ``count`` uses: its
    values before and after each step, and its value at the end."""
    before, after = [], []
    for _ in range(count):
        before.append(start)
        start = (start * mult) & _M32
        after.append(start)
    return np.array(before, dtype=np.uint32), np.array(after, dtype=np.uint32), start


_SHIFT = np.uint32(_XSHIFT)
_LEFT = np.uint32(_MIX_MULT_L)
_RIGHT = np.uint32(_MIX_MULT_R)


def _hashmix(value: Words, before: Words, after: Words) -> Words:
    """SeedSequence's ``hashmix`` with the constant ``before`` and after its step."""
    value = (value ^ before) * after
    return value ^ (value >> _SHIFT)


def _hashmixes(value: Words, const: int, count: int) -> tuple[Words, int]:
    """``count`` successive ``hashmix`` calls: ``value`` ``[G]`` or ``[G, count]``."""
    before, after, end = _consts(const, _MULT_A, count)
    value = value if value.ndim == 2 else value[:, None]
    return _hashmix(value, before, after), end


def _mix(x: Words, y: Words) -> Words:
    result: Words = x * _LEFT - y * _RIGHT
    return result ^ (result >> _SHIFT)


def seed_sequence_state(words: Words) -> Words:
    """``SeedSequence(int).generate_state(8, uint32)`` for each row of ``[G, 8]`` words.

    numpy takes an integer's words up to its highest non-zero one (at least
    one): a seed whose top words are zero has fewer entropy words, and so
    another pool. Missing pool words hash as zeros, so every length shares
    the first passes; a row stops taking extra words at its length. Within
    one source word numpy's loops are independent, so each runs as one
    ``[G, 4]`` step.
    """
    top = np.where(words != 0, np.arange(1, words.shape[1] + 1), 0)
    length = np.maximum(top.max(axis=1, initial=0), 1)
    pool, const = _hashmixes(words[:, :_POOL], _INIT_A, _POOL)
    for src in range(_POOL):
        others = [dst for dst in range(_POOL) if dst != src]
        mixed, const = _hashmixes(pool[:, src], const, len(others))
        pool[:, others] = _mix(pool[:, others], mixed)
    extra = words.shape[1] - _POOL  # each extra word is hashed once per pool word
    mixed, const = _hashmixes(np.repeat(words[:, _POOL:], _POOL, axis=1), const, extra * _POOL)
    for i in range(extra):
        update = _mix(pool, mixed[:, i * _POOL : (i + 1) * _POOL])
        pool = np.where((length > _POOL + i)[:, None], update, pool)
    before, after, _ = _consts(_INIT_B, _MULT_B, 2 * _POOL)
    state: Words = _hashmix(np.tile(pool, 2), before, after)
    return state


def _limbs(value: int) -> list[int]:
    return [(value >> (16 * r)) & _M16 for r in range(_LIMBS)]


@lru_cache(maxsize=16)
def _jump(n: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The affine map from the seed to the next ``n`` states, before carrying.

    PCG64 seeded with ``initstate`` and ``initseq`` has ``inc = 2·initseq + 1``
    and state ``S = (inc + initstate)·a + inc``; its i-th draw outputs the state
    ``a^i·S + (a^(i-1) + … + 1)·inc``, that is, mod 2^128,
    ``P_i·initstate + Q_i·initseq + R_i`` with ``P_i = a^i·a``,
    ``Q_i = a^i·(2a + 2) + 2·B_i``, ``R_i = a^i·(a + 1) + B_i`` and
    ``B_i = a^(i-1) + … + 1``.

    Returned as a float64 ``[16, n·4]`` matrix that the seed's sixteen 16-bit
    limbs multiply, and the constant ``R`` ``[n·4]``: each column sums to one
    32-bit word of a state, before its carries. A word's sum is below
    ``2^36 + 2^52`` (sixteen products of 16-bit limbs per limb, the upper limb
    times 2^16), so float64 holds it and all its partial sums exactly.
    Read-only: cached.
    """
    a = PCG_MULTIPLIER
    limb_sums = np.zeros((2 * _LIMBS, n, _LIMBS))
    constant = np.zeros((n, _LIMBS))
    power, total = 1, 0
    for i in range(n):
        total = (total + power) & _M128
        power = (power * a) & _M128
        p = (power * a) & _M128
        q = (power * (2 * a + 2) + 2 * total) & _M128
        r = (power * (a + 1) + total) & _M128
        for half, coefficient in ((0, p), (1, q)):
            row = _limbs(coefficient)
            for k in range(_LIMBS):
                limb_sums[half * _LIMBS + k, i, k:] = row[: _LIMBS - k]
        constant[i] = _limbs(r)
    words = limb_sums[..., 0::2] + limb_sums[..., 1::2] * 65536.0
    matrix: npt.NDArray[np.float64] = words.reshape(2 * _LIMBS, n * 4)
    offset: npt.NDArray[np.float64] = (constant[:, 0::2] + constant[:, 1::2] * 65536.0).reshape(
        n * 4
    )
    matrix.flags.writeable = False
    offset.flags.writeable = False
    return matrix, offset


def draw_keys(state_words: Words, n: int) -> npt.NDArray[np.uint64]:
    """``random()·2^53`` (integers below 2^53) of the first ``n`` draws ``[G, n]``
    of ``PCG64`` seeded with ``generate_state`` words ``[G, 8]``.

    PCG64 takes the four uint64 words (little-endian pairs of the 32-bit
    ones) as ``initstate = w0·2^64 + w1`` and ``initseq = w2·2^64 + w3``. The
    jump-ahead is one float64 matrix product, exact (``_jump``). Each draw
    outputs XSL-RR of its state, ``rotr64(hi ^ lo, state >> 122)``;
    ``random()`` keeps the top 53 bits.
    """
    g = state_words.shape[0]
    if n == 0:
        return np.zeros((g, 0), dtype=np.uint64)
    w = state_words.astype(np.int64)
    order = [2, 3, 0, 1, 6, 7, 4, 5]  # initstate, then initseq, least significant first
    seed = np.stack([part for i in order for part in (w[:, i] & _M16, w[:, i] >> 16)], axis=-1)
    matrix, offset = _jump(n)
    sums = (seed.astype(np.float64) @ matrix + offset).astype(np.int64).reshape(g, n, 4)
    words = []
    carry = np.zeros_like(sums[..., 0])
    for j in range(4):
        total = sums[..., j] + carry
        words.append((total & _M32).astype(np.uint64))
        carry = total >> 32
    folded = ((words[1] ^ words[3]) << np.uint64(32)) | (words[0] ^ words[2])
    rot = words[3] >> np.uint64(26)
    rotated = (folded >> rot) | (folded << ((np.uint64(64) - rot) & np.uint64(63)))
    keys: npt.NDArray[np.uint64] = rotated >> np.uint64(11)
    return keys
