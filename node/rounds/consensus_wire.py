"""Consensus messages on the bus: canonical msgpack bodies with their signature.

A proposal or vote travels as its body (``consensus.messages``) plus a
``sig`` field; a certificate and an evidence record as their bodies (they
carry the members' signatures inside). Decoding is bounded (sizes, nesting)
and a message whose bytes are not the canonical encoding of its decoding is
refused. See docs/PROTOCOL.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from consensus.messages import (
    Evidence,
    MalformedMessage,
    Proposal,
    QuorumCertificate,
    SignedProposal,
    SignedVote,
    Vote,
)
from node.intake.codec import CodecError, DecodeLimits, pack, unpack

T = TypeVar("T")
_LIMITS = DecodeLimits(max_bytes=64 * 1024 * 1024, max_container_len=100_000)


class ConsensusWireError(ValueError):
    """Bytes that are not a well-formed consensus message."""


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = unpack(raw, _LIMITS)
    except CodecError as error:
        raise ConsensusWireError(str(error)) from None
    if not isinstance(body, dict):
        raise ConsensusWireError("a consensus message is a map")
    return body


def _signed_from_body(
    body: dict[str, Any], kind: str, build: Callable[[dict[str, Any], bytes], T]
) -> T:
    try:
        signature = body.pop("sig")
        return build(body, signature)
    except (KeyError, MalformedMessage, TypeError, ValueError) as error:
        raise ConsensusWireError(f"bad {kind}: {error}") from None


def _proposal(body: dict[str, Any], sig: bytes) -> SignedProposal:
    return SignedProposal(Proposal.from_body(body), sig)


def _vote(body: dict[str, Any], sig: bytes) -> SignedVote:
    return SignedVote(Vote.from_body(body), sig)


def decode_signed(raw: bytes) -> SignedProposal | SignedVote:
    """A proposal or a vote, told apart by its fields (as stored by the driver)."""
    body = _decode(raw)
    if "proposer" in body:
        return _signed_from_body(body, "proposal", _proposal)
    return _signed_from_body(body, "vote", _vote)


def encode_signed(signed: SignedProposal | SignedVote) -> bytes:
    if isinstance(signed, SignedProposal):
        return encode_proposal(signed)
    return encode_vote(signed)


def encode_proposal(signed: SignedProposal) -> bytes:
    return pack({**signed.proposal.body(), "sig": signed.signature})


def decode_proposal(raw: bytes) -> SignedProposal:
    return _signed_from_body(_decode(raw), "proposal", _proposal)


def encode_vote(signed: SignedVote) -> bytes:
    return pack({**signed.vote.body(), "sig": signed.signature})


def decode_vote(raw: bytes) -> SignedVote:
    return _signed_from_body(_decode(raw), "vote", _vote)


def encode_certificate(certificate: QuorumCertificate) -> bytes:
    return pack(certificate.body())


def decode_certificate(raw: bytes) -> QuorumCertificate:
    body = _decode(raw)
    try:
        return QuorumCertificate.from_body(body)
    except (KeyError, MalformedMessage, TypeError, ValueError) as error:
        raise ConsensusWireError(f"bad certificate: {error}") from None


def encode_evidence(evidence: Evidence) -> bytes:
    return pack(evidence.body())


def decode_evidence(raw: bytes) -> Evidence:
    body = _decode(raw)
    try:
        return Evidence.from_body(body)
    except (KeyError, MalformedMessage, TypeError, ValueError) as error:
        raise ConsensusWireError(f"bad evidence: {error}") from None
