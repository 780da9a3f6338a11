"""Hostile bytes against the wire decoder (issue 5, item 3).

Whatever arrives on ``submissions``, ``node.codec.unpack`` either returns a
value or raises ``CodecError``, and ``node.wire.parse_submission`` either
returns a ``Submission`` or raises ``Rejected`` with one of the stateless
reason codes of DESIGN.md §3: never another exception, and never a hang
(the inputs below are large enough that quadratic or unbounded work shows).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.errors import Reason, Rejected
from node.intake.codec import CodecError, DecodeLimits, pack, unpack
from node.intake.wire import WireLimits, parse_submission
from tests.peer import Peer
from tests.peer import pack as peer_pack

STATELESS_REASONS = frozenset(
    {
        Reason.MALFORMED,
        Reason.NON_CANONICAL,
        Reason.BAD_SIGNATURE,
        Reason.BAD_COMMITMENT,
        Reason.TOO_LARGE,
        Reason.UNSUPPORTED_MODALITY,
        Reason.SAME_MODALITY,
    }
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PEER = Peer()
SEEDS = [
    PEER.submission([("text", "text/plain", b"a red circle")], created_ms=1_700_000_000_000),
    PEER.submission(
        [("text", "text/plain", b"a tone"), ("audio", "audio/wav", b"RIFF....WAVE")],
        created_ms=1_700_000_000_000,
    ),
    PEER.submission(
        [("image", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(300)), ("video", "video/mp4", b"x")],
        created_ms=1_700_000_000_000,
    ),
]


def check_unpack(raw: bytes, limits: DecodeLimits | None = None) -> None:
    try:
        value = unpack(raw, limits or DecodeLimits())
    except CodecError:
        return
    assert pack(value) == raw


def check_parse(raw: bytes, limits: WireLimits | None = None) -> Reason | None:
    """Parse ``raw``; returns the rejection reason, or None when it parses."""
    try:
        submission = parse_submission(raw, limits)
    except Rejected as rejected:
        assert rejected.reason in STATELESS_REASONS
        assert rejected.submitter is None or len(rejected.submitter) == 32
        return rejected.reason
    assert submission.raw == raw
    assert 1 <= len(submission.items) <= 2
    return None


def check(raw: bytes) -> Reason | None:
    check_unpack(raw)
    return check_parse(raw)


def test_the_seeds_parse() -> None:
    for raw in SEEDS:
        assert check(raw) is None


# --- random and mutated bytes ------------------------------------------------


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(raw: bytes) -> None:
    check(raw)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid submission with bit flips, overwrites, truncations, insertions, copies."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "copy", "word"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCB, 0xDD, 0xDF, 0xFF]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "copy":
            start = draw(st.integers(0, max(0, len(data) - 1)))
            data[at:at] = data[start : start + draw(st.integers(1, 64))]
        elif op == "word" and len(data) >= 4:
            at = min(at, len(data) - 4)
            data[at : at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff"]))
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_submissions(raw: bytes) -> None:
    check(raw)


# --- hand-built msgpack, lying headers included ------------------------------

_CLAIMS = [1025, 65, 2**16 - 1, 2**31, 2**32 - 1]


def _lying_header(code: int, claim: int) -> bytes:
    width = {0xDC: 2, 0xDE: 2, 0xC5: 2, 0xDA: 2, 0xC4: 1, 0xD9: 1}.get(code, 4)
    return bytes([code]) + (claim % (1 << (8 * width))).to_bytes(width, "big")


def _ext(code: int, data: bytes) -> bytes:
    """An extension value, the timestamp type -1 included (``ExtType`` refuses codes < 0)."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}.get(len(data))
    head = bytes([fixed]) if fixed else b"\xc7" + bytes([len(data)])
    return head + struct.pack(">b", code) + data


