"""Consensus messages as value types (DESIGN.md §7, docs/PROTOCOL.md).

A round is decided by views. In view v of round r the view's proposer signs a
``Proposal`` of a ``Value`` (the round's records); members sign a prevote and
then a precommit naming the value's hash, or nil. Precommits of 2/3 of the
stake for one value hash in one view form the round's ``QuorumCertificate``.

Each message gives its wire fields through ``body()`` (bytes, ints, str and
lists only, never floats nor None) and names its signing domain; the node
encodes, signs and decodes them (``from_body`` checks a decoded body). A nil
vote writes its ``value_hash`` as empty bytes on the wire; in Python it is
``None``; a proposal without a valid view writes ``valid_view`` as -1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

from consensus.committee import Committee
from consensus.crypto import Crypto

KEY_SIZE = 32
HASH_SIZE = 32
SIGNATURE_SIZE = 64
NIL_WIRE = b""
"""How a nil vote writes its ``value_hash`` on the wire."""
NO_VIEW = -1
"""``valid_view`` of a proposal that carries no value from an earlier view."""
MAX_VIEW = 2**32 - 1
MAX_ROUND = 2**63 - 1
"""The largest round a message may name (a store's signed 64-bit integer holds it)."""


class MalformedMessage(ValueError):
    """A consensus message whose fields do not have the shape the protocol requires."""


class VoteKind(StrEnum):
    """The two votes of a view."""

    PREVOTE = "prevote"
    PRECOMMIT = "precommit"


def _check_uint(value: object, what: str, maximum: int = MAX_ROUND) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise MalformedMessage(f"{what} must be an int in 0..{maximum}, got {value!r}")
    return value


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedMessage(f"{what} must be {size} bytes")
    return value


def _check_hash(value: bytes | None) -> bytes | None:
    if value is not None:
        _check_bytes(value, HASH_SIZE, "value_hash")
    return value


def _hash_to_wire(value: bytes | None) -> bytes:
    return NIL_WIRE if value is None else value


def _hash_from_wire(value: object) -> bytes | None:
    if value == NIL_WIRE:
        return None
    return _check_bytes(value, HASH_SIZE, "value_hash")


def _fields(body: Mapping[str, object], fields: tuple[str, ...]) -> None:
    if set(body) != set(fields):
        raise MalformedMessage(f"expected fields {sorted(fields)}, got {sorted(body)}")


def _records(value: object) -> tuple[bytes, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(r, bytes) for r in value):
        raise MalformedMessage("records must be a list of bytes")
    return tuple(value)


@dataclass(frozen=True)
class Value:
    """What a round decides: its records (opaque canonical bytes, one per submission).

    The hash binds the round number, so a value decided in one round can
    never be replayed as another round's value. An empty value (no records)
    finalizes an empty round.
    """

    DOMAIN: ClassVar[str] = "poc/v1/value"

    round: int
    records: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_uint(self.round, "round")
        _records(self.records)

    def body(self) -> dict[str, object]:
        """Wire fields."""
        return {"round": self.round, "records": list(self.records)}

    def digest(self, crypto: Crypto) -> bytes:
        """The value hash that votes and certificates name."""
        return crypto.digest(self.DOMAIN, self.body())


@dataclass(frozen=True)
class Proposal:
    """The proposer's value for (round, view); ``valid_view`` names its prevote quorum.

    ``valid_view`` is the earlier view of this round in which the proposer saw
    prevotes of 2/3 of the stake for this value (Tendermint's *validRound*),
    or ``NO_VIEW``.
    """

    DOMAIN: ClassVar[str] = "poc/v1/proposal"
    FIELDS: ClassVar[tuple[str, ...]] = ("round", "view", "proposer", "records", "valid_view")

    round: int
    view: int
    proposer: bytes
    records: tuple[bytes, ...]
    valid_view: int = NO_VIEW

    def __post_init__(self) -> None:
        _check_uint(self.round, "round")
        _check_uint(self.view, "view", MAX_VIEW)
        _check_bytes(self.proposer, KEY_SIZE, "proposer")
        _records(self.records)
        valid = self.valid_view
        if isinstance(valid, bool) or not isinstance(valid, int):
            raise MalformedMessage("valid_view must be an int")
        if valid != NO_VIEW and not 0 <= valid < self.view:
            raise MalformedMessage("valid_view must be -1 or an earlier view")

    @property
    def value(self) -> Value:
        return Value(self.round, self.records)

    def body(self) -> dict[str, object]:
        """Wire fields."""
        return {
            "round": self.round,
            "view": self.view,
            "proposer": self.proposer,
            "records": list(self.records),
            "valid_view": self.valid_view,
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Proposal:
        """Check and rebuild a decoded body."""
        _fields(body, cls.FIELDS)
        valid_view = body["valid_view"]
        if not isinstance(valid_view, int) or isinstance(valid_view, bool):
            raise MalformedMessage("valid_view must be an int")
        return cls(
            round=_check_uint(body["round"], "round"),
            view=_check_uint(body["view"], "view", MAX_VIEW),
            proposer=_check_bytes(body["proposer"], KEY_SIZE, "proposer"),
            records=_records(body["records"]),
            valid_view=valid_view,
        )


@dataclass(frozen=True)
class Vote:
    """A member's prevote or precommit in (round, view): a value hash, or nil (``None``)."""

    DOMAIN: ClassVar[str] = "poc/v1/vote"
    FIELDS: ClassVar[tuple[str, ...]] = ("kind", "round", "view", "voter", "value_hash")

    kind: VoteKind
    round: int
    view: int
    voter: bytes
    value_hash: bytes | None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, VoteKind):
            raise MalformedMessage(f"kind must be prevote or precommit, got {self.kind!r}")
        _check_uint(self.round, "round")
        _check_uint(self.view, "view", MAX_VIEW)
        _check_bytes(self.voter, KEY_SIZE, "voter")
        _check_hash(self.value_hash)

    def body(self) -> dict[str, object]:
        """Wire fields; nil is an empty ``value_hash``."""
        return {
            "kind": str(self.kind),
            "round": self.round,
            "view": self.view,
            "voter": self.voter,
            "value_hash": _hash_to_wire(self.value_hash),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Vote:
        """Check and rebuild a decoded body."""
        _fields(body, cls.FIELDS)
        kind = body["kind"]
        if kind not in (VoteKind.PREVOTE.value, VoteKind.PRECOMMIT.value):
            raise MalformedMessage(f"kind must be prevote or precommit, got {kind!r}")
        return cls(
            kind=VoteKind(str(kind)),
            round=_check_uint(body["round"], "round"),
            view=_check_uint(body["view"], "view", MAX_VIEW),
            voter=_check_bytes(body["voter"], KEY_SIZE, "voter"),
            value_hash=_hash_from_wire(body["value_hash"]),
        )


@dataclass(frozen=True)
class SignedProposal:
    """A proposal with its proposer's signature."""

    proposal: Proposal
    signature: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.signature, SIGNATURE_SIZE, "signature")

    @property
    def signer(self) -> bytes:
        return self.proposal.proposer

    @property
    def round(self) -> int:
        return self.proposal.round

    @property
    def view(self) -> int:
        return self.proposal.view

    @property
    def kind(self) -> str:
        return "proposal"

    def body(self) -> dict[str, object]:
        return self.proposal.body()

    def verify(self, crypto: Crypto) -> bool:
        """Whether the proposer named in the proposal signed it."""
        return crypto.verify(self.signer, Proposal.DOMAIN, self.proposal.body(), self.signature)


@dataclass(frozen=True)
class SignedVote:
    """A vote with its voter's signature."""

    vote: Vote
    signature: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.signature, SIGNATURE_SIZE, "signature")

    @property
    def signer(self) -> bytes:
        return self.vote.voter

    @property
    def round(self) -> int:
        return self.vote.round

    @property
    def view(self) -> int:
        return self.vote.view

    @property
    def kind(self) -> str:
        return str(self.vote.kind)

    def body(self) -> dict[str, object]:
        return self.vote.body()

    def verify(self, crypto: Crypto) -> bool:
        """Whether the voter named in the vote signed it."""
        return crypto.verify(self.signer, Vote.DOMAIN, self.vote.body(), self.signature)


