"""Stateless checks of wire protocol v1, against messages built by the independent peer."""

import hashlib

import msgpack
import pytest

from encoders.modality import MEDIA_TYPES, Modality
from node.errors import Reason, Rejected
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.intake.wire import (
    RESULT_DOMAIN,
    EmbeddingEntry,
    Result,
    Status,
    WireLimits,
    claimed_submitter,
    parse_submission,
    verify_result,
)
from tests.peer import Peer, pack

TEXT = ("text", "text/plain", b"a red circle")
PNG = ("image", "image/png", b"\x89PNG\r\n\x1a\n not really")


def reason_of(raw: bytes, limits: WireLimits | None = None) -> tuple[Reason, bytes | None]:
    with pytest.raises(Rejected) as caught:
        parse_submission(raw, limits)
    return caught.value.reason, caught.value.submitter


def test_a_peer_submission_parses_with_its_id():
    peer = Peer()
    raw = peer.submission([TEXT, PNG])
    submission = parse_submission(raw)
    assert submission.submitter == peer.public
    assert submission.id == hashlib.sha256(raw).digest()
    assert [item.modality for item in submission.items] == [Modality.TEXT, Modality.IMAGE]
    assert submission.is_pair
    # Intake hashes the bytes once, before it looks them up, and hands the id on.
    identity = hashlib.sha256(raw).digest()
    assert parse_submission(raw, identity=identity).id is identity


def test_garbage_names_no_submitter():
    assert reason_of(b"\xc1\xc1") == (Reason.MALFORMED, None)
    assert reason_of(pack([1, 2])) == (Reason.MALFORMED, None)
    assert reason_of(pack({"submitter": b"short"})) == (Reason.MALFORMED, None)


def test_non_canonical_bytes_are_refused_and_attributed():
    peer = Peer()
    body = peer.body([TEXT])
    signed = msgpack.unpackb(peer.sign(body), raw=False)
    shuffled = msgpack.packb(dict(reversed(list(signed.items()))), use_bin_type=True)
    assert reason_of(shuffled) == (Reason.NON_CANONICAL, peer.public)


@pytest.mark.parametrize(
    "field,value",
    [
        ("v", 2),
        ("nonce", -1),
        ("nonce", "1"),
        ("created_ms", "now"),
        ("items", []),
        ("items", [{"modality": "text"}]),
        ("extra", 1),
    ],
)
def test_schema_violations_are_malformed(field, value):
    peer = Peer()
    body = peer.body([TEXT])
    body[field] = value
    assert reason_of(peer.sign(body)) == (Reason.MALFORMED, peer.public)


def test_three_items_are_malformed():
    peer = Peer()
    raw = peer.submission([TEXT, PNG, ("audio", "audio/wav", b"RIFF")])
    assert reason_of(raw)[0] is Reason.MALFORMED


def test_bad_signature():
    peer = Peer()
    body = peer.body([TEXT])
    raw = Peer().sign(body)  # signed by another key
    assert reason_of(raw) == (Reason.BAD_SIGNATURE, peer.public)


def test_bad_commitment():
    peer = Peer()
    body = peer.body([TEXT])
    body["items"][0]["sha256"] = hashlib.sha256(b"something else").digest()
    assert reason_of(peer.sign(body)) == (Reason.BAD_COMMITMENT, peer.public)


@pytest.mark.parametrize(
    "item,reason",
    [
        (("smell", "text/plain", b"x"), Reason.UNSUPPORTED_MODALITY),
        (("image", "image/gif", b"GIF89a"), Reason.UNSUPPORTED_MODALITY),
        (("audio", "text/plain", b"x"), Reason.UNSUPPORTED_MODALITY),
    ],
)
def test_unsupported_modalities(item, reason):
    peer = Peer()
    assert reason_of(peer.submission([item]))[0] is reason


