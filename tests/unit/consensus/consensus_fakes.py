"""Test doubles for consensus: Ed25519 over sorted-key JSON, and an in-memory bus.

The node supplies canonical msgpack; any deterministic encoding exercises the
state machine the same way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from consensus import (
    Action,
    Broadcast,
    Commit,
    Committee,
    Equivocation,
    Member,
    Proposal,
    RoundMachine,
    SignedProposal,
    SignedVote,
    Vote,
)


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return {"$b": value.hex()}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, int | str):
        return value
    raise TypeError(f"not allowed in a body: {type(value).__name__}")


def encode(domain: str, body: Mapping[str, object]) -> bytes:
    return domain.encode() + b"\0" + json.dumps(_plain(body), sort_keys=True).encode()


class FakeCrypto:
    """Ed25519 from `cryptography` over a deterministic JSON encoding."""

    def __init__(self, seed: int) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(
            hashlib.sha256(b"test-key" + seed.to_bytes(8, "big")).digest()
        )
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes:
        return hashlib.sha256(encode(domain, body)).digest()

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes:
        return self._key.sign(encode(domain, body))

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, encode(domain, body))
        except (InvalidSignature, ValueError):
            return False
        return True


def make_committee(
    stakes: Sequence[int],
    *,
    genesis_ms: int = 1_000_000,
    round_seconds: int = 10,
    epoch_rounds: int = 60,
) -> tuple[Committee, list[FakeCrypto]]:
    cryptos = [FakeCrypto(i) for i in range(len(stakes))]
    members = tuple(
        Member(f"v{i}", c.public_key, s)
        for i, (c, s) in enumerate(zip(cryptos, stakes, strict=True))
    )
    return Committee(genesis_ms, round_seconds, epoch_rounds, members), cryptos


def decode_broadcast(action: Broadcast) -> SignedProposal | SignedVote:
    """What a receiving node would rebuild from the wire."""
    if action.domain == Proposal.DOMAIN:
        return SignedProposal(Proposal.from_body(action.body), action.signature)
    assert action.domain == Vote.DOMAIN
    return SignedVote(Vote.from_body(action.body), action.signature)


@dataclass
class Node:
    """A validator in the simulation: its machine and what it committed and saw."""

    crypto: FakeCrypto
    machine: RoundMachine
    commits: list[Commit] = field(default_factory=list)
    evidence: list[Equivocation] = field(default_factory=list)
    online: bool = True


class Simulation:
    """Many validators in one process over an in-memory, in-order bus."""

    def __init__(
        self,
        stakes: Sequence[int],
        *,
        agree: Callable[[int, Sequence[bytes]], bool] | None = None,
    ) -> None:
        self.committee, cryptos = make_committee(stakes)
        self.nodes: list[Node] = []
        for i, crypto in enumerate(cryptos):

            def records_agree(records: Sequence[bytes], i: int = i) -> bool:
                return True if agree is None else agree(i, records)

            machine = RoundMachine(
                self.committee, crypto.public_key, crypto, records_agree=records_agree
            )
            self.nodes.append(Node(crypto, machine))
        self.queue: list[tuple[int, SignedProposal | SignedVote]] = []

    def by_key(self, key: bytes) -> Node:
        return next(n for n in self.nodes if n.crypto.public_key == key)

    def handle(self, sender: int, actions: list[Action]) -> None:
        node = self.nodes[sender]
        for action in actions:
            if isinstance(action, Broadcast):
                self.queue.append((sender, decode_broadcast(action)))
            elif isinstance(action, Commit):
                node.commits.append(action)
            elif isinstance(action, Equivocation):
                node.evidence.append(action)

    def deliver_all(self) -> None:
        while self.queue:
            sender, message = self.queue.pop(0)
            if not self.nodes[sender].online:
                continue
            for i, node in enumerate(self.nodes):
                if i == sender or not node.online:
                    continue
                self.deliver(i, message)

    def deliver(self, target: int, message: SignedProposal | SignedVote) -> None:
        machine = self.nodes[target].machine
        if isinstance(message, SignedProposal):
            self.handle(target, machine.proposal_received(message))
        else:
            self.handle(target, machine.vote_received(message))

    def close_round(self, r: int, records: Sequence[bytes] = (b"rec",)) -> None:
        for i, node in enumerate(self.nodes):
            if node.online:
                self.handle(i, node.machine.round_closed(r, records))
        self.deliver_all()

    def time_out(self, r: int) -> None:
        for i, node in enumerate(self.nodes):
            if node.online:
                self.handle(i, node.machine.timeout(r))
        self.deliver_all()