Signed = SignedProposal | SignedVote


@dataclass(frozen=True)
class QuorumCertificate:
    """Precommits of at least 2/3 of the stake for one value in one (round, view).

    ``votes`` are ``(voter, signature)`` pairs over
    ``Vote(PRECOMMIT, round, view, voter, value_hash)``, kept sorted by voter
    so that a certificate has one encoding.
    """

    FIELDS: ClassVar[tuple[str, ...]] = ("round", "view", "value_hash", "votes")

    round: int
    view: int
    value_hash: bytes
    votes: tuple[tuple[bytes, bytes], ...]

    def __post_init__(self) -> None:
        _check_uint(self.round, "round")
        _check_uint(self.view, "view", MAX_VIEW)
        _check_bytes(self.value_hash, HASH_SIZE, "value_hash")
        for voter, signature in self.votes:
            _check_bytes(voter, KEY_SIZE, "voter")
            _check_bytes(signature, SIGNATURE_SIZE, "signature")
        object.__setattr__(self, "votes", tuple(sorted(self.votes)))

    def body(self) -> dict[str, object]:
        """Wire fields; votes as ``[voter, signature]`` lists."""
        return {
            "round": self.round,
            "view": self.view,
            "value_hash": self.value_hash,
            "votes": [[voter, signature] for voter, signature in self.votes],
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> QuorumCertificate:
        """Check and rebuild a decoded body."""
        _fields(body, cls.FIELDS)
        raw_votes = body["votes"]
        if not isinstance(raw_votes, list | tuple):
            raise MalformedMessage("votes must be a list")
        votes: list[tuple[bytes, bytes]] = []
        for pair in raw_votes:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise MalformedMessage("each vote must be [voter, signature]")
            votes.append(
                (
                    _check_bytes(pair[0], KEY_SIZE, "voter"),
                    _check_bytes(pair[1], SIGNATURE_SIZE, "signature"),
                )
            )
        return cls(
            round=_check_uint(body["round"], "round"),
            view=_check_uint(body["view"], "view", MAX_VIEW),
            value_hash=_check_bytes(body["value_hash"], HASH_SIZE, "value_hash"),
            votes=tuple(votes),
        )

    def signed_votes(self) -> tuple[SignedVote, ...]:
        """The precommits the certificate carries, rebuilt for checking or relaying."""
        return tuple(
            SignedVote(
                Vote(VoteKind.PRECOMMIT, self.round, self.view, voter, self.value_hash), signature
            )
            for voter, signature in self.votes
        )

    def why_invalid(self, committee: Committee, crypto: Crypto) -> str | None:
        """The reason this certificate proves nothing, or None when it is valid."""
        voters = [voter for voter, _ in self.votes]
        if len(set(voters)) != len(voters):
            return "duplicate_voter"
        stake = 0
        for signed in self.signed_votes():
            member = committee.member(signed.signer)
            if member is None:
                return "not_member"
            if not signed.verify(crypto):
                return "bad_signature"
            stake += member.stake
        if not committee.has_quorum(stake):
            return "no_quorum"
        return None

    def verify(self, committee: Committee, crypto: Crypto) -> bool:
        return self.why_invalid(committee, crypto) is None


@dataclass(frozen=True)
class Evidence:
    """Two conflicting messages of one key for one (round, view, kind): equivocation.

    The pair is kept ordered by signature so every validator that catches it
    publishes the same evidence.
    """

    DOMAIN: ClassVar[str] = "poc/v1/evidence"

    first: Signed
    second: Signed

    def __post_init__(self) -> None:
        if self.second.signature < self.first.signature:
            first, second = self.second, self.first
            object.__setattr__(self, "first", first)
            object.__setattr__(self, "second", second)

    @property
    def kind(self) -> str:
        """``"proposal"``, ``"prevote"`` or ``"precommit"``."""
        return self.first.kind

    @property
    def offender(self) -> bytes:
        return self.first.signer

    @property
    def round(self) -> int:
        return self.first.round

    @property
    def view(self) -> int:
        return self.first.view

    def body(self) -> dict[str, object]:
        """Wire fields: the kind and both messages with their signatures."""
        return {
            "kind": self.kind,
            "first": {"body": self.first.body(), "signature": self.first.signature},
            "second": {"body": self.second.body(), "signature": self.second.signature},
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Evidence:
        """Check and rebuild a decoded body (signatures are checked by ``why_invalid``)."""
        _fields(body, ("kind", "first", "second"))
        kind = body["kind"]
        messages: list[Signed] = []
        for name in ("first", "second"):
            part = body[name]
            if not isinstance(part, Mapping) or set(part) != {"body", "signature"}:
                raise MalformedMessage(f"{name} must be a map of body and signature")
            inner, signature = part["body"], part["signature"]
            if not isinstance(inner, Mapping):
                raise MalformedMessage(f"{name}.body must be a map")
            signature = _check_bytes(signature, SIGNATURE_SIZE, "signature")
            if kind == "proposal":
                messages.append(SignedProposal(Proposal.from_body(inner), signature))
            elif kind in (VoteKind.PREVOTE.value, VoteKind.PRECOMMIT.value):
                messages.append(SignedVote(Vote.from_body(inner), signature))
            else:
                raise MalformedMessage(f"unknown evidence kind {kind!r}")
        return cls(messages[0], messages[1])

    def why_invalid(self, committee: Committee, crypto: Crypto) -> str | None:
        """The reason this is not proof of equivocation, or None when it is."""
        if self.first.kind != self.second.kind:
            return "mixed_kinds"
        if self.first.signer != self.second.signer:
            return "different_signers"
        if (self.first.round, self.first.view) != (self.second.round, self.second.view):
            return "different_views"
        if self.first.body() == self.second.body():
            return "not_conflicting"
        if committee.member(self.offender) is None:
            return "not_member"
        if not (self.first.verify(crypto) and self.second.verify(crypto)):
            return "bad_signature"
        return None

    def verify(self, committee: Committee, crypto: Crypto) -> bool:
        return self.why_invalid(committee, crypto) is None
