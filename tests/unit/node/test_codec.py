import msgpack
import pytest

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
