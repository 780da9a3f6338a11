"""Wire protocol v1 messages: ``Submission``, ``Result`` and ``Balance`` (DESIGN.md §3).

Parsing applies the stateless checks in a fixed, documented order (the first
failing one names the reason): size, msgpack, canonical form, schema, per-item
size, signature, data commitments, modalities. The stateful checks (stale,
replay, duplicate, rate limit) belong to intake, which owns the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from typing import Any

from encoders.modality import MEDIA_TYPES, Modality, media_type
from node.errors import Reason, Rejected
from node.intake.codec import CodecError, DecodeLimits, NonCanonicalError, pack, peek_field, unpack
from node.intake.keys import verify_signature

VERSION = 1


def submission_decode_limits(message_bytes: int) -> DecodeLimits:
    """A submission has about 40 values; a thousand is room enough, and cheap to walk."""
    return DecodeLimits(
        max_bytes=message_bytes, max_container_len=64, max_depth=8, max_objects=1024
    )


SUBMISSION_DOMAIN = b"poc/v1/submission"
RESULT_DOMAIN = b"poc/v1/result"
BALANCE_DOMAIN = b"poc/v1/balance"
UINT64_MAX = 2**64 - 1

_SUBMISSION_FIELDS = frozenset({"v", "submitter", "nonce", "created_ms", "items", "sig"})
_ITEM_FIELDS = frozenset({"modality", "mime", "data", "sha256"})


class Status(StrEnum):
    """The state a Result reports."""

    ACCEPTED = "accepted"
    FINAL = "final"
    REJECTED = "rejected"


@dataclass(frozen=True)
class WireLimits:
    """Byte limits checked before any media is decoded."""

    message_bytes: int = 8 * 1024 * 1024
    text_bytes: int = 64 * 1024
    image_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class Item:
    """One piece of data of a submission."""

    modality: Modality
    mime: str
    data: bytes
    sha256: bytes


@dataclass(frozen=True)
class Submission:
    """A verified submission: schema, signature and commitments hold."""

    submitter: bytes
    nonce: int
    created_ms: int
    items: tuple[Item, ...]
    sig: bytes
    raw: bytes

    @cached_property
    def id(self) -> bytes:
        """SHA-256 of the complete signed message bytes (hashed once: up to 8 MiB)."""
        return hashlib.sha256(self.raw).digest()

    @property
    def is_pair(self) -> bool:
        return len(self.items) == 2


def signing_bytes(domain: bytes, body: Mapping[str, Any]) -> bytes:
    """``domain ‖ canonical_msgpack(message without "sig")``."""
    return domain + pack({key: value for key, value in body.items() if key != "sig"})


def submission_id(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def claimed_submitter(raw: bytes) -> bytes | None:
    """The 32-byte submitter key the bytes claim, if they name one at all."""
    value = peek_field(raw, "submitter")
    if isinstance(value, bytes) and len(value) == 32:
        return value
    return None


def _require(condition: bool, detail: str, submitter: bytes | None) -> None:
    if not condition:
        raise Rejected(Reason.MALFORMED, detail, submitter)


def _is_uint64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= UINT64_MAX


def parse_submission(
    raw: bytes, limits: WireLimits | None = None, identity: bytes | None = None
) -> Submission:
    """Decode and verify a Submission, or raise :class:`Rejected` with its reason.

    ``identity``: ``submission_id(raw)``, where the caller hashed the bytes
    already (it becomes the submission's ``id`` without hashing them again).
    """
    limits = limits or WireLimits()
    if len(raw) > limits.message_bytes:
        raise Rejected(
            Reason.TOO_LARGE,
            f"message of {len(raw)} bytes exceeds {limits.message_bytes}",
            claimed_submitter(raw),
        )
    try:
        message = unpack(raw, submission_decode_limits(limits.message_bytes))
    except NonCanonicalError as error:
        raise Rejected(Reason.NON_CANONICAL, str(error), claimed_submitter(raw)) from error
    except CodecError as error:
        raise Rejected(Reason.MALFORMED, str(error), claimed_submitter(raw)) from error

    if not isinstance(message, dict):
        raise Rejected(Reason.MALFORMED, "a submission is a msgpack map")
    submitter = message.get("submitter")
    named = submitter if isinstance(submitter, bytes) and len(submitter) == 32 else None
    _require(named is not None, "submitter must be a 32-byte Ed25519 public key", None)
    assert named is not None
    _require(
        set(message) == _SUBMISSION_FIELDS,
        f"fields must be exactly {sorted(_SUBMISSION_FIELDS)}",
        named,
    )
    _require(
        _is_uint64(message["v"]) and message["v"] == VERSION,
        f"unsupported version {message['v']!r}",
        named,
    )
    _require(_is_uint64(message["nonce"]), "nonce must be a uint64", named)
    _require(_is_uint64(message["created_ms"]), "created_ms must be a uint64", named)
    _require(
        isinstance(message["sig"], bytes) and len(message["sig"]) == 64,
        "sig must be 64 bytes",
        named,
    )
    raw_items = message["items"]
    _require(
        isinstance(raw_items, list) and 1 <= len(raw_items) <= 2,
        "items must be a list of one or two maps",
        named,
    )
    for index, entry in enumerate(raw_items):
        _require(
            isinstance(entry, dict) and set(entry) == _ITEM_FIELDS,
            f"items[{index}] must have exactly the fields {sorted(_ITEM_FIELDS)}",
            named,
        )
        _require(isinstance(entry["modality"], str), f"items[{index}].modality must be text", named)
        _require(isinstance(entry["mime"], str), f"items[{index}].mime must be text", named)
        _require(isinstance(entry["data"], bytes), f"items[{index}].data must be bytes", named)
        _require(
            isinstance(entry["sha256"], bytes) and len(entry["sha256"]) == 32,
            f"items[{index}].sha256 must be 32 bytes",
            named,
        )

    for index, entry in enumerate(raw_items):
        size = len(entry["data"])
        if entry["mime"] == "text/plain" and size > limits.text_bytes:
            raise Rejected(
                Reason.TOO_LARGE,
                f"items[{index}]: text of {size} bytes exceeds {limits.text_bytes}",
                named,
            )
        if entry["mime"] in ("image/png", "image/jpeg") and size > limits.image_bytes:
            raise Rejected(
                Reason.TOO_LARGE,
                f"items[{index}]: image of {size} bytes exceeds {limits.image_bytes}",
                named,
            )

    if not verify_signature(named, signing_bytes(SUBMISSION_DOMAIN, message), message["sig"]):
        raise Rejected(Reason.BAD_SIGNATURE, "signature does not verify", named)

    for index, entry in enumerate(raw_items):
        if hashlib.sha256(entry["data"]).digest() != entry["sha256"]:
            raise Rejected(
                Reason.BAD_COMMITMENT,
                f"items[{index}].sha256 does not match its data",
                named,
                signed=True,
            )

    items: list[Item] = []
    for index, entry in enumerate(raw_items):
        try:
            modality = Modality(entry["modality"])
        except ValueError:
            raise Rejected(
                Reason.UNSUPPORTED_MODALITY,
                f"items[{index}]: unknown modality {entry['modality']!r}",
                named,
                signed=True,
            ) from None
        mime = media_type(entry["mime"])
        if mime is None or MEDIA_TYPES[mime] is not modality:
            raise Rejected(
                Reason.UNSUPPORTED_MODALITY,
                f"items[{index}]: media type {entry['mime']!r} is not supported for {modality}",
                named,
                signed=True,
            )
        items.append(Item(modality, mime, entry["data"], entry["sha256"]))
    if len(items) == 2 and items[0].modality == items[1].modality:
        raise Rejected(
            Reason.SAME_MODALITY, f"both items are {items[0].modality}", named, signed=True
        )

    submission = Submission(
        submitter=named,
        nonce=message["nonce"],
        created_ms=message["created_ms"],
        items=tuple(items),
        sig=message["sig"],
        raw=raw,
    )
    if identity is not None:
        submission.__dict__["id"] = identity  # what the cached_property would compute
    return submission


def submission_body(
    submitter: bytes, nonce: int, created_ms: int, items: Sequence[tuple[Modality, str, bytes]]
) -> dict[str, Any]:
    """The unsigned fields of a Submission, with the data commitments filled in."""
    return {
        "v": VERSION,
        "submitter": submitter,
        "nonce": nonce,
        "created_ms": created_ms,
        "items": [
            {
                "modality": str(modality),
                "mime": mime,
                "data": data,
                "sha256": hashlib.sha256(data).digest(),
            }
            for modality, mime, data in items
        ],
    }


@dataclass(frozen=True)
class EmbeddingEntry:
    """One item's embedding as a Result carries it."""

    modality: Modality
    vector: bytes  # D little-endian float16 values
    fused: bool

    def body(self) -> dict[str, Any]:
        return {"modality": str(self.modality), "vector": self.vector, "fused": self.fused}

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> EmbeddingEntry:
        return cls(Modality(body["modality"]), body["vector"], body["fused"])


@dataclass(frozen=True)
class Result:
    """A validator's signed statement about one submission."""

    submission_id: bytes
    validator: bytes
    status: Status
    reason: Reason | None = None
    round: int | None = None
    embeddings: tuple[EmbeddingEntry, ...] = ()
    pair_distance_ppm: int | None = None
    scores_ppm: tuple[int | None, ...] | None = None
    """Per item; None for a duplicate item (not scored), None as a whole when unscored."""
    reward: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "submission_id": self.submission_id,
            "validator": self.validator,
            "status": str(self.status),
            "reason": None if self.reason is None else str(self.reason),
            "round": self.round,
            "embeddings": [entry.body() for entry in self.embeddings],
            "pair_distance_ppm": self.pair_distance_ppm,
            "scores_ppm": None if self.scores_ppm is None else list(self.scores_ppm),
            "reward": self.reward,
        }


