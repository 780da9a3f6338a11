from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encoders.masks import MASK_SHARES, batch_token_masks, kept_count, mask_seed, token_masks
from encoders.pcg64 import PCG_MULTIPLIER, draw_keys, seed_sequence_state, seed_words

shares = st.one_of(st.sampled_from(sorted(MASK_SHARES.values())), st.floats(0.01, 0.99))
digests = st.binary(min_size=32, max_size=32)
seeds = st.one_of(
    st.integers(0, 2**256 - 1),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**128 - 1, 2**128, 2**224, 2**256 - 1]),
    st.integers(1, 255).map(lambda bits: 2**bits - 1),
    st.integers(0, 7).flatmap(lambda words: st.integers(0, 2 ** (32 * words + 32) - 1)),
)
"""256-bit seeds of every word length: numpy's SeedSequence takes an integer's
words up to its highest non-zero one, so short seeds take another path."""


def reference_masks(
    n: int, share: float, beacon: bytes, sha: bytes, count: int
) -> npt.NDArray[np.bool_]:
    """DESIGN §4 as first written: one numpy generator per mask."""
    masks = np.zeros((count, n), dtype=np.bool_)
    for k in range(count):
        seed = int.from_bytes(mask_seed(beacon, sha, k), "big")
        draws = np.random.Generator(np.random.PCG64(seed)).random(n)
        masks[k, np.argsort(draws, kind="stable")[: kept_count(n, share)]] = True
    return masks


def digest_bytes(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(32, "big") for v in values)


@given(st.lists(seeds, min_size=1, max_size=8))
def test_seed_sequence_state_is_numpys(values: list[int]) -> None:
    state = seed_sequence_state(seed_words(digest_bytes(values)))
    for value, row in zip(values, state, strict=True):
        np.testing.assert_array_equal(row, np.random.SeedSequence(value).generate_state(8))


@given(st.lists(seeds, min_size=1, max_size=4), st.integers(0, 300))
def test_draws_are_pcg64_random_bit_for_bit(values: list[int], n: int) -> None:
    keys = draw_keys(seed_sequence_state(seed_words(digest_bytes(values))), n)
    assert keys.shape == (len(values), n)
    for value, row in zip(values, keys, strict=True):
        expected = np.random.Generator(np.random.PCG64(value)).random(n)
        np.testing.assert_array_equal(row.astype(np.float64) * 2.0**-53, expected)


def test_draws_cover_every_rotation_of_the_output() -> None:
    """16,384 draws: each of XSL-RR's 64 rotations (both 32-bit halves swapped
    and not) occurs, and every draw is numpy's."""
    values = [int.from_bytes(hashlib.sha256(bytes([i])).digest(), "big") for i in range(64)]
    keys = draw_keys(seed_sequence_state(seed_words(digest_bytes(values))), 256)
    rotations = set()
    for value, row in zip(values, keys, strict=True):
        generator = np.random.PCG64(value)
        for key in row:
            state = generator.state["state"]["state"]
            state = (state * PCG_MULTIPLIER + generator.state["state"]["inc"]) % 2**128
            rotations.add(state >> 122)
            assert key == generator.random_raw() >> 11
    assert rotations == set(range(64))


@given(
    st.lists(st.integers(0, 90), min_size=1, max_size=6),
    shares,
    st.binary(max_size=40),
    st.integers(0, 5),
    st.data(),
)
def test_batch_masks_equal_one_generator_per_mask(
    sizes: list[int], share: float, beacon: bytes, count: int, data: st.DataObject
) -> None:
    shas = data.draw(st.lists(digests, min_size=len(sizes), max_size=len(sizes)))
    masks = batch_token_masks(sizes, share, beacon, shas, count)
    assert masks.shape == (len(sizes), count, max(sizes))
    assert masks.dtype == np.bool_
    for row, n, sha in zip(masks, sizes, shas, strict=True):
        np.testing.assert_array_equal(row[:, :n], reference_masks(n, share, beacon, sha, count))
        assert not row[:, n:].any()


@given(st.integers(0, 400), shares, st.binary(max_size=40), digests, st.integers(0, 6))
def test_masks_are_deterministic_and_keep_the_share(
    n: int, share: float, beacon: bytes, sha: bytes, count: int
) -> None:
    masks = token_masks(n, share, beacon, sha, count)
    assert masks.shape == (count, n)
    assert masks.dtype == np.bool_
    np.testing.assert_array_equal(masks, token_masks(n, share, beacon, sha, count))
    kept = masks.sum(axis=1)
    assert np.all(kept == kept_count(n, share))
    if n >= 2:
        assert np.all((kept >= 1) & (kept <= n - 1))
        assert abs(kept_count(n, share) - share * n) <= 0.5 or kept_count(n, share) in (1, n - 1)


@given(st.integers(2, 200), shares, st.binary(max_size=40), digests, st.integers(1, 5))
def test_rows_are_prefixes_of_the_count(
    n: int, share: float, beacon: bytes, sha: bytes, count: int
) -> None:
    fewer = token_masks(n, share, beacon, sha, count)
    more = token_masks(n, share, beacon, sha, count + 1)
    np.testing.assert_array_equal(fewer, more[:count])


@given(st.binary(max_size=40), digests, st.integers(0, 2**32 - 1))
def test_mask_seed_is_the_specified_hash(beacon: bytes, sha: bytes, k: int) -> None:
    expected = hashlib.sha256(beacon + sha + k.to_bytes(4, "big")).digest()
    assert mask_seed(beacon, sha, k) == expected


def test_masks_depend_on_the_data_hash() -> None:
    a = token_masks(196, 0.85, b"beacon", b"\x00" * 32, 4)
    b = token_masks(196, 0.85, b"beacon", b"\x01" + b"\x00" * 31, 4)
    assert not np.array_equal(a, b)


def test_batch_masks_refuse_mismatched_or_negative_sizes() -> None:
    with pytest.raises(ValueError, match="2 token counts for 1 items"):
        batch_token_masks([3, 4], 0.5, b"b", [bytes(32)], 2)
    with pytest.raises(ValueError, match="negative"):
        batch_token_masks([-1], 0.5, b"b", [bytes(32)], 2)
    with pytest.raises(ValueError, match="not in"):
        batch_token_masks([3], 1.0, b"b", [bytes(32)], 2)


def test_known_answer_pins_the_draw_across_machines() -> None:
    masks = token_masks(10, 0.5, b"beacon", bytes(32), 2)
    assert np.flatnonzero(masks[0]).tolist() == KNOWN_ROW_0


KNOWN_ROW_0 = [0, 1, 2, 3, 8]
