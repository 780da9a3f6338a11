"""Canonical msgpack: the only byte form of a signed message (DESIGN.md §3).

Canonical means map keys sorted bytewise, the smallest integer encodings, no
floats, bytes as ``bin`` and text as ``str``. A message whose bytes are not the
canonical encoding of its own decoding is refused, so a signature always
covers exactly one byte string and nobody can re-encode a message to give it
a new identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack


class CodecError(ValueError):
    """Bytes that are not a msgpack value this protocol accepts."""


class NonCanonicalError(CodecError):
    """Valid msgpack whose bytes differ from the canonical encoding."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds applied while decoding, before any object is built past them."""

    max_bytes: int = 8 * 1024 * 1024
    max_container_len: int = 1024
    max_str_len: int = 64 * 1024
    max_depth: int = 32
    """Nesting of maps and arrays; msgpack allows ~1000, past Python's recursion limit."""
    max_objects: int = 200_000
    """Values in the whole message (containers, keys and leaves), counted before any is built."""


_PLAIN = frozenset({int, str, bytes, bool, type(None)})
"""Types that are their own canonical form (exactly these: subclasses take the long way)."""


def _canonical(value: Any) -> Any:
    """``value`` with every map's keys in bytewise order, refused if it has no canonical form.

    Plain dicts of ``str`` keys and lists take a short way: for valid text,
    code point order (``sorted``) is UTF-8's bytewise order.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is dict:
        if set(map(type, value)) <= _STR:
            out = {}
            for key in sorted(value):
                item = value[key]
                out[key] = item if type(item) in _PLAIN else _canonical(item)
            return out
    elif kind is list or kind is tuple:
        return [item if type(item) in _PLAIN else _canonical(item) for item in value]
    return _canonical_other(value)


_STR = frozenset({str})


def _canonical_other(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        items = []
        for key in value:
            if not isinstance(key, str):
                raise CodecError(f"map key {key!r} is not a string")
            items.append((key.encode("utf-8"), key, _canonical(value[key])))
        items.sort(key=lambda entry: entry[0])
        return {key: item for _, key, item in items}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, float):
        raise CodecError("floats are not allowed in signed messages; use fixed-point integers")
    raise CodecError(f"type {type(value).__name__} has no canonical encoding")


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically."""
    packed: bytes = msgpack.packb(_canonical(value), use_bin_type=True)
    return packed


def _reject_foreign(value: Any, max_depth: int, depth: int = 0) -> None:
    """Refuse values that msgpack decodes but the protocol never sends."""
    if isinstance(value, dict | list) and depth >= max_depth:
        raise CodecError(f"containers are nested deeper than {max_depth} levels")
    if isinstance(value, float):
        raise CodecError("floats are not allowed")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError("map keys must be strings")
            if type(item) not in _PLAIN:
                _reject_foreign(item, max_depth, depth + 1)
    elif isinstance(value, list):
        for item in value:
            if type(item) not in _PLAIN:
                _reject_foreign(item, max_depth, depth + 1)
    elif isinstance(value, msgpack.ExtType):
        raise CodecError("extension types are not allowed")


def unpack(raw: bytes, limits: DecodeLimits = DecodeLimits()) -> Any:
    """Decode ``raw`` and insist that it is canonical.

    Raises :class:`CodecError` for bytes that are not one acceptable msgpack
    value, :class:`NonCanonicalError` when they are, but not canonically
    encoded.
    """
    if len(raw) > limits.max_bytes:
        raise CodecError(f"{len(raw)} bytes exceed the limit of {limits.max_bytes}")
    if len(raw) > limits.max_objects:  # shorter, it cannot hold more values than that
        check_shape(raw, limits)
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as error:
        raise CodecError(f"not a msgpack value: {error}") from error
    _reject_foreign(value, limits.max_depth)
    try:
        again = pack(value)
    except CodecError as error:  # pragma: no cover - _reject_foreign already refused it
        raise CodecError(str(error)) from error
    if again != raw:
        raise NonCanonicalError("bytes are not the canonical encoding of their own decoding")
    return value


_ARRAY_HEADERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


def check_shape(raw: bytes, limits: DecodeLimits) -> None:
    """Walk the message's structure without building it; refuse it past the limits.

    Decoding builds one Python object per msgpack value, and a value can be
    one byte: a few MiB of nested one-byte arrays would become hundreds of MB
    of lists and seconds of work before anything else could look at them (a
    message that names no submitter, so no rate limit applies). This walk
    reads only container headers, skips every leaf in C (``Unpacker.skip``),
    and stops at ``max_objects`` values or ``max_depth`` levels, so its cost
    is bounded by the limits, not by what the sender chose.
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        max_buffer_size=max(len(raw), 1),
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bytes,
        max_array_len=limits.max_container_len,
        max_map_len=limits.max_container_len,
        max_ext_len=0,
    )
    unpacker.feed(raw)
    remaining = [1]  # values still to read at each open level
    budget = limits.max_objects
    try:
        while remaining:
            if remaining[-1] == 0:
                remaining.pop()
                continue
            remaining[-1] -= 1
            budget -= 1
            if budget < 0:
                raise CodecError(f"more than {limits.max_objects} values")
            position = unpacker.tell()
            if position >= len(raw):
                raise CodecError("truncated message")
            header = raw[position]
            if header in _ARRAY_HEADERS:
                count = unpacker.read_array_header()
            elif header in _MAP_HEADERS:
                count = 2 * unpacker.read_map_header()
            else:
                unpacker.skip()
                continue
            if len(remaining) > limits.max_depth:
                raise CodecError(f"containers are nested deeper than {limits.max_depth} levels")
            remaining.append(count)
    except CodecError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, StopIteration) as error:
        raise CodecError(f"not a msgpack value: {error}") from error
    if unpacker.tell() != len(raw):
        raise CodecError("extra bytes after the message")


def peek_field(raw: bytes, field: str, limits: DecodeLimits = DecodeLimits()) -> Any:
    """Read one top-level field of a msgpack map without decoding the rest.

    Used to find whom a refused message claims to come from (so the refusal can
    be published to that submitter) even when the message is too large or
    malformed further in. Returns ``None`` when the field cannot be found.
    """
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=max(len(raw), 1),
        max_str_len=limits.max_str_len,
        max_array_len=limits.max_container_len,
        max_map_len=limits.max_container_len,
        max_ext_len=0,
    )
    try:
        unpacker.feed(raw)
        entries = unpacker.read_map_header()
        for _ in range(min(entries, limits.max_container_len)):
            key = unpacker.unpack()
            if key == field:
                return unpacker.unpack()
            unpacker.skip()
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError, StopIteration):
        return None
    return None
