"""Consensus messages as value types (DESIGN.md §7).

Each message gives its wire fields through ``body()`` (bytes, ints, str,
lists and dicts only, never floats nor None) and names its signing domain in
``DOMAIN``; the node encodes, signs and decodes them (``from_body`` checks a
decoded body). A SKIP is written on the wire as an empty ``proposal_hash``;
in Python it is ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from consensus.committee import Committee
from consensus.crypto import Crypto

KEY_SIZE = 32
HASH_SIZE = 32
SIGNATURE_SIZE = 64
SKIP_WIRE = b""
"""How a SKIP vote or certificate writes its ``proposal_hash`` on the wire."""


class MalformedMessage(ValueError):
    """A consensus message whose fields do not have the shape the protocol requires."""


def _check_round(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedMessage(f"round must be an int >= 0, got {value!r}")
    return value


def _check_bytes(value: object, size: int, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != size:
        raise MalformedMessage(f"{what} must be {size} bytes")
    return value


def _check_hash(value: bytes | None) -> bytes | None:
    if value is not None:
        _check_bytes(value, HASH_SIZE, "proposal_hash")
    return value


def _hash_to_wire(value: bytes | None) -> bytes:
    return SKIP_WIRE if value is None else value


def _hash_from_wire(value: object) -> bytes | None:
    if value == SKIP_WIRE:
        return None
    return _check_bytes(value, HASH_SIZE, "proposal_hash")


def _field(body: Mapping[str, object], fields: tuple[str, ...]) -> None:
    if set(body) != set(fields):
        raise MalformedMessage(f"expected fields {sorted(fields)}, got {sorted(body)}")


@dataclass(frozen=True)
class Proposal:
    """The leader's proposal for a round: opaque canonical records, one per submission.

    The node produces the records (sorted by submission id); consensus only
    hashes them and asks the node whether they agree with its own.
    """

    DOMAIN: ClassVar[str] = "poc/v1/proposal"
    FIELDS: ClassVar[tuple[str, ...]] = ("round", "leader", "records")

    round: int
    leader: bytes
    records: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_bytes(self.leader, KEY_SIZE, "leader")
        if not all(isinstance(r, bytes) for r in self.records):
            raise MalformedMessage("records must be bytes")

    def body(self) -> dict[str, object]:
        """Wire fields."""
        return {"round": self.round, "leader": self.leader, "records": list(self.records)}

    def digest(self, crypto: Crypto) -> bytes:
        """The proposal hash that votes and certificates refer to."""
        return crypto.digest(self.DOMAIN, self.body())

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Proposal:
        """Check and rebuild a decoded body."""
        _field(body, cls.FIELDS)
        records = body["records"]
        if not isinstance(records, list | tuple):
            raise MalformedMessage("records must be a list")
        return cls(
            round=_check_round(body["round"]),
            leader=_check_bytes(body["leader"], KEY_SIZE, "leader"),
            records=tuple(records),
        )


@dataclass(frozen=True)
class Vote:
    """A member's vote in a round: for a proposal hash, or SKIP (``None``)."""

    DOMAIN: ClassVar[str] = "poc/v1/vote"
    FIELDS: ClassVar[tuple[str, ...]] = ("round", "voter", "proposal_hash")

    round: int
    voter: bytes
    proposal_hash: bytes | None

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_bytes(self.voter, KEY_SIZE, "voter")
        _check_hash(self.proposal_hash)

    def body(self) -> dict[str, object]:
        """Wire fields; SKIP is an empty ``proposal_hash``."""
        return {
            "round": self.round,
            "voter": self.voter,
            "proposal_hash": _hash_to_wire(self.proposal_hash),
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> Vote:
        """Check and rebuild a decoded body."""
        _field(body, cls.FIELDS)
        return cls(
            round=_check_round(body["round"]),
            voter=_check_bytes(body["voter"], KEY_SIZE, "voter"),
            proposal_hash=_hash_from_wire(body["proposal_hash"]),
        )


@dataclass(frozen=True)
class SignedProposal:
    """A proposal with its leader's signature."""

    proposal: Proposal
    signature: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.signature, SIGNATURE_SIZE, "signature")

    @property
    def signer(self) -> bytes:
        """The key that must have signed it."""
        return self.proposal.leader

    @property
    def round(self) -> int:
        """The round it is for."""
        return self.proposal.round

    def verify(self, crypto: Crypto) -> bool:
        """Whether the leader named in the proposal signed it."""
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
        """The key that must have signed it."""
        return self.vote.voter

    @property
    def round(self) -> int:
        """The round it is for."""
        return self.vote.round

    def verify(self, crypto: Crypto) -> bool:
        """Whether the voter named in the vote signed it."""
        return crypto.verify(self.signer, Vote.DOMAIN, self.vote.body(), self.signature)


