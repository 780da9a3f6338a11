"""Test doubles for consensus: crypto, committees, and a deterministic network simulator.

``FakeCrypto`` is Ed25519 over a sorted-key JSON encoding (the node supplies
canonical msgpack; any deterministic encoding exercises the machine the same
way). ``FastCrypto`` replaces the signature by a hash of key and message: it
proves nothing against forgery, but it lets the property tests run thousands
of schedules; the machine's handling of real signatures is covered by the
unit tests with ``FakeCrypto``.

``Simulation`` runs n round machines in one process over an in-memory network
with a virtual clock. Every random choice (latency, drops, duplicates,
reordering, build and verify delays, byzantine splits) comes from one
``random.Random(seed)`` consumed in event order, so a seed replays a schedule
exactly. Faulty members follow a ``Behaviour``: some run a machine whose
output the simulator bends (twins, an equivocating proposer, a replayer, a
member that never votes, a proposer that withholds its data), the others are
scripts that sign with their key (silent, early proposer, votes for
everything). ``Simulation.safety_violations`` and ``Simulation.done`` are
what the tests assert on.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from consensus import (
    NO_VIEW,
    Action,
    Broadcast,
    BuildProposal,
    CatchUp,
    Commit,
    Committee,
    Equivocation,
    Evidence,
    FetchValue,
    Member,
    Proposal,
    QuorumCertificate,
    Rejected,
    RoundMachine,
    ScheduleTimeout,
    Signed,
    SignedProposal,
    SignedVote,
    Timeouts,
    VerifyProposal,
    Vote,
    VoteKind,
)

# -- cryptography -----------------------------------------------------------------


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


class SimCrypto(Protocol):
    """What the simulator needs: the ``Crypto`` protocol and the public key."""

    public_key: bytes

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes: ...

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes: ...

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool: ...


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


class FastCrypto:
    """A fast stand-in for Ed25519: a signature is ``sha512(key ‖ digest)``.

    Anyone can forge it; the simulator's byzantine members only ever sign with
    their own key, so it is enough to test the state machine at speed.
    """

    def __init__(self, seed: int) -> None:
        self.public_key = hashlib.sha256(b"fast-key" + seed.to_bytes(8, "big")).digest()

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes:
        return hashlib.sha256(domain.encode() + repr(sorted(body.items())).encode()).digest()

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes:
        return hashlib.sha512(self.public_key + self.digest(domain, body)).digest()

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool:
        return signature == hashlib.sha512(public_key + self.digest(domain, body)).digest()


def make_committee(
    stakes: Sequence[int],
    *,
    genesis_ms: int = 1_000_000,
    round_seconds: int = 10,
    epoch_rounds: int = 60,
    crypto: Callable[[int], SimCrypto] = FakeCrypto,
) -> tuple[Committee, list[SimCrypto]]:
    """A committee of ``len(stakes)`` members; ``cryptos[i]`` holds member ``v{i}``'s key."""
    cryptos = [crypto(i) for i in range(len(stakes))]
    members = tuple(
        Member(f"v{i}", c.public_key, s)
        for i, (c, s) in enumerate(zip(cryptos, stakes, strict=True))
    )
    return Committee(genesis_ms, round_seconds, epoch_rounds, members), cryptos


def sign_proposal(
    crypto: SimCrypto,
    round_number: int,
    view: int,
    records: Iterable[bytes],
    valid_view: int = NO_VIEW,
) -> SignedProposal:
    proposal = Proposal(round_number, view, crypto.public_key, tuple(records), valid_view)
    return SignedProposal(proposal, crypto.sign(Proposal.DOMAIN, proposal.body()))


def sign_vote(
    crypto: SimCrypto, kind: VoteKind, round_number: int, view: int, value_hash: bytes | None
) -> SignedVote:
    vote = Vote(kind, round_number, view, crypto.public_key, value_hash)
    return SignedVote(vote, crypto.sign(Vote.DOMAIN, vote.body()))