@pytest.mark.parametrize(
    "written,named",
    [
        ("IMAGE/PNG", "image/png"),
        ("image/png; charset=binary", "image/png"),
        (" Text/Plain ;charset=utf-8", "text/plain"),
        ("image/jpg", "image/jpeg"),
        ("audio/x-wav", "audio/wav"),
        ("audio/wave", "audio/wav"),
    ],
)
def test_media_types_are_read_as_rfc_2045_writes_them(written, named):
    """Case-insensitive, parameters aside, with the common aliases (found from the
    outside: each was refused ``unsupported_modality``)."""
    modality = MEDIA_TYPES[named]
    raw = Peer().submission([(str(modality), written, b"x")])
    (item,) = parse_submission(raw).items
    assert (item.modality, item.mime) == (modality, named)
    assert reason_of(Peer().submission([("video", written, b"x")]))[0] is (
        Reason.UNSUPPORTED_MODALITY
    )


def test_same_modality_pair():
    peer = Peer()
    raw = peer.submission([TEXT, ("text", "text/plain", b"another")])
    assert reason_of(raw)[0] is Reason.SAME_MODALITY


def test_limits_are_checked_before_anything_is_decoded():
    peer = Peer()
    limits = WireLimits(message_bytes=1000, text_bytes=100, image_bytes=200)
    assert (
        reason_of(peer.submission([("text", "text/plain", b"x" * 101)]), limits)[0]
        is Reason.TOO_LARGE
    )
    assert (
        reason_of(peer.submission([("image", "image/png", b"x" * 201)]), limits)[0]
        is Reason.TOO_LARGE
    )
    big = peer.submission([("video", "video/mp4", b"x" * 5000)])
    assert reason_of(big, limits) == (Reason.TOO_LARGE, peer.public)


def test_a_rejection_says_whether_its_submitter_signed_the_bytes():
    """Only a signed submitter may hear of a refusal on a topic other than its own."""
    peer, other = Peer(), Peer()
    lying = peer.body([TEXT])
    lying["items"][0]["sha256"] = hashlib.sha256(b"something else").digest()
    cases = {
        other.sign(peer.body([TEXT])): False,  # bad_signature
        peer.sign({**peer.body([TEXT]), "v": 7}): False,  # malformed
        peer.submission([("text", "text/plain", b"x" * 70_000)]): False,  # too_large, unread
        peer.sign(lying): True,  # bad_commitment
        peer.submission([("smell", "text/plain", b"x")]): True,
        peer.submission([TEXT, ("text", "text/plain", b"another")]): True,
    }
    for raw, signed in cases.items():
        with pytest.raises(Rejected) as caught:
            parse_submission(raw)
        assert caught.value.submitter == peer.public
        assert caught.value.signed is signed, caught.value.reason


def test_claimed_submitter_of_a_truncated_message():
    peer = Peer()
    raw = peer.submission([TEXT])
    assert claimed_submitter(raw) == peer.public
    assert claimed_submitter(raw[:-5]) == peer.public or claimed_submitter(raw[:-5]) is None


def test_result_is_signed_canonical_and_verifiable_by_the_peer():
    key = SigningKey.generate()
    signer = MessageSigner(key)
    result = Result(
        b"i" * 32,
        key.public_key,
        Status.FINAL,
        None,
        7,
        (EmbeddingEntry(Modality.TEXT, b"\x00\x3c" * 4, True),),
        120_000,
        (5, 0),
        42,
    )
    raw = signer.signed_bytes(RESULT_DOMAIN.decode(), result.body())
    assert verify_result(raw) == result
    from tests.peer import verify_result as peer_verify

    message = peer_verify(raw)
    assert message["status"] == "final" and message["reward"] == 42
    tampered = raw.replace(b"\x2a", b"\x2b")
    with pytest.raises(ValueError):
        verify_result(tampered)


def test_a_missing_submitter_is_unattributed():
    peer = Peer()
    body = peer.body([TEXT])
    body["submitter"] = None
    assert reason_of(peer.sign(body)) == (Reason.MALFORMED, None)


@pytest.mark.parametrize("body", [{"status": "final"}, {"v": 1, "sig": 5}, [1]])
def test_a_malformed_result_is_a_codec_error(body):
    from node.intake.codec import CodecError

    with pytest.raises(CodecError):
        verify_result(pack(body))