@dataclass(frozen=True)
class QuorumCertificate:
    """Signed votes of at least 2/3 of the stake for one value in one round.

    ``votes`` are ``(voter, signature)`` pairs, kept sorted by voter so that a
    certificate has one encoding. A certified proposal is final; a certified
    SKIP (``proposal_hash`` None) finalizes an empty round.
    """

    DOMAIN: ClassVar[str] = "poc/v1/certificate"
    FIELDS: ClassVar[tuple[str, ...]] = ("round", "proposal_hash", "votes")

    round: int
    proposal_hash: bytes | None
    votes: tuple[tuple[bytes, bytes], ...]

    def __post_init__(self) -> None:
        _check_round(self.round)
        _check_hash(self.proposal_hash)
        for voter, signature in self.votes:
            _check_bytes(voter, KEY_SIZE, "voter")
            _check_bytes(signature, SIGNATURE_SIZE, "signature")
        object.__setattr__(self, "votes", tuple(sorted(self.votes)))

    def body(self) -> dict[str, object]:
        """Wire fields; votes as ``[voter, signature]`` lists."""
        return {
            "round": self.round,
            "proposal_hash": _hash_to_wire(self.proposal_hash),
            "votes": [[voter, signature] for voter, signature in self.votes],
        }

    @classmethod
    def from_body(cls, body: Mapping[str, object]) -> QuorumCertificate:
        """Check and rebuild a decoded body."""
        _field(body, cls.FIELDS)
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
            round=_check_round(body["round"]),
            proposal_hash=_hash_from_wire(body["proposal_hash"]),
            votes=tuple(votes),
        )

    def signed_votes(self) -> tuple[SignedVote, ...]:
        """The votes the certificate carries, rebuilt for checking or relaying."""
        return tuple(
            SignedVote(Vote(self.round, voter, self.proposal_hash), signature)
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
        """Whether the signatures are members' and carry a stake quorum, one per voter."""
        return self.why_invalid(committee, crypto) is None


Signed = SignedProposal | SignedVote


@dataclass(frozen=True)
class Evidence:
    """Two conflicting messages signed by one key for one round: equivocation.

    Both are votes or both are proposals. The pair is kept ordered by
    signature so every validator that catches it publishes the same evidence.
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
        """``"vote"`` or ``"proposal"``."""
        return "vote" if isinstance(self.first, SignedVote) else "proposal"

    @property
    def offender(self) -> bytes:
        """The key that signed both messages."""
        return self.first.signer

    @property
    def round(self) -> int:
        """The round both messages are for."""
        return self.first.round

    def body(self) -> dict[str, object]:
        """Wire fields: the kind and both messages with their signatures."""
        return {
            "kind": self.kind,
            "first": {"body": _message_body(self.first), "signature": self.first.signature},
            "second": {"body": _message_body(self.second), "signature": self.second.signature},
        }

    def why_invalid(self, committee: Committee, crypto: Crypto) -> str | None:
        """The reason this is not proof of equivocation, or None when it is."""
        if type(self.first) is not type(self.second):
            return "mixed_kinds"
        if self.first.signer != self.second.signer:
            return "different_signers"
        if self.first.round != self.second.round:
            return "different_rounds"
        if _message_body(self.first) == _message_body(self.second):
            return "not_conflicting"
        if committee.member(self.offender) is None:
            return "not_member"
        if not (self.first.verify(crypto) and self.second.verify(crypto)):
            return "bad_signature"
        return None

    def verify(self, committee: Committee, crypto: Crypto) -> bool:
        """Whether this proves that a member signed two conflicting messages."""
        return self.why_invalid(committee, crypto) is None


def _message_body(message: Signed) -> dict[str, object]:
    if isinstance(message, SignedVote):
        return message.vote.body()
    return message.proposal.body()