def deliver(machine: RoundMachine, message: Signed) -> list[Action]:
    """Hand one message from the bus to a machine."""
    if isinstance(message, SignedProposal):
        return machine.proposal_received(message)
    return machine.vote_received(message)


def honest_records(round_number: int, instance: int) -> tuple[bytes, ...]:
    """What node ``instance`` proposes for a round: distinct per (round, instance)."""
    return (f"r{round_number}/n{instance}/a".encode(), f"r{round_number}/n{instance}/b".encode())


# -- the simulator ----------------------------------------------------------------


class Behaviour(StrEnum):
    """How a member behaves; every one but ``HONEST`` counts as faulty."""

    HONEST = "honest"
    SILENT = "silent"
    """Never sends anything."""
    EQUIVOCATING_PROPOSER = "equivocating_proposer"
    """Runs a machine, but signs a second, different proposal for each view it proposes in."""
    TWINS = "twins"
    """Two honest machines share the key: they sign different values and votes."""
    REPLAYER = "replayer"
    """As proposer, proposes the records committed in an earlier round."""
    EARLY_PROPOSER = "early_proposer"
    """Sends proposals for current and future rounds and views without being their proposer."""
    VOTES_FOR_EVERYTHING = "votes_for_everything"
    """Prevotes and precommits nil and every value it sees, conflicting or not."""
    NEVER_VOTES = "never_votes"
    """Runs a machine that proposes, but never sends a vote."""
    WITHHOLDER = "withholder"
    """As proposer, proposes records whose data it gives only to enough honest members
    for a prevote quorum with its own prevote, then falls silent from its first
    precommit after it. A member that verifies gets the data if the withholder gave
    it, or from any member that verified the value before (the node keeps and serves
    the bytes it fetched); otherwise it refuses the value for that view only."""


FAULTY_BEHAVIOURS = tuple(b for b in Behaviour if b is not Behaviour.HONEST)
MACHINE_BEHAVIOURS = frozenset(
    {
        Behaviour.HONEST,
        Behaviour.EQUIVOCATING_PROPOSER,
        Behaviour.TWINS,
        Behaviour.REPLAYER,
        Behaviour.NEVER_VOTES,
        Behaviour.WITHHOLDER,
    }
)
FAULTY_BEHAVIOURS_DRAWN = tuple(b for b in FAULTY_BEHAVIOURS if b is not Behaviour.WITHHOLDER)
"""What ``run_schedule`` draws from unless asked for a withholder: the draws of the
seeds kept as examples stay the schedules they were kept for."""


@dataclass(frozen=True)
class Network:
    """What the network does to messages; before ``heal_ms`` it may lose them.

    Before ``heal_ms`` (virtual ms since genesis) a delivery is lost with
    probability ``drop``, or when its sender or its receiver is in
    ``partitioned``, and takes up to ``chaos_latency_ms`` (plus up to as much
    again with probability ``reorder``); from ``heal_ms`` on nothing is lost
    and a delivery takes ``min_latency_ms..max_latency_ms``. A copy is
    delivered twice with probability ``duplicate``.

    With ``relay`` the network gossips as Tendermint assumes ("if a correct
    process receives m at time t, every correct process receives m by
    max(t, GST) + delta"): once an honest node holds a message, every node
    that has not been sent it gets it, after ``heal_ms`` if lost before.
    Without it, a lost delivery is gone, and only the members' resending of
    ``relay_messages()`` (what the node's driver resends) and sync make up
    for it.
    """

    min_latency_ms: int = 1
    max_latency_ms: int = 40
    chaos_latency_ms: int = 400
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    heal_ms: int = 0
    partitioned: frozenset[int] = frozenset()
    relay: bool = True


