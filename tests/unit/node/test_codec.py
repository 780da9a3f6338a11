import enum

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.intake.codec import CodecError, DecodeLimits, NonCanonicalError, pack, peek_field, unpack


def test_keys_are_sorted_bytewise_and_nested():
    raw = pack({"b": 1, "a": {"z": b"x", "y": [1, "s"]}})
    assert raw == msgpack.packb({"a": {"y": [1, "s"], "z": b"x"}, "b": 1}, use_bin_type=True)
    assert unpack(raw) == {"a": {"y": [1, "s"], "z": b"x"}, "b": 1}


def test_unsorted_map_is_non_canonical():
    raw = msgpack.packb({"b": 1, "a": 2}, use_bin_type=True)
    with pytest.raises(NonCanonicalError):
        unpack(raw)


def test_wide_integer_encoding_is_non_canonical():
    raw = b"\x81\xa1a\xcd\x00\x05"  # {"a": 5} with 5 as uint16
    with pytest.raises(NonCanonicalError):
        unpack(raw)


def test_bytes_as_str_are_refused_as_non_canonical_or_malformed():
    legacy = msgpack.packb({"a": b"\xff\xfe"}, use_bin_type=False)  # raw str with bad UTF-8
    with pytest.raises(CodecError):
        unpack(legacy)


def test_floats_and_ext_types_are_refused():
    with pytest.raises(CodecError):
        unpack(msgpack.packb({"a": 1.5}))
    with pytest.raises(CodecError):
        unpack(msgpack.packb({"a": msgpack.ExtType(1, b"x")}))
    with pytest.raises(CodecError):
        pack({"a": 0.5})


def test_non_string_keys_and_trailing_bytes_are_refused():
    with pytest.raises(CodecError):
        unpack(msgpack.packb({1: 2}))
    with pytest.raises(CodecError):
        unpack(pack({"a": 1}) + b"\x00")


def test_deep_nesting_and_huge_containers_are_refused():
    deep = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(CodecError):
        unpack(deep)
    huge = b"\xdd\xff\xff\xff\xff"  # array header claiming 4 billion entries
    with pytest.raises(CodecError):
        unpack(huge, DecodeLimits(max_container_len=64))


def test_peek_field_reads_one_field_without_the_rest():
    raw = pack({"submitter": b"k" * 32, "zz": b"x" * 1000})
    assert peek_field(raw, "submitter") == b"k" * 32
    assert peek_field(raw[:10], "zz") is None
    assert peek_field(b"\xc1garbage", "submitter") is None


def _tree(depth: int, header: bytes = b"\x9f", width: int = 15, leaf: bytes = b"\x90") -> bytes:
    return leaf if depth == 0 else header + _tree(depth - 1, header, width, leaf) * width


AMPLIFIERS = {
    "wide tree of one-byte arrays": _tree(5),
    "wide tree of one-byte maps": _tree(4, b"\x8f", 30, b"\x80"),
    "deep nesting": b"\x91" * (4 * 1024 * 1024) + b"\x90",
    "many empty strings in arrays": (b"\xdc\x00\x40" + b"\xa0" * 64) * 8000,
    "a map of many tiny keys": b"\xdf\x00\x00\x10\x00"
    + b"".join(b"\xa2" + i.to_bytes(2, "big") + b"\xc0" for i in range(4096)),
}


@pytest.mark.parametrize("name", sorted(AMPLIFIERS))
def test_amplifying_shapes_are_refused_before_any_object_is_built(name):
    """No message costs more than a few times its size in memory (DESIGN §3, THREATS)."""
    import tracemalloc

    from node.intake.codec import CodecError, DecodeLimits, unpack
    from node.intake.wire import Reason, Rejected, parse_submission

    raw = AMPLIFIERS[name]
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            unpack(
                raw, DecodeLimits(max_bytes=8 * 1024 * 1024, max_container_len=64, max_objects=1024)
            )
        with pytest.raises(Rejected) as refused:
            parse_submission(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.reason is Reason.MALFORMED
    assert peak <= 3 * len(raw) + 2 * 1024 * 1024, f"{name}: peak {peak} for {len(raw)} bytes"


def test_an_amplifying_message_that_names_a_submitter_is_attributed():
    from node.intake.codec import pack
    from node.intake.wire import Reason, Rejected, parse_submission

    # a map whose first field names the submitter and whose second is a bomb
    raw = b"\x82" + pack("submitter") + pack(b"k" * 32) + pack("x") + _tree(5)
    with pytest.raises(Rejected) as refused:
        parse_submission(raw)
    assert refused.value.reason is Reason.MALFORMED and refused.value.submitter == b"k" * 32


def _bytewise(value):
    """The canonical form by its definition: every map's keys in UTF-8 byte order."""
    if isinstance(value, dict):
        return {k: _bytewise(value[k]) for k in sorted(value, key=lambda k: k.encode("utf-8"))}
    if isinstance(value, list | tuple):
        return [_bytewise(item) for item in value]
    return value


_keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8) | _keys,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(_keys, inner, max_size=5)
    ),
    max_leaves=30,
)


@given(_values)
def test_pack_sorts_every_key_bytewise_whatever_its_script(value):
    # The short way sorts str by code point; for any text that is UTF-8's byte order.
    expected = msgpack.packb(_bytewise(value), use_bin_type=True)
    assert pack(value) == expected
    assert unpack(expected) == _bytewise(value)


def test_str_subclass_keys_and_values_take_the_long_way():
    class Name(enum.StrEnum):
        B = "b"
        A = "a"

    assert pack({Name.B: 1, Name.A: [Name.B]}) == pack({"a": ["b"], "b": 1})