def parse_result(raw: bytes) -> tuple[Result, bytes]:
    """Decode a Result and its signature (for submitters and tests; verify separately)."""
    message = unpack(raw)
    if not isinstance(message, dict):
        raise CodecError("a result is a msgpack map")
    try:
        return _result_of(message), message["sig"]
    except (KeyError, ValueError, TypeError) as error:
        raise CodecError(f"not a Result: {error!r}") from None


def _result_of(message: dict[str, Any]) -> Result:
    return Result(
        submission_id=message["submission_id"],
        validator=message["validator"],
        status=Status(message["status"]),
        reason=None if message["reason"] is None else Reason(message["reason"]),
        round=message["round"],
        embeddings=tuple(EmbeddingEntry.from_body(entry) for entry in message["embeddings"]),
        pair_distance_ppm=message["pair_distance_ppm"],
        scores_ppm=None if message["scores_ppm"] is None else tuple(message["scores_ppm"]),
        reward=message["reward"],
    )


def verify_result(raw: bytes) -> Result:
    """Parse a Result and check the validator's signature over it."""
    message = unpack(raw)
    result, sig = parse_result(raw)
    if (
        not isinstance(sig, bytes)
        or not isinstance(result.validator, bytes)
        or not verify_signature(result.validator, signing_bytes(RESULT_DOMAIN, message), sig)
    ):
        raise CodecError("result signature does not verify")
    return result