@dataclass
class Node:
    """One running instance: a member's key, maybe a machine, and what it did."""

    index: int
    member: int
    crypto: SimCrypto
    behaviour: Behaviour
    machine: RoundMachine | None
    clock_offset_ms: int = 0
    commits: list[Commit] = field(default_factory=list)
    synced: set[int] = field(default_factory=set)
    evidence: list[Evidence] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    sent: list[Signed] = field(default_factory=list)
    verify_requests: list[VerifyProposal] = field(default_factory=list)
    refused_for_view: list[VerifyProposal] = field(default_factory=list)
    """Verifications answered 'no, for this view' (the data was out of reach)."""
    catch_ups: list[int] = field(default_factory=list)
    progress: tuple[int, int] | None = None
    voted: set[tuple[VoteKind, int, int, bytes | None]] = field(default_factory=set)
    ticks: int = 0
    generation: int = 0
    down: bool = False
    back_at: int = 0
    restarts: int = 0
    withheld: bool = False
    """A withholder that proposed withheld data: it falls silent at its next precommit."""
    silent: bool = False

    @property
    def honest(self) -> bool:
        return self.behaviour is Behaviour.HONEST

    @property
    def public_key(self) -> bytes:
        return self.crypto.public_key


Verifier = Callable[["Simulation", Node, VerifyProposal], bool]


def not_replayed(sim: Simulation, node: Node, request: VerifyProposal) -> bool:
    """The default verdict: no record was committed in an earlier round."""
    return all(sim.first_committed.get(r, request.round) >= request.round for r in request.records)