atoms = st.one_of(
    st.sampled_from([b"\xc0", b"\xc2", b"\xc3", b"\xc1"]),
    st.integers(-(2**63), 2**64 - 1).map(msgpack.packb),
    st.integers(0, 2**16 - 1).map(lambda n: b"\xcf" + n.to_bytes(8, "big")),  # too wide
    st.floats(allow_nan=True).map(lambda f: msgpack.packb(f)),
    st.floats(width=32).map(lambda f: b"\xca" + struct.pack(">f", f)),
    st.binary(max_size=40).map(lambda b: msgpack.packb(b, use_bin_type=True)),
    st.text(max_size=20).map(lambda s: msgpack.packb(s)),
    st.binary(max_size=31).map(lambda b: bytes([0xA0 | len(b)]) + b),  # str, any bytes
    st.binary(max_size=20).map(lambda b: b"\xd9" + bytes([len(b)]) + b),  # str8, any bytes
    st.tuples(st.integers(-128, 127), st.binary(max_size=20)).map(lambda t: _ext(*t)),
    st.tuples(
        st.sampled_from([0xDC, 0xDD, 0xDE, 0xDF, 0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB]),
        st.sampled_from(_CLAIMS),
    ).map(lambda t: _lying_header(*t)),
)


def _array(items: list[bytes]) -> bytes:
    head = (
        bytes([0x90 | len(items)]) if len(items) < 16 else b"\xdc" + struct.pack(">H", len(items))
    )
    return head + b"".join(items)


def _map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    head = (
        bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + struct.pack(">H", len(pairs))
    )
    return head + b"".join(key + value for key, value in pairs)


keys = st.one_of(
    st.sampled_from(["v", "submitter", "nonce", "created_ms", "items", "sig", "data"]).map(
        msgpack.packb
    ),
    atoms,
)
raw_values = st.recursive(
    atoms,
    lambda children: (
        st.lists(children, max_size=20).map(_array)
        | st.lists(st.tuples(keys, children), max_size=8).map(_map)
        | st.tuples(keys, children).map(lambda kv: _map([kv, kv]))
    ),  # duplicated key
    max_leaves=40,
)


@FUZZ
@given(raw_values)
def test_hand_built_msgpack(raw: bytes) -> None:
    check(raw)


FIELDS = ["created_ms", "items", "nonce", "sig", "submitter", "v"]


def _splice(field: str, raw_value: bytes) -> bytes:
    """SEEDS[0] with one top-level field's encoded value replaced by raw bytes."""
    message = msgpack.unpackb(SEEDS[0], raw=False)
    pairs = [
        (msgpack.packb(key), raw_value if key == field else peer_pack(message[key]))
        for key in FIELDS
    ]
    return _map(pairs)


@FUZZ
@given(st.sampled_from(FIELDS), raw_values)
def test_hand_built_values_inside_a_submission(field: str, raw_value: bytes) -> None:
    assert check(_splice(field, raw_value)) is not None


# --- well-signed submissions with hostile fields ----------------------------

texts = st.one_of(
    st.sampled_from(
        [
            "text",
            "image",
            "audio",
            "video",
            "text/plain",
            "image/png",
            "image/jpeg",
            "audio/wav",
            "video/mp4",
            "",
        ]
    ),
    st.text(max_size=12),
)
field_values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=70),
    texts,
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(texts, st.integers(0, 3), max_size=3),
)


@st.composite
def signed_bodies(draw: st.DrawFn) -> dict[str, Any]:
    items = [
        {
            "modality": draw(texts),
            "mime": draw(texts),
            "data": (data := draw(st.binary(max_size=64))),
            "sha256": hashlib.sha256(data).digest()
            if draw(st.booleans())
            else draw(st.binary(min_size=32, max_size=32)),
        }
        for _ in range(draw(st.integers(0, 3)))
    ]
    body: dict[str, Any] = {
        "v": 1,
        "submitter": PEER.public,
        "nonce": draw(st.integers(0, 2**64 - 1)),
        "created_ms": 1_700_000_000_000,
        "items": items,
    }
    for _ in range(draw(st.integers(0, 2))):
        target = body if not items or draw(st.booleans()) else draw(st.sampled_from(items))
        target[draw(st.sampled_from([*target, "extra"]))] = draw(field_values)
    return body


@FUZZ
@given(signed_bodies())
def test_signed_submissions_with_hostile_fields(body: dict[str, Any]) -> None:
    raw = PEER.sign(body)
    reason = check(raw)
    if reason is None:
        assert body["v"] == 1 and type(body["v"]) is int


# --- nesting and sizes large enough that a hang or a crash would show ---------


