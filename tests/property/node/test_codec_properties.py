from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from node.intake.codec import pack, unpack

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=32),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(values)
def test_canonical_round_trip(value: Any) -> None:
    raw = pack(value)
    assert unpack(raw) == value
    assert pack(unpack(raw)) == raw


@given(
    st.dictionaries(st.text(min_size=1, max_size=6), st.integers(0, 300), min_size=2, max_size=6)
)
def test_any_other_key_order_is_refused_or_identical(mapping: dict[str, int]) -> None:
    reversed_raw = msgpack.packb(dict(reversed(list(mapping.items()))), use_bin_type=True)
    canonical = pack(mapping)
    if reversed_raw != canonical:
        try:
            unpack(reversed_raw)
        except ValueError:
            return
        raise AssertionError("a non-canonical encoding was accepted")
