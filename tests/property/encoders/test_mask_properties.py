from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from encoders.masks import MASK_SHARES, kept_count, mask_seed, token_masks

shares = st.one_of(st.sampled_from(sorted(MASK_SHARES.values())), st.floats(0.01, 0.99))
digests = st.binary(min_size=32, max_size=32)


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


def test_known_answer_pins_the_draw_across_machines() -> None:
    masks = token_masks(10, 0.5, b"beacon", bytes(32), 2)
    assert np.flatnonzero(masks[0]).tolist() == KNOWN_ROW_0


KNOWN_ROW_0 = [0, 1, 2, 3, 8]