_BALANCE_FIELDS = frozenset({"v", "submitter", "round", "balance", "validator", "sig"})


@dataclass(frozen=True)
class Balance:
    """A validator's signed statement of a submitter's total credited in the certified ledger.

    ``round`` is the committed round it is valid at: every reward of rounds
    up to and including it is counted, none after it.
    """

    submitter: bytes
    round: int
    balance: int
    validator: bytes

    def body(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "submitter": self.submitter,
            "round": self.round,
            "balance": self.balance,
            "validator": self.validator,
        }


def verify_balance(raw: bytes) -> Balance:
    """Decode a Balance, check its schema and the validator's signature over it.

    Raises :class:`CodecError` for anything else: bytes not canonical, a field
    missing or extra, a key not 32 bytes, a signature that does not verify.
    Whether the validator is a committee member is the reader's question.
    """
    message = unpack(raw, DecodeLimits(max_bytes=1024, max_container_len=8, max_depth=4))
    if not isinstance(message, dict) or set(message) != _BALANCE_FIELDS:
        raise CodecError(f"a balance is a map of exactly {sorted(_BALANCE_FIELDS)}")
    if not (_is_uint64(message["v"]) and message["v"] == VERSION):
        raise CodecError(f"unsupported version {message['v']!r}")
    for name in ("submitter", "validator"):
        if not isinstance(message[name], bytes) or len(message[name]) != 32:
            raise CodecError(f"{name} must be a 32-byte key")
    for name in ("round", "balance"):
        if not _is_uint64(message[name]):
            raise CodecError(f"{name} must be a uint64")
    sig = message["sig"]
    if not isinstance(sig, bytes) or not verify_signature(
        message["validator"], signing_bytes(BALANCE_DOMAIN, message), sig
    ):
        raise CodecError("balance signature does not verify")
    return Balance(message["submitter"], message["round"], message["balance"], message["validator"])
