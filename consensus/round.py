"""One validator's view of consensus: events in, actions out (DESIGN.md §7).

Rounds finalize strictly in order: the leader of round r is drawn from the
beacon, and the beacon of r is known only once r - 1 is final. Messages for
the next few rounds are kept (bounded) until their round comes; messages for
the last few finalized rounds are kept to catch equivocation that arrives
late. The machine has no clock and no I/O: the node calls ``round_closed``
and ``timeout`` when its clock says so and performs the returned actions.

Known limit, inherent to "one vote per round": if the honest votes of a round
split between the proposal and SKIP so that neither reaches 2/3 of the stake,
that round cannot finalize until a certificate arrives by sync.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from consensus.actions import (
    Action,
    Broadcast,
    Commit,
    Equivocation,
    FetchProposal,
    Rejected,
)
from consensus.beacon import SKIP_HASH, genesis_beacon, leader_of, next_beacon
from consensus.committee import Committee, Member
from consensus.crypto import Crypto
from consensus.messages import (
    Evidence,
    Proposal,
    QuorumCertificate,
    SignedProposal,
    SignedVote,
    Vote,
)

RecordsAgree = Callable[[Sequence[bytes]], bool]


@dataclass
class _RoundState:
    """What one validator knows about one round."""

    closed: bool = False
    records: tuple[bytes, ...] = ()
    timed_out: bool = False
    proposals: dict[bytes, SignedProposal] = field(default_factory=dict)
    votes: dict[bytes, SignedVote] = field(default_factory=dict)
    my_vote: SignedVote | None = None
    fetch_requested: bool = False
    reported: set[tuple[str, bytes]] = field(default_factory=set)


class RoundMachine:
    """One validator's view of consensus: events in, actions out (no I/O, no clock).

    ``records_agree(records)`` is the node's judgement of a leader's records
    against its own recomputation (within tolerance); it is asked at most once
    per round, and only about a proposal from that round's leader.
    ``first_round`` and ``beacon`` let a restarted node resume after its last
    finalized round; ``beacon`` defaults to the genesis beacon and is required
    for any other first round.
    """

    def __init__(
        self,
        committee: Committee,
        me: bytes,
        crypto: Crypto,
        *,
        records_agree: RecordsAgree,
        first_round: int = 0,
        beacon: bytes | None = None,
        future_rounds: int = 8,
        retained_rounds: int = 8,
    ) -> None:
        if committee.member(me) is None:
            raise ValueError("this validator is not a member of the committee")
        if first_round < 0:
            raise ValueError(f"first_round must be >= 0, got {first_round}")
        if beacon is None:
            if first_round != 0:
                raise ValueError("resuming after round 0 needs that round's beacon")
            beacon = genesis_beacon(committee.digest())
        if future_rounds < 1 or retained_rounds < 0:
            raise ValueError("future_rounds must be >= 1 and retained_rounds >= 0")
        self._committee = committee
        self._me = me
        self._crypto = crypto
        self._records_agree = records_agree
        self._next_round = first_round
        self._beacon = beacon
        self._future_rounds = future_rounds
        self._retained_rounds = retained_rounds
        self._rounds: dict[int, _RoundState] = {}

    @property
    def next_round(self) -> int:
        """The first round not yet finalized."""
        return self._next_round

    @property
    def beacon(self) -> bytes:
        """The beacon of ``next_round``."""
        return self._beacon

    @property
    def leader(self) -> Member:
        """The leader of ``next_round``."""
        return leader_of(self._beacon, self._committee)

    def my_vote(self, round_number: int) -> SignedVote | None:
        """The vote this validator signed in a round still held, if any."""
        state = self._rounds.get(round_number)
        return None if state is None else state.my_vote

    # events

    def round_closed(self, round_number: int, my_records: Sequence[bytes]) -> list[Action]:
        """The node's clock closed ``round_number``; ``my_records`` are what it would propose.

        As leader, propose them and vote for them. A committee of one therefore
        gets the proposal, the vote and the commit from this one call.
        """
        if round_number < self._next_round:
            return [Rejected("round_closed", round_number, "already_final")]
        state = self._state(round_number)
        if not state.closed:
            state.closed = True
            state.records = tuple(my_records)
        return self._advance()

    def timeout(self, round_number: int) -> list[Action]:
        """No proposal arrived in time: vote SKIP unless already voted."""
        if round_number < self._next_round:
            return []
        self._state(round_number).timed_out = True
        return self._advance()

    def proposal_received(self, signed: SignedProposal) -> list[Action]:
        """A signed proposal from the bus (or fetched after a ``FetchProposal``)."""
        r = signed.round
        rejected = self._screen("proposal", r, signed.signer)
        if rejected is not None:
            return [rejected]
        if not signed.verify(self._crypto):
            return [Rejected("proposal", r, "bad_signature")]
        state = self._state(r)
        known = state.proposals.get(signed.signer)
        if known is not None:
            return self._conflict(state, "proposal", known, signed)
        if r == self._next_round and signed.signer != self.leader.public_key:
            return [Rejected("proposal", r, "not_leader")]
        state.proposals[signed.signer] = signed
        return self._advance() if r == self._next_round else []

    def vote_received(self, signed: SignedVote) -> list[Action]:
        """A signed vote from the bus (own votes echoed back are harmless)."""
        r = signed.round
        rejected = self._screen("vote", r, signed.signer)
        if rejected is not None:
            return [rejected]
        if not signed.verify(self._crypto):
            return [Rejected("vote", r, "bad_signature")]
        state = self._state(r)
        known = state.votes.get(signed.signer)
        if known is not None:
            return self._conflict(state, "vote", known, signed)
        state.votes[signed.signer] = signed
        return self._advance() if r == self._next_round else []

    def certificate_received(
        self, certificate: QuorumCertificate, proposal: Proposal | None
    ) -> list[Action]:
        """A finalized round fetched by sync: verify it, then apply it if it is next.

        Rounds apply in order; a certificate for a later round is rejected
        (``not_next``) and must be offered again when its turn comes.
        """
        r = certificate.round
        if r < self._next_round:
            return [Rejected("certificate", r, "already_final")]
        if r > self._next_round:
            return [Rejected("certificate", r, "not_next")]
        reason = certificate.why_invalid(self._committee, self._crypto)
        if reason is not None:
            return [Rejected("certificate", r, reason)]
        if proposal is None:
            if certificate.proposal_hash is not None:
                return [Rejected("certificate", r, "missing_proposal")]
        elif proposal.round != r or proposal.digest(self._crypto) != certificate.proposal_hash:
            return [Rejected("certificate", r, "hash_mismatch")]
        actions: list[Action] = [self._commit(proposal, certificate)]
        return actions + self._advance()

    def restore_vote(self, signed: SignedVote) -> list[Action]:
        """After a restart, reinstate a vote this validator signed (and stored) before.

        The machine then never signs another vote for that round; the vote is
        broadcast again, since peers may never have received it.
        """
        if signed.signer != self._me or not signed.verify(self._crypto):
            raise ValueError("can only restore a vote this validator signed")
        r = signed.round
        if r < self._next_round:
            return []
        state = self._state(r)
        if state.my_vote is not None and state.my_vote != signed:
            raise ValueError(f"a different vote is already recorded for round {r}")
        state.my_vote = signed
        state.votes[self._me] = signed
        actions: list[Action] = [_broadcast_vote(signed)]
        return actions + self._advance()

    def restore_proposal(self, signed: SignedProposal) -> list[Action]:
        """After a restart, reinstate a proposal this validator signed as leader."""
        if signed.signer != self._me or not signed.verify(self._crypto):
            raise ValueError("can only restore a proposal this validator signed")
        r = signed.round
        if r < self._next_round:
            return []
        state = self._state(r)
        known = state.proposals.get(self._me)
        if known is not None and known != signed:
            raise ValueError(f"a different proposal is already recorded for round {r}")
        state.proposals[self._me] = signed
        actions: list[Action] = [_broadcast_proposal(signed)]
        return actions + self._advance()

    # internals

    def _state(self, round_number: int) -> _RoundState:
        state = self._rounds.get(round_number)
        if state is None:
            state = self._rounds[round_number] = _RoundState()
        return state

    def _screen(self, kind: str, r: int, signer: bytes) -> Rejected | None:
        """Bound what the network can make us hold: members, nearby rounds only."""
        if self._committee.member(signer) is None:
            return Rejected(kind, r, "not_member")
        if r >= self._next_round + self._future_rounds:
            return Rejected(kind, r, "too_far_ahead")
        if r < self._next_round - self._retained_rounds:
            return Rejected(kind, r, "too_old")
        return None

    def _conflict(
        self,
        state: _RoundState,
        kind: str,
        known: SignedProposal | SignedVote,
        received: SignedProposal | SignedVote,
    ) -> list[Action]:
        """A second message from one signer in one round: a duplicate, or equivocation."""
        if known == received or _same_content(known, received):
            return []
        key = (kind, received.signer)
        if key in state.reported:
            return []
        state.reported.add(key)
        return [Equivocation(Evidence(known, received))]

    def _advance(self) -> list[Action]:
        """Do what the next round allows; after each commit, go on to the following one."""
        actions: list[Action] = []
        while True:
            r = self._next_round
            state = self._rounds.get(r)
            if state is None:
                return actions
            leader = self.leader.public_key
            if (
                leader == self._me
                and state.closed
                and state.my_vote is None
                and self._me not in state.proposals
            ):
                proposal = Proposal(r, self._me, state.records)
                signature = self._crypto.sign(Proposal.DOMAIN, proposal.body())
                signed = SignedProposal(proposal, signature)
                state.proposals[self._me] = signed
                actions.append(_broadcast_proposal(signed))
            if state.my_vote is None:
                ready, value = self._choose(state, leader)
                if ready:
                    actions.append(self._vote(state, r, value))
            committed = self._try_commit(state, r, leader)
            if committed is None:
                return actions
            actions.append(committed)
            if isinstance(committed, FetchProposal):
                return actions

    def _choose(self, state: _RoundState, leader: bytes) -> tuple[bool, bytes | None]:
        """Whether to vote now, and for what: a proposal hash, or None for SKIP."""
        proposal = state.proposals.get(leader)
        if proposal is not None and (state.closed or state.timed_out):
            if leader == self._me or self._records_agree(proposal.proposal.records):
                return True, proposal.proposal.digest(self._crypto)
            return True, None
        return state.timed_out, None

    def _vote(self, state: _RoundState, r: int, value: bytes | None) -> Broadcast:
        vote = Vote(r, self._me, value)
        signed = SignedVote(vote, self._crypto.sign(Vote.DOMAIN, vote.body()))
        state.my_vote = signed
        state.votes[self._me] = signed
        return _broadcast_vote(signed)

    def _try_commit(
        self, state: _RoundState, r: int, leader: bytes
    ) -> Commit | FetchProposal | None:
        """Commit when one value holds a quorum of the round's votes."""
        stake: dict[bytes | None, int] = {}
        for voter, signed in state.votes.items():
            member = self._committee.member(voter)
            if member is not None:
                value = signed.vote.proposal_hash
                stake[value] = stake.get(value, 0) + member.stake
        for value, held in stake.items():
            if not self._committee.has_quorum(held):
                continue
            certificate = QuorumCertificate(
                r,
                value,
                tuple(
                    (voter, signed.signature)
                    for voter, signed in state.votes.items()
                    if signed.vote.proposal_hash == value
                ),
            )
            if value is None:
                return self._commit(None, certificate)
            proposal = state.proposals.get(leader)
            if proposal is not None and proposal.proposal.digest(self._crypto) == value:
                return self._commit(proposal.proposal, certificate)
            if state.fetch_requested:
                return None
            state.fetch_requested = True
            return FetchProposal(r, value, certificate)
        return None

    def _commit(self, proposal: Proposal | None, certificate: QuorumCertificate) -> Commit:
        """Finalize the next round and move the beacon on."""
        r = self._next_round
        proposal_hash = certificate.proposal_hash
        beacon_after = next_beacon(
            self._beacon, SKIP_HASH if proposal_hash is None else proposal_hash
        )
        self._next_round = r + 1
        self._beacon = beacon_after
        oldest = self._next_round - self._retained_rounds
        for old in [n for n in self._rounds if n < oldest]:
            del self._rounds[old]
        return Commit(r, proposal, certificate, beacon_after)


def _same_content(a: SignedProposal | SignedVote, b: SignedProposal | SignedVote) -> bool:
    if isinstance(a, SignedVote) and isinstance(b, SignedVote):
        return a.vote == b.vote
    if isinstance(a, SignedProposal) and isinstance(b, SignedProposal):
        return a.proposal == b.proposal
    return False


def _broadcast_vote(signed: SignedVote) -> Broadcast:
    return Broadcast(Vote.DOMAIN, signed.vote.body(), signed.signature)


def _broadcast_proposal(signed: SignedProposal) -> Broadcast:
    return Broadcast(Proposal.DOMAIN, signed.proposal.body(), signed.signature)