class Simulation:
    """n members over an in-memory network with a virtual clock (ms since genesis).

    Member i closes round r at ``(r + 1) * round_ms + clock_offsets[i]`` for
    r < ``rounds``. ``run`` processes events until every honest member has
    committed ``rounds`` rounds or the clock passes ``until_ms``.

    A node answers ``BuildProposal`` with ``honest_records`` and
    ``VerifyProposal`` with ``verifier`` after ``work_ms``; when it decided no
    round for ``resend_ms`` it resends ``relay_messages()`` if honest and
    ``relay_resend`` (relayed messages may be signed by other members), else
    only ``current_messages()`` (its own of its current view), and
    syncs finalized rounds from an honest member on ``FetchValue``,
    ``CatchUp`` or when its clock is ``lag_rounds`` rounds ahead of it.
    ``crashes`` maps members to (crash, restart) times: the node loses its
    machine, timers and incoming messages meanwhile (they wait for it), then
    starts a new machine from its commits and ``restore``s what it signed.
    """

    def __init__(
        self,
        stakes: Sequence[int],
        *,
        seed: int = 0,
        rounds: int = 3,
        network: Network | None = None,
        behaviours: Mapping[int, Behaviour] | None = None,
        timeouts: Timeouts | None = None,
        round_seconds: int = 1,
        clock_offsets_ms: Sequence[int] | None = None,
        verifier: Verifier = not_replayed,
        crypto: Callable[[int], SimCrypto] = FakeCrypto,
        resend_ms: int = 1000,
        work_ms: tuple[int, int] = (1, 20),
        lag_rounds: int = 2,
        crashes: Mapping[int, tuple[int, int]] | None = None,
        relay_resend: bool = True,
    ) -> None:
        self.committee, self.cryptos = make_committee(
            stakes, round_seconds=round_seconds, crypto=crypto
        )
        self.rng = random.Random(seed)
        self.seed = seed
        self.rounds = rounds
        self.network = network or Network()
        self.behaviours = {i: Behaviour.HONEST for i in range(len(stakes))}
        self.behaviours.update(behaviours or {})
        self.timeouts = timeouts or Timeouts()
        self.verifier = verifier
        self.resend_ms = resend_ms
        self.relay_resend = relay_resend
        self.work_ms = work_ms
        self.lag_rounds = lag_rounds
        self.round_ms = self.committee.round_ms
        self.now = 0
        self.first_committed: dict[bytes, int] = {}
        self.queue: list[tuple[int, int, str, int, object, int]] = []
        self.reached: dict[bytes, set[int]] = {}
        self.given: dict[bytes, set[int]] = {}
        """A withheld record → the nodes its withholder gave the data to."""
        self.holders: dict[bytes, set[int]] = {}
        """A withheld record → the nodes that hold its data and serve it."""
        self._seq = itertools.count()
        self.events = 0
        self.nodes: list[Node] = []
        offsets = list(clock_offsets_ms or [0] * len(stakes))
        for member, behaviour in sorted(self.behaviours.items()):
            copies = 2 if behaviour is Behaviour.TWINS else 1
            for _ in range(copies):
                crypto_i = self.cryptos[member]
                machine = None
                if behaviour in MACHINE_BEHAVIOURS:
                    machine = RoundMachine(
                        self.committee, crypto_i.public_key, crypto_i, timeouts=self.timeouts
                    )
                node = Node(len(self.nodes), member, crypto_i, behaviour, machine, offsets[member])
                self.nodes.append(node)
        for node in self.nodes:
            if node.machine is not None:
                for r in range(rounds):
                    self.at((r + 1) * self.round_ms + node.clock_offset_ms, "close", node, r)
            if node.machine is not None or node.behaviour is Behaviour.EARLY_PROPOSER:
                self.at(self.resend_ms + node.index, "tick", node, None)
        for member, (crash_ms, restart_ms) in (crashes or {}).items():
            node = next(n for n in self.nodes if n.member == member)
            assert node.machine is not None and crash_ms < restart_ms
            self.at(crash_ms, "crash", node, restart_ms)
            self.at(restart_ms, "restart", node, None)

    # -- what tests read ----------------------------------------------------------

    @property
    def honest(self) -> list[Node]:
        return [n for n in self.nodes if n.honest]

    def node_of(self, public_key: bytes) -> Node:
        return next(n for n in self.nodes if n.public_key == public_key)

    def done(self) -> bool:
        return all(len(n.commits) >= self.rounds for n in self.honest)

    def committed(self, round_number: int) -> dict[int, bytes]:
        """Honest node index → the value hash it committed for ``round_number``."""
        return {
            n.index: n.commits[round_number].value_hash
            for n in self.honest
            if len(n.commits) > round_number
        }

    def safety_violations(self) -> list[str]:
        """Rounds where honest members committed different values, or invalid commits."""
        problems = []
        for r in range(max((len(n.commits) for n in self.nodes), default=0)):
            values = self.committed(r)
            if len(set(values.values())) > 1:
                shown = {i: h.hex()[:12] for i, h in values.items()}
                problems.append(f"round {r}: honest members committed different values {shown}")
        for n in self.honest:
            for r, commit in enumerate(n.commits):
                reason = commit.certificate.why_invalid(self.committee, n.crypto)
                if commit.round != r or reason is not None:
                    problems.append(f"node {n.index} commit {r}: round {commit.round}, {reason}")
                if commit.certificate.value_hash != commit.value_hash:
                    problems.append(f"node {n.index} commit {r}: certificate names another value")
                if commit.value.digest(n.crypto) != commit.value_hash:
                    problems.append(f"node {n.index} commit {r}: value does not hash to its hash")
        return problems

    def describe(self) -> str:
        parts = [f"seed={self.seed} t={self.now} events={self.events}"]
        for n in self.nodes:
            m = n.machine
            where = "" if m is None else f" at {m.next_round}/{m.view}/{m.step}"
            parts.append(
                f"  node {n.index} (v{n.member}, {n.behaviour}){where}: "
                f"{len(n.commits)} commits, synced {sorted(n.synced)}"
            )
        return "\n".join(parts)

    # -- the event loop -----------------------------------------------------------

    def at(self, time_ms: int, kind: str, node: Node, payload: object) -> None:
        entry = (time_ms, next(self._seq), kind, node.index, payload, node.generation)
        heapq.heappush(self.queue, entry)

    def run(self, until_ms: int, *, max_events: int = 1_000_000) -> bool:
        """Process events up to ``until_ms``; whether every honest member finished."""
        while self.queue and not self.done():
            if self.queue[0][0] > until_ms:
                break
            time_ms, _, kind, index, payload, generation = heapq.heappop(self.queue)
            self.now = max(self.now, time_ms)
            self.events += 1
            if self.events > max_events:
                raise AssertionError(f"more than {max_events} events\n{self.describe()}")
            node = self.nodes[index]
            if kind in ("deliver", "close", "crash", "restart"):
                if node.down and kind in ("deliver", "close"):
                    self.at(node.back_at + 1, kind, node, payload)  # held until it is back
                    continue
            elif node.down or generation != node.generation:
                continue  # the crashed machine's timers and answers die with it
            self.dispatch(kind, node, payload)
        return self.done()

    def dispatch(self, kind: str, node: Node, payload: object) -> None:
        m = node.machine
        if kind == "deliver":
            assert isinstance(payload, SignedProposal | SignedVote)
            if m is not None:
                self.perform(node, deliver(m, payload))
            self.react(node, payload)
            if node.honest:
                self.spread(payload)
        elif kind == "close":
            assert m is not None and isinstance(payload, int)
            self.perform(node, m.round_closed(payload))
        elif kind == "timeout":
            assert m is not None and isinstance(payload, ScheduleTimeout)
            self.perform(node, m.timeout(payload.step, payload.round, payload.view))
        elif kind == "built":
            assert m is not None and isinstance(payload, BuildProposal)
            records = self.records_for(node, payload.round)
            self.perform(node, m.proposal_built(payload.round, payload.view, records))
        elif kind == "verified":
            assert m is not None and isinstance(payload, VerifyProposal)
            verdict = self.verifier(self, node, payload)
            if verdict and not self.data_reaches(node, payload.records):
                node.refused_for_view.append(payload)
                self.perform(
                    node, m.value_verified(payload.round, payload.value_hash, False, lasting=False)
                )
                return
            self.perform(node, m.value_verified(payload.round, payload.value_hash, verdict))
        elif kind == "synced":
            assert m is not None and isinstance(payload, list)
            for certificate, proposal in payload:
                if certificate.round == m.next_round:
                    node.synced.add(certificate.round)
                    self.perform(node, m.certificate_received(certificate, proposal))
        elif kind == "tick":
            self.tick(node)
        elif kind == "crash":
            assert isinstance(payload, int)
            node.down, node.back_at = True, payload
            node.generation += 1
        elif kind == "restart":
            self.restart(node)
        else:  # pragma: no cover
            raise AssertionError(kind)

    def perform(self, node: Node, actions: list[Action]) -> None:
        """Do what a node does with its machine's actions."""
        for action in actions:
            if isinstance(action, Broadcast):
                node.sent.append(action.message)
                self.publish(node, action.message)
            elif isinstance(action, BuildProposal):
                self.at(self.now + self.rng.randint(*self.work_ms), "built", node, action)
            elif isinstance(action, VerifyProposal):
                node.verify_requests.append(action)
                self.at(self.now + self.rng.randint(*self.work_ms), "verified", node, action)
            elif isinstance(action, ScheduleTimeout):
                self.at(self.now + action.delay_ms, "timeout", node, action)
            elif isinstance(action, Commit):
                if action.round != len(node.commits):
                    raise AssertionError(
                        f"node {node.index} committed round {action.round} after "
                        f"{len(node.commits)} rounds\n{self.describe()}"
                    )
                node.commits.append(action)
                for record in action.value.records:
                    self.first_committed.setdefault(record, action.round)
            elif isinstance(action, FetchValue):
                self.request_sync(node, action.round)
            elif isinstance(action, CatchUp):
                node.catch_ups.append(action.from_round)
                self.request_sync(node, action.from_round)
            elif isinstance(action, Equivocation):
                node.evidence.append(action.evidence)
            elif isinstance(action, Rejected):
                node.rejected.append(action)
            else:  # pragma: no cover
                raise AssertionError(action)

    def restart(self, node: Node) -> None:
        """A new machine from what the node stored: its commits and what it signed."""
        node.down = False
        node.restarts += 1
        first = len(node.commits)
        beacon = node.commits[-1].beacon_after if node.commits else None
        m = RoundMachine(
            self.committee,
            node.public_key,
            node.crypto,
            timeouts=self.timeouts,
            first_round=first,
            beacon=beacon,
        )
        node.machine = m
        self.perform(node, m.restore([s for s in node.sent if s.round >= first]))
        for r in range(first, self.rounds):
            if (r + 1) * self.round_ms + node.clock_offset_ms <= self.now:
                self.perform(node, m.round_closed(r))
        node.progress = None
        self.at(self.now + self.resend_ms, "tick", node, None)

    def data_reaches(self, node: Node, records: Iterable[bytes]) -> bool:
        """Whether ``node`` gets every withheld record's data: from its withholder, or
        from a member that got it before; it then holds and serves it too."""
        for record in records:
            if record not in self.given:
                continue
            holders = self.holders.setdefault(record, set())
            if node.index not in self.given[record] and not any(
                not self.nodes[i].down for i in holders
            ):
                return False
            holders.add(node.index)
        return True

    def withheld_records(self, node: Node, round_number: int) -> tuple[bytes, ...]:
        """Records whose data only enough honest members for a prevote quorum get."""
        record = f"r{round_number}/withheld/n{node.index}".encode()
        honest = [n for n in self.honest if n.member != node.member]
        self.rng.shuffle(honest)
        stake = self.committee.members[node.member].stake
        given: set[int] = set()
        for n in honest:
            if self.committee.has_quorum(stake):
                break
            given.add(n.index)
            stake += self.committee.members[n.member].stake
        self.given[record] = given
        node.withheld = True
        return (record,)

    def records_for(self, node: Node, round_number: int) -> tuple[bytes, ...]:
        if node.behaviour is Behaviour.WITHHOLDER:
            return self.withheld_records(node, round_number)
        if node.behaviour is Behaviour.REPLAYER:
            earlier = [
                n.commits[r].value.records
                for n in self.nodes
                for r in range(min(len(n.commits), round_number))
                if n.commits[r].value.records
            ]
            if earlier:
                return self.rng.choice(earlier)
        return honest_records(round_number, node.index)

    # -- the network --------------------------------------------------------------

    def publish(self, sender: Node, message: Signed) -> None:
        """Send to every other node, as the sender's behaviour allows."""
        targets = [n for n in self.nodes if n is not sender]
        if sender.behaviour is Behaviour.NEVER_VOTES and isinstance(message, SignedVote):
            return
        if sender.behaviour is Behaviour.WITHHOLDER:
            if (
                sender.withheld
                and isinstance(message, SignedVote)
                and message.vote.kind is VoteKind.PRECOMMIT
            ):
                sender.silent = True
            if sender.silent:
                return
        if (
            sender.behaviour is Behaviour.EQUIVOCATING_PROPOSER
            and isinstance(message, SignedProposal)
            and message.signer == sender.public_key
        ):
            p = message.proposal
            other = sign_proposal(
                sender.crypto, p.round, p.view, (*p.records, b"evil"), p.valid_view
            )
            for target in targets:
                choice = self.rng.random()
                if choice < 0.45 or choice >= 0.9:
                    self.send(sender, target, message)
                if choice >= 0.45:
                    self.send(sender, target, other)
            return
        for target in targets:
            self.send(sender, target, message)
        self.reached.setdefault(message.signature, set()).add(sender.index)
        if sender.honest:
            self.spread(message)

    def send(self, sender: Node, target: Node, message: Signed) -> None:
        net = self.network
        before_heal = self.now < net.heal_ms
        if before_heal:
            if sender.member in net.partitioned or target.member in net.partitioned:
                return
            if self.rng.random() < net.drop:
                return
        self.reached.setdefault(message.signature, set()).add(target.index)
        copies = 2 if self.rng.random() < net.duplicate else 1
        for _ in range(copies):
            delay = self.rng.randint(net.min_latency_ms, net.max_latency_ms)
            if before_heal:
                delay = self.rng.randint(net.min_latency_ms, net.chaos_latency_ms)
                if self.rng.random() < net.reorder:
                    delay += self.rng.randint(0, net.chaos_latency_ms)
            self.at(self.now + delay, "deliver", target, message)

    def spread(self, message: Signed) -> None:
        """Gossip: an honest node holds ``message``; every node gets it, after the heal."""
        if not self.network.relay:
            return
        reached = self.reached.setdefault(message.signature, set())
        start = max(self.now, self.network.heal_ms)
        for target in self.nodes:
            if target.index not in reached:
                reached.add(target.index)
                delay = self.rng.randint(self.network.min_latency_ms, self.network.max_latency_ms)
                self.at(start + delay, "deliver", target, message)

    def request_sync(self, node: Node, from_round: int) -> None:
        """Fetch finalized rounds from an honest member that has them (lossy before heal)."""
        responders = [n for n in self.honest if n is not node and len(n.commits) > from_round]
        if not responders or node.machine is None:
            return
        responder = self.rng.choice(responders)
        net = self.network
        if self.now < net.heal_ms and (
            node.member in net.partitioned
            or responder.member in net.partitioned
            or self.rng.random() < net.drop
        ):
            return
        entries = [(c.certificate, c.proposal) for c in responder.commits[from_round:][:32]]
        delay = 2 * self.rng.randint(net.min_latency_ms, net.max_latency_ms)
        self.at(self.now + delay, "synced", node, entries)

    # -- what nodes do on their own -------------------------------------------------

    def tick(self, node: Node) -> None:
        """Every ``resend_ms``: resend when stalled, sync when lagging the clock."""
        self.at(self.now + self.resend_ms, "tick", node, None)
        node.ticks += 1
        if node.behaviour is Behaviour.EARLY_PROPOSER:
            self.propose_early(node)
            return
        m = node.machine
        assert m is not None
        # As the node's driver (``rebroadcast_loop``): every period in which no round
        # was decided. Resending only when the view and step had not moved left a
        # member locked on a quorum others lacked silent while views timed out.
        progress = (m.next_round, len(node.commits))
        if progress == node.progress:
            relay = node.honest and self.relay_resend
            resend = m.relay_messages() if relay else m.current_messages()
            for message in resend:
                self.publish(node, message)
        node.progress = progress
        clock_round = (self.now - node.clock_offset_ms) // self.round_ms
        if m.next_round < self.rounds and clock_round >= m.next_round + self.lag_rounds:
            self.request_sync(node, m.next_round)

    def react(self, node: Node, message: Signed) -> None:
        """What a scripted byzantine member does with a message it receives."""
        if node.behaviour is not Behaviour.VOTES_FOR_EVERYTHING:
            return
        r, view = message.round, message.view
        if isinstance(message, SignedProposal):
            value: bytes | None = message.proposal.value.digest(node.crypto)
        else:
            value = message.vote.value_hash
        for kind in VoteKind:
            for value_hash in (None, value):
                if (kind, r, view, value_hash) not in node.voted:
                    node.voted.add((kind, r, view, value_hash))
                    self.publish(node, sign_vote(node.crypto, kind, r, view, value_hash))

    def propose_early(self, node: Node) -> None:
        """Proposals for the honest members' round and view, and for later ones."""
        machines = [n.machine for n in self.honest if n.machine is not None]
        if not machines:
            return
        r = min(m.next_round for m in machines)
        view = max(m.view for m in machines if m.next_round == r)
        window = 32
        for dr, dv in ((0, 0), (0, 1), (1, 0), (2, 3), (0, window + 1), (50, 0)):
            records = (f"early/{r + dr}/{view + dv}/{node.ticks}".encode(),)
            self.publish(node, sign_proposal(node.crypto, r + dr, view + dv, records))


def certificate_of(
    cryptos: Sequence[SimCrypto], round_number: int, view: int, value_hash: bytes
) -> QuorumCertificate:
    """A certificate signed by every key in ``cryptos``."""
    votes = tuple(
        (c.public_key, sign_vote(c, VoteKind.PRECOMMIT, round_number, view, value_hash).signature)
        for c in cryptos
    )
    return QuorumCertificate(round_number, view, value_hash, votes)