@pytest.mark.parametrize("depth", [31, 32, 33, 500, 990, 1000, 1023, 1024, 1025, 5000, 500_000])
@pytest.mark.parametrize(
    "opener", [b"\x91", b"\x81\xa1k", b"\xdc\x00\x01", b"\xdf\x00\x00\x00\x01\xa0"]
)
def test_deep_nesting_is_refused_or_decoded(depth: int, opener: bytes) -> None:
    raw = opener * depth + b"\xc0"
    check_unpack(raw, DecodeLimits(max_bytes=len(raw)))
    reason = check_parse(raw, WireLimits(message_bytes=len(raw)))
    # A shallow one is refused for its wide headers or for not being a submission.
    assert reason is Reason.MALFORMED or (depth <= 32 and reason is Reason.NON_CANONICAL)


def test_nesting_past_the_recursion_limit_is_a_codec_error() -> None:
    """Regression: 1000 nested arrays (msgpack allows 1024) raised RecursionError."""
    with pytest.raises(CodecError, match="nested deeper"):
        unpack(b"\x91" * 1000 + b"\xc0")
    assert unpack(b"\x91" * 32 + b"\xc0") == _nested(32)
    with pytest.raises(CodecError, match="nested deeper"):
        unpack(b"\x91" * 33 + b"\xc0")


def _nested(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


def test_deep_nesting_inside_a_submission_names_its_submitter() -> None:
    raw = _splice("items", b"\x91" * 1000 + b"\xc0")
    with pytest.raises(Rejected) as caught:
        parse_submission(raw)
    assert caught.value.reason is Reason.MALFORMED
    assert caught.value.submitter == PEER.public


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("code", [0xDD, 0xDF, 0xC6, 0xDB])
def test_headers_claiming_four_billion_entries_are_malformed(field: str, code: int) -> None:
    raw = _splice(field, _lying_header(code, 2**32 - 1) + bytes(64))
    assert check(raw) is Reason.MALFORMED


def test_a_wide_flat_container_is_refused_without_building_it() -> None:
    raw = b"\xdd" + struct.pack(">I", 1_000_000) + b"\xc0" * 1_000_000
    assert check(raw) is Reason.MALFORMED
    raw = b"\xdf" + struct.pack(">I", 500_000) + b"\xa0\xc0" * 500_000
    assert check(raw) is Reason.MALFORMED


def test_a_message_over_the_size_limit_is_too_large_and_attributed() -> None:
    raw = _splice("items", b"\xc6" + struct.pack(">I", 8 * 1024 * 1024) + bytes(8 * 1024 * 1024))
    with pytest.raises(Rejected) as caught:
        parse_submission(raw)
    assert caught.value.reason is Reason.TOO_LARGE
    assert caught.value.submitter == PEER.public


@pytest.mark.parametrize(
    ("field", "raw_value"),
    [
        ("submitter", b"\xa2\xff\xfe"),  # invalid UTF-8 as str
        ("sig", b"\xd9\x02\xc3\x28"),
        ("nonce", b"\xcb" + struct.pack(">d", 1.0)),  # float
        ("nonce", b"\xca" + struct.pack(">f", float("nan"))),
        ("created_ms", b"\xd6\xff\x00\x00\x00\x01"),  # timestamp extension
        ("items", b"\xc7\x00\x05"),  # empty extension
        ("v", b"\xcd\x00\x01"),  # 1 in a too-wide encoding
    ],
)
def test_foreign_encodings_inside_a_submission(field: str, raw_value: bytes) -> None:
    assert check(_splice(field, raw_value)) in (Reason.MALFORMED, Reason.NON_CANONICAL)


def test_duplicated_keys_are_non_canonical() -> None:
    message = msgpack.unpackb(SEEDS[0], raw=False)
    pairs = [(msgpack.packb(key), peer_pack(message[key])) for key in FIELDS]
    duplicated = _map([*pairs[:3], pairs[2], *pairs[3:]])
    assert check(duplicated) is Reason.NON_CANONICAL


def test_version_true_is_malformed() -> None:
    """Regression: ``v: true`` compared equal to 1 and was accepted as version 1."""
    body = PEER.body([("text", "text/plain", b"hello")], created_ms=1_700_000_000_000)
    body["v"] = True
    assert check(PEER.sign(body)) is Reason.MALFORMED
