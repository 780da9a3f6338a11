"""One member's view of consensus: events in, actions out (DESIGN.md §7).

Each round (Tendermint's *height*) is decided by one or more views
(Tendermint's *rounds*), following "The latest gossip on BFT consensus"
(Buchman, Kwon, Milosevic 2018), Algorithm 1; the comments name its lines.
Rounds finalize strictly in order: the proposers of round r are drawn from
the beacon, and the beacon of r is known once r - 1 is final. A member starts
round r when it has finalized r - 1 *and* its clock has passed the end of r
(``round_closed``): the round's records are the submissions that arrived by
then.

The machine has no clock and no I/O. It asks for timeouts
(``ScheduleTimeout``) and the node answers with ``timeout`` when they fire;
it asks for the records of its own proposal (``BuildProposal``) and for the
verdict on the view proposer's value (``VerifyProposal``), and the node
answers with ``proposal_built`` and ``value_verified``. Everything the network
can make it hold is bounded: members only, signatures checked, rounds and
views within a window, one message per (kind, round, view, signer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from consensus.actions import (
    Action,
    Broadcast,
    BuildProposal,
    CatchUp,
    Commit,
    Equivocation,
    FetchValue,
    Rejected,
    ScheduleTimeout,
    Step,
    VerifyProposal,
)
from consensus.beacon import genesis_beacon, next_beacon, proposer_of
from consensus.committee import Committee, Member
from consensus.crypto import Crypto
from consensus.messages import (
    NO_VIEW,
    Evidence,
    Proposal,
    QuorumCertificate,
    Signed,
    SignedProposal,
    SignedVote,
    Vote,
    VoteKind,
)


@dataclass(frozen=True)
class Timeouts:
    """How long each step waits, growing with the view so that some view outlasts any delay."""

    propose_ms: int = 3000
    prevote_ms: int = 1000
    precommit_ms: int = 1000
    delta_ms: int = 500
    max_ms: int = 60_000

    def __post_init__(self) -> None:
        for name in ("propose_ms", "prevote_ms", "precommit_ms", "max_ms"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.delta_ms < 0:
            raise ValueError("delta_ms must be >= 0")

    def of(self, step: Step, view: int) -> int:
        base = {
            Step.PROPOSE: self.propose_ms,
            Step.PREVOTE: self.prevote_ms,
            Step.PRECOMMIT: self.precommit_ms,
        }[step]
        return min(base + self.delta_ms * view, self.max_ms)


_ANY = object()
"""A tally over every value, nil included."""


@dataclass
class _RoundState:
    """What this member holds about one round."""

    closed: bool = False
    proposals: dict[tuple[int, bytes], tuple[SignedProposal, bytes]] = field(default_factory=dict)
    votes: dict[tuple[VoteKind, int], dict[bytes, SignedVote]] = field(default_factory=dict)
    values: dict[bytes, SignedProposal] = field(default_factory=dict)
    verdicts: dict[bytes, bool] = field(default_factory=dict)
    unsettled: set[bytes] = field(default_factory=set)
    """Values judged invalid for the view only (``value_verified(..., lasting=False)``)."""
    verifying: set[bytes] = field(default_factory=set)
    built: set[int] = field(default_factory=set)
    fired: set[tuple[str, int]] = field(default_factory=set)
    reported: set[tuple[str, int, bytes]] = field(default_factory=set)
    conflicting: dict[tuple[str, int, bytes], Signed] = field(default_factory=dict)
    """The second prevote of each reported ("prevote", view, signer): relayed with the first."""
    fetching: set[bytes] = field(default_factory=set)
    decided_view: int | None = None
    restored_view: int = 0


class RoundMachine:
    """One member's consensus: events in, actions out (no I/O, no clock).

    ``first_round`` and ``beacon`` let a restarted node resume after its last
    finalized round; ``beacon`` defaults to the genesis beacon and is required
    for any other first round. After a restart, pass the messages this member
    signed and stored to ``restore`` before anything else.
    """

    def __init__(
        self,
        committee: Committee,
        me: bytes,
        crypto: Crypto,
        *,
        timeouts: Timeouts | None = None,
        first_round: int = 0,
        beacon: bytes | None = None,
        future_rounds: int = 8,
        retained_rounds: int = 4,
        view_window: int = 32,
    ) -> None:
        if committee.member(me) is None:
            raise ValueError("this validator is not a member of the committee")
        if first_round < 0:
            raise ValueError(f"first_round must be >= 0, got {first_round}")
        if beacon is None:
            if first_round != 0:
                raise ValueError("resuming after round 0 needs that round's beacon")
            beacon = genesis_beacon(committee.digest())
        if future_rounds < 1 or retained_rounds < 0 or view_window < 1:
            raise ValueError("future_rounds and view_window must be >= 1, retained_rounds >= 0")
        self._committee = committee
        self._me = me
        self._crypto = crypto
        self._timeouts = timeouts or Timeouts()
        self._round = first_round
        self._beacon = beacon
        self._future_rounds = future_rounds
        self._retained_rounds = retained_rounds
        self._view_window = view_window
        self._rounds: dict[int, _RoundState] = {}
        self._started = False
        self._view = 0
        self._step = Step.PROPOSE
        self._locked: tuple[bytes, int] | None = None
        self._valid: tuple[SignedProposal, bytes, int] | None = None
        self._mine: dict[tuple[str, int, int], Signed] = {}
        self._ahead: dict[bytes, int] = {}
        self._caught_up_from = -1

    # -- what the node may read ----------------------------------------------

    @property
    def next_round(self) -> int:
        """The first round not yet finalized."""
        return self._round

    @property
    def beacon(self) -> bytes:
        """The beacon of ``next_round``."""
        return self._beacon

    @property
    def view(self) -> int:
        """The view of ``next_round`` this member is in."""
        return self._view

    @property
    def step(self) -> Step:
        return self._step

    @property
    def started(self) -> bool:
        """Whether ``next_round`` is under way (closed by the clock)."""
        return self._started

    @property
    def locked(self) -> tuple[bytes, int] | None:
        """(value hash, view) this member is locked on in ``next_round``, if any."""
        return self._locked

    def proposer(self, view: int) -> Member:
        """The proposer of ``view`` of ``next_round``."""
        return proposer_of(self._beacon, view, self._committee)

    def current_messages(self) -> list[Signed]:
        """What this member signed in the current view of ``next_round`` (to send again)."""
        return [
            message
            for (_, r, v), message in sorted(self._mine.items(), key=lambda kv: kv[0])
            if r == self._round and v == self._view
        ]

    def relay_messages(self) -> list[Signed]:
        """What to send again while ``next_round`` is undecided, so that it can be decided.

        Tendermint's liveness assumes that a message one honest member holds
        eventually reaches every honest member (gossip). Resending only one's
        own messages is not enough: members locked on a value whose prevote
        quorum another member never received would wait for it forever. So
        this is this member's own messages of the current and the previous
        view (a member one view behind may need them to finish its view, and
        one that restarted holds nothing else of it), the proposal and the
        prevotes behind its lock and its valid value, and the precommits of
        the current and the previous view: at most a few messages per member
        of the committee. The prevotes behind a value include both prevotes
        of a member proven to have signed two there: they count for the
        value only together (``_tally``), and the second may have reached
        this member alone.
        """
        state = self._rounds.get(self._round)
        if state is None:
            return self.current_messages()
        relay: dict[tuple[str, int, bytes], Signed] = {}
        for (kind, r, view), message in sorted(self._mine.items(), key=lambda kv: kv[0]):
            if r == self._round and view in (self._view - 1, self._view):
                relay[(kind, view, self._me)] = message
        backed = [self._locked] if self._locked is not None else []
        if self._valid is not None:
            backed.append((self._valid[1], self._valid[2]))
        for value_hash, view in backed:
            proposal = self._proposal_of(state, value_hash, view)
            if proposal is not None:
                relay[("proposal", proposal.view, proposal.signer)] = proposal
            for signed in state.votes.get((VoteKind.PREVOTE, view), {}).values():
                key = ("prevote", view, signed.signer)
                if signed.vote.value_hash == value_hash:
                    relay[key] = signed
                elif key in state.reported:  # counts for every value, with its other prevote
                    relay[key] = signed
                    other = state.conflicting.get(key)
                    if other is not None:
                        relay[("prevote/conflicting", view, signed.signer)] = other
        for view in (self._view - 1, self._view):
            for signed in state.votes.get((VoteKind.PRECOMMIT, view), {}).values():
                relay[("precommit", view, signed.signer)] = signed
        return list(relay.values())

    def held_rounds(self) -> int:
        """How many rounds' states are held (bounded by the windows)."""
        return len(self._rounds)

    # -- events ---------------------------------------------------------------

    def round_closed(self, round_number: int) -> list[Action]:
        """The node's clock passed the end of ``round_number``."""
        if round_number < self._round:
            return [Rejected("round_closed", round_number, "already_final")]
        if round_number >= self._round + self._future_rounds:
            return [Rejected("round_closed", round_number, "too_far_ahead")]
        self._state(round_number).closed = True
        return self._process()

    def timeout(self, step: Step, round_number: int, view: int) -> list[Action]:
        """A timeout asked for by ``ScheduleTimeout`` fired."""
        if round_number != self._round or view != self._view or not self._started:
            return []
        actions: list[Action] = []
        if step is Step.PROPOSE and self._step is Step.PROPOSE:  # line 57
            actions += self._vote(VoteKind.PREVOTE, None)
            self._step = Step.PREVOTE
        elif step is Step.PREVOTE and self._step is Step.PREVOTE:  # line 61
            actions += self._vote(VoteKind.PRECOMMIT, None)
            self._step = Step.PRECOMMIT
        elif step is Step.PRECOMMIT:  # line 65
            actions += self._start_view(view + 1)
        return actions + self._process()

    def evidence_out_of_window(self, round_number: int) -> str | None:
        """Why evidence about ``round_number`` is not kept, or None.

        The window of every other message: the last ``retained_rounds`` decided
        rounds (older: ``too_old``) to ``future_rounds`` ahead (``too_far_ahead``).
        A member can sign conflicting messages for any round it likes; proofs
        about rounds nobody is deciding prove nothing anyone needs.
        """
        if round_number >= self._round + self._future_rounds:
            return "too_far_ahead"
        if round_number < self._round - self._retained_rounds:
            return "too_old"
        return None

    def proposal_received(self, signed: SignedProposal) -> list[Action]:
        """A signed proposal from the bus."""
        rejected = self._screen("proposal", signed)
        if rejected is not None:
            return [rejected]
        r, view = signed.round, signed.view
        if r == self._round and signed.signer != self.proposer(view).public_key:
            return [Rejected("proposal", r, "not_proposer")]
        state = self._state(r)
        known = state.proposals.get((view, signed.signer))
        if known is not None:
            return self._conflict(state, known[0], signed)
        value_hash = signed.proposal.value.digest(self._crypto)
        state.proposals[(view, signed.signer)] = (signed, value_hash)
        state.values.setdefault(value_hash, signed)
        return self._note_ahead(signed) + (self._process() if r == self._round else [])

    def vote_received(self, signed: SignedVote) -> list[Action]:
        """A signed prevote or precommit from the bus (own votes echoed back are harmless)."""
        rejected = self._screen(signed.kind, signed)
        if rejected is not None:
            return [rejected]
        state = self._state(signed.round)
        tally = state.votes.setdefault((signed.vote.kind, signed.view), {})
        known = tally.get(signed.signer)
        if known is not None:
            reported = self._conflict(state, known, signed)
            if reported and signed.round == self._round:  # its prevotes now count for any value
                return reported + self._process()
            return reported
        tally[signed.signer] = signed
        return self._note_ahead(signed) + (self._process() if signed.round == self._round else [])

    def proposal_built(
        self, round_number: int, view: int, records: Sequence[bytes]
    ) -> list[Action]:
        """The records asked for by ``BuildProposal``: sign and send the proposal."""
        if (
            round_number != self._round
            or view != self._view
            or not self._started
            or self._step is not Step.PROPOSE
            or self.proposer(view).public_key != self._me
            or ("proposal", round_number, view) in self._mine
        ):
            return []
        if self._valid is not None:  # a value became valid meanwhile: it goes first
            signed_valid, _, valid_view = self._valid
            return self._propose(signed_valid.proposal.records, valid_view) + self._process()
        return self._propose(tuple(records), NO_VIEW) + self._process()

    def value_verified(
        self, round_number: int, value_hash: bytes, ok: bool, *, lasting: bool = True
    ) -> list[Action]:
        """The verdict asked for by ``VerifyProposal``.

        valid() must be a function of the value for Tendermint to be live, and
        a refusal only because something the value needs could not be had (a
        submission's bytes no peer sent in time) is not one: one member can send
        them to some members and not to others, and once those lock on the value
        the rest would refuse it for ever. Such a verdict (``lasting=False``)
        counts for the current view only; the value is judged again when it is
        proposed in a later view.
        """
        if round_number != self._round:
            return []
        state = self._state(round_number)
        state.verifying.discard(value_hash)
        state.verdicts[value_hash] = ok
        if ok or lasting:
            state.unsettled.discard(value_hash)
        else:
            state.unsettled.add(value_hash)
        return self._process()

    def certificate_received(
        self, certificate: QuorumCertificate, proposal: SignedProposal | None
    ) -> list[Action]:
        """A finalized round fetched by sync: verify it, then commit it if it is next.

        Rounds apply in order; a certificate for a later round is rejected
        (``not_next``) and must be offered again when its turn comes.
        """
        r = certificate.round
        if r < self._round:
            return [Rejected("certificate", r, "already_final")]
        if r > self._round:
            return [Rejected("certificate", r, "not_next")]
        reason = certificate.why_invalid(self._committee, self._crypto)
        if reason is not None:
            return [Rejected("certificate", r, reason)]
        if proposal is None:
            return [Rejected("certificate", r, "missing_proposal")]
        if (
            proposal.round != r
            or proposal.proposal.value.digest(self._crypto) != certificate.value_hash
        ):
            return [Rejected("certificate", r, "hash_mismatch")]
        if not proposal.verify(self._crypto) or self._committee.member(proposal.signer) is None:
            return [Rejected("certificate", r, "bad_proposal")]
        if proposal.signer != self.proposer(proposal.view).public_key:
            # The value is what the certificate certifies, but the round keeps the
            # proposal it came in as its provenance (``poc-node audit`` checks it):
            # only its view's proposer's.
            return [Rejected("certificate", r, "not_proposer")]
        actions: list[Action] = [self._commit(proposal, certificate.value_hash, certificate)]
        return actions + self._process()

    def restore(self, messages: Iterable[Signed]) -> list[Action]:
        """After a restart, reinstate what this member signed and stored before.

        The machine then never signs a different message for those
        (kind, round, view); its lock is the value of its latest precommit;
        it resumes at the latest view it signed in. Each is sent again, since
        peers may never have received it.
        """
        actions: list[Action] = []
        for signed in messages:
            if signed.signer != self._me or not signed.verify(self._crypto):
                raise ValueError("can only restore messages this validator signed")
            r, view = signed.round, signed.view
            if r < self._round:
                continue
            key = (signed.kind, r, view)
            known = self._mine.get(key)
            if known is not None and known != signed:
                raise ValueError(f"two different {signed.kind}s are stored for {r}/{view}")
            self._mine[key] = signed
            state = self._state(r)
            state.restored_view = max(state.restored_view, view)
            if isinstance(signed, SignedProposal):
                value_hash = signed.proposal.value.digest(self._crypto)
                state.proposals[(view, self._me)] = (signed, value_hash)
                state.values.setdefault(value_hash, signed)
                # No verdict: whether it held this value valid was not stored (it may
                # have refused it and prevoted nil on its own proposal), so it judges
                # the value again if it needs to. Marked valid here, a restart undid
                # a lasting refusal.
            else:
                state.votes.setdefault((signed.vote.kind, view), {})[self._me] = signed
                voted = signed.vote.value_hash
                if (
                    r == self._round
                    and signed.vote.kind is VoteKind.PRECOMMIT
                    and voted is not None
                    and (self._locked is None or view > self._locked[1])
                ):
                    self._locked = (voted, view)
            actions.append(Broadcast(signed))
        return actions + self._process()

    # -- the rules of Algorithm 1 --------------------------------------------

    def _process(self) -> list[Action]:
        """Apply every rule that holds until none does; commits may start the next round."""
        actions: list[Action] = []
        while True:
            state = self._rounds.get(self._round)
            if not self._started:
                if state is None or not state.closed:
                    return actions
                self._started = True
                actions += self._start_view(state.restored_view)
                continue
            assert state is not None
            before = (self._round, self._view, self._step, len(actions))
            actions += self._apply_rules(state)
            if (self._round, self._view, self._step, len(actions)) == before:
                return actions

    def _apply_rules(self, state: _RoundState) -> list[Action]:
        r, view = self._round, self._view
        decided = self._decision(state)  # line 49
        if decided is not None:
            decided_view, value_hash = decided
            certificate = self._certificate(state, decided_view, value_hash)
            proposal = self._proposal_of(state, value_hash, decided_view)
            if proposal is None:
                if value_hash in state.fetching:
                    return []
                state.fetching.add(value_hash)
                return [FetchValue(r, value_hash, certificate)]
            return [self._commit(proposal, value_hash, certificate)]
        skip_to = self._view_to_skip_to(state)  # line 55
        if skip_to is not None:
            return self._start_view(skip_to)
        actions: list[Action] = []
        entry = state.proposals.get((view, self.proposer(view).public_key))
        if entry is not None and self._step is Step.PROPOSE:
            signed, value_hash = entry
            valid_view = signed.proposal.valid_view
            if valid_view == NO_VIEW:  # line 22
                verdict = self._verdict(state, view, value_hash, signed, actions)
                if verdict is not None:
                    free = self._locked is None or self._locked[0] == value_hash
                    prevote = value_hash if verdict and free else None
                    actions += self._vote(VoteKind.PREVOTE, prevote)
                    self._step = Step.PREVOTE
            elif self._tally(state, VoteKind.PREVOTE, valid_view, value_hash):  # line 28
                verdict = self._verdict(state, view, value_hash, signed, actions)
                if verdict is not None:
                    free = (
                        self._locked is None
                        or self._locked[1] <= valid_view
                        or self._locked[0] == value_hash
                    )
                    prevote = value_hash if verdict and free else None
                    actions += self._vote(VoteKind.PREVOTE, prevote)
                    self._step = Step.PREVOTE
        if (
            self._step is Step.PREVOTE
            and ("prevote_timer", view) not in state.fired
            and self._tally(state, VoteKind.PREVOTE, view, _ANY)
        ):  # line 34
            state.fired.add(("prevote_timer", view))
            actions.append(self._schedule(Step.PREVOTE, view))
        if (
            entry is not None
            and self._step is not Step.PROPOSE
            and ("lock", view) not in state.fired
            and self._tally(state, VoteKind.PREVOTE, view, entry[1])
            and self._verdict(state, view, entry[1], entry[0], actions) is True
        ):  # line 36
            signed, value_hash = entry
            state.fired.add(("lock", view))
            if self._step is Step.PREVOTE:
                self._locked = (value_hash, view)
                actions += self._vote(VoteKind.PRECOMMIT, value_hash)
                self._step = Step.PRECOMMIT
            self._valid = (signed, value_hash, view)
        if self._step is Step.PREVOTE and self._tally(state, VoteKind.PREVOTE, view, None):
            actions += self._vote(VoteKind.PRECOMMIT, None)  # line 44
            self._step = Step.PRECOMMIT
        if ("precommit_timer", view) not in state.fired and self._tally(
            state, VoteKind.PRECOMMIT, view, _ANY
        ):  # line 47
            state.fired.add(("precommit_timer", view))
            actions.append(self._schedule(Step.PRECOMMIT, view))
        return actions

    def _proposal_of(
        self, state: _RoundState, value_hash: bytes, view: int
    ) -> SignedProposal | None:
        """A signed proposal of ``value_hash``: ``view``'s own when it is here.

        An equal value can come in several proposals (an empty one, re-proposals,
        one sent ahead for a later view by that view's proposer). What a lock or a
        decision in ``view`` rests on is that view's proposal: relayed, a member
        missing it can act on the lock's prevotes (line 36); committed, it names
        the view that decided.
        """
        entry = state.proposals.get((view, self.proposer(view).public_key))
        if entry is not None and entry[1] == value_hash:
            return entry[0]
        return state.values.get(value_hash)

    def _start_view(self, view: int) -> list[Action]:
        """Line 11: enter ``view`` of the current round; propose if it is ours."""
        state = self._state(self._round)
        self._view = view
        self._step = Step.PROPOSE
        for value_hash in state.unsettled:  # judged again if proposed in this view
            state.verdicts.pop(value_hash, None)
        state.unsettled.clear()
        actions: list[Action] = []
        if (VoteKind.PRECOMMIT.value, self._round, view) in self._mine:
            self._step = Step.PRECOMMIT  # restored: never sign another
        elif (VoteKind.PREVOTE.value, self._round, view) in self._mine:
            self._step = Step.PREVOTE
        if self._step is Step.PRECOMMIT:
            # Restored with all of this view signed, and the precommits seen
            # before the restart lost: do not wait for them forever. Restored
            # after a prevote only, it still owes this view its precommit,
            # which the others may need: it waits for the rules like them.
            actions.append(self._schedule(Step.PRECOMMIT, view))
        elif (
            self._step is Step.PROPOSE
            and self.proposer(view).public_key == self._me
            and ("proposal", self._round, view) not in self._mine
        ):
            if self._valid is not None:
                signed_valid, _, valid_view = self._valid
                actions += self._propose(signed_valid.proposal.records, valid_view)
            elif view not in state.built:
                state.built.add(view)
                actions.append(BuildProposal(self._round, view))
        actions.append(self._schedule(Step.PROPOSE, view))
        return actions

    def _propose(self, records: tuple[bytes, ...], valid_view: int) -> list[Action]:
        proposal = Proposal(self._round, self._view, self._me, records, valid_view)
        signed = SignedProposal(proposal, self._crypto.sign(Proposal.DOMAIN, proposal.body()))
        value_hash = proposal.value.digest(self._crypto)
        state = self._state(self._round)
        state.proposals[(self._view, self._me)] = (signed, value_hash)
        state.values.setdefault(value_hash, signed)
        # Its own value is valid to it, unless it judged that very value invalid
        # before: then it prevotes nil on its own proposal. Otherwise members that
        # had all refused a value, each proposing it in turn, would certify it.
        if state.verdicts.get(value_hash) is not False or value_hash in state.unsettled:
            state.verdicts[value_hash] = True
            state.unsettled.discard(value_hash)
        self._mine[("proposal", self._round, self._view)] = signed
        return [Broadcast(signed)]

    def _vote(self, kind: VoteKind, value_hash: bytes | None) -> list[Action]:
        key = (kind.value, self._round, self._view)
        if key in self._mine:
            return []  # signed before (restored): never a second, different one
        vote = Vote(kind, self._round, self._view, self._me, value_hash)
        signed = SignedVote(vote, self._crypto.sign(Vote.DOMAIN, vote.body()))
        self._mine[key] = signed
        self._state(self._round).votes.setdefault((kind, self._view), {})[self._me] = signed
        return [Broadcast(signed)]

    def _verdict(
        self,
        state: _RoundState,
        view: int,
        value_hash: bytes,
        signed: SignedProposal,
        actions: list[Action],
    ) -> bool | None:
        """valid(v): known, or asked for once (None while the node recomputes)."""
        verdict = state.verdicts.get(value_hash)
        if verdict is not None:
            return verdict
        if value_hash not in state.verifying:
            state.verifying.add(value_hash)
            actions.append(VerifyProposal(self._round, view, value_hash, signed.proposal.records))
        return None

    def _schedule(self, step: Step, view: int) -> ScheduleTimeout:
        return ScheduleTimeout(step, self._round, view, self._timeouts.of(step, view))

    def _tally(self, state: _RoundState, kind: VoteKind, view: int, value: object) -> bool:
        """Whether votes of ``kind`` in ``view`` for ``value`` hold 2/3 of the stake.

        Only the first vote of each signer is kept, so a member proven to
        have signed two different prevotes in ``view`` counts for every value
        there (Algorithm 1 counts each of its prevotes, and it could have
        signed any). Otherwise a prevote quorum seen by one member, through
        the equivocator's other prevote, could never be seen by the members
        that kept the first one, and a lock on its value would never be
        released (line 28). A certificate needs signatures: precommits count
        only for the value they name.
        """
        stake = 0
        for voter, signed in state.votes.get((kind, view), {}).items():
            if (
                value is _ANY
                or signed.vote.value_hash == value
                or (kind is VoteKind.PREVOTE and (kind.value, view, voter) in state.reported)
            ):
                member = self._committee.member(voter)
                stake += 0 if member is None else member.stake
        return self._committee.has_quorum(stake)

    def _decision(self, state: _RoundState) -> tuple[int, bytes] | None:
        for (kind, view), tally in sorted(state.votes.items(), key=lambda kv: kv[0][1]):
            if kind is not VoteKind.PRECOMMIT:
                continue
            hashes = {signed.vote.value_hash for signed in tally.values()}
            for value_hash in sorted(h for h in hashes if h is not None):
                if self._tally(state, VoteKind.PRECOMMIT, view, value_hash):
                    return view, value_hash
        return None

    def _certificate(self, state: _RoundState, view: int, value_hash: bytes) -> QuorumCertificate:
        votes = state.votes[(VoteKind.PRECOMMIT, view)]
        return QuorumCertificate(
            self._round,
            view,
            value_hash,
            tuple(
                (voter, signed.signature)
                for voter, signed in votes.items()
                if signed.vote.value_hash == value_hash
            ),
        )

    def _view_to_skip_to(self, state: _RoundState) -> int | None:
        """Line 55: members with more than 1/3 of the stake are in a later view."""
        signers: dict[int, set[bytes]] = {}
        for view, signer in state.proposals:
            if view > self._view:
                signers.setdefault(view, set()).add(signer)
        for (_, view), tally in state.votes.items():
            if view > self._view:
                signers.setdefault(view, set()).update(tally)
        best = None
        for view, keys in signers.items():
            stake = sum(m.stake for k in keys if (m := self._committee.member(k)) is not None)
            if stake * 3 > self._committee.total_stake and (best is None or view > best):
                best = view
        return best

    # -- bookkeeping ----------------------------------------------------------

    def _state(self, round_number: int) -> _RoundState:
        state = self._rounds.get(round_number)
        if state is None:
            state = self._rounds[round_number] = _RoundState()
        return state

    def _screen(self, kind: str, signed: Signed) -> Rejected | None:
        """Bound what the network can make us hold, before any other work."""
        r, view = signed.round, signed.view
        if self._committee.member(signed.signer) is None:
            return Rejected(kind, r, "not_member")
        if r >= self._round + self._future_rounds:
            return Rejected(kind, r, "too_far_ahead")
        if r < self._round:
            old = self._rounds.get(r)
            if old is None or old.decided_view is None:
                return Rejected(kind, r, "too_old")
            if view > old.decided_view + self._view_window:
                return Rejected(kind, r, "view_too_far_ahead")
        else:
            base = self._view if r == self._round else 0
            if view > base + self._view_window:
                return Rejected(kind, r, "view_too_far_ahead")
        if not signed.verify(self._crypto):
            return Rejected(kind, r, "bad_signature")
        return None

    def _conflict(
        self,
        state: _RoundState,
        known: SignedProposal | SignedVote,
        received: SignedProposal | SignedVote,
    ) -> list[Action]:
        """A second message from one signer for one (kind, round, view): a copy, or equivocation."""
        if known.body() == received.body():
            return []
        key = (received.kind, received.view, received.signer)
        if key in state.reported:
            return []
        state.reported.add(key)
        if received.kind == VoteKind.PREVOTE.value:  # relayed with the first (relay_messages)
            state.conflicting[key] = received
        return [Equivocation(Evidence(known, received))]

    def _note_ahead(self, signed: Signed) -> list[Action]:
        """Members with more than 1/3 of the stake at later rounds: this member lags."""
        if signed.round <= self._round:
            return []
        self._ahead[signed.signer] = max(self._ahead.get(signed.signer, 0), signed.round)
        stake = sum(
            m.stake
            for key, r in self._ahead.items()
            if r > self._round and (m := self._committee.member(key)) is not None
        )
        if stake * 3 > self._committee.total_stake and self._caught_up_from < self._round:
            self._caught_up_from = self._round
            return [CatchUp(self._round)]
        return []

    def _commit(
        self, proposal: SignedProposal, value_hash: bytes, certificate: QuorumCertificate
    ) -> Commit:
        """Finalize the current round, move the beacon on, and drop what it no longer needs."""
        r = self._round
        state = self._state(r)
        state.decided_view = certificate.view
        state.verdicts.clear()
        state.unsettled.clear()
        state.verifying.clear()
        beacon_after = next_beacon(self._beacon, value_hash)
        self._round = r + 1
        self._beacon = beacon_after
        self._started = False
        self._view = 0
        self._step = Step.PROPOSE
        self._locked = None
        self._valid = None
        oldest = self._round - self._retained_rounds
        for old in [n for n in self._rounds if n < oldest]:
            del self._rounds[old]
        for key in [k for k in self._mine if k[1] < self._round]:
            del self._mine[key]
        for signer in [k for k, ahead in self._ahead.items() if ahead <= self._round]:
            del self._ahead[signer]
        upcoming = self._rounds.get(self._round)
        if upcoming is not None:  # proposals kept for this round before its beacon was known
            for view, signer in list(upcoming.proposals):
                if signer != self.proposer(view).public_key:
                    del upcoming.proposals[(view, signer)]
            # The values too: one member's proposal of a value (an empty one is easy to
            # guess) sent ahead would otherwise be the signed proposal this round
            # commits, stores and relays, for a view it did not propose.
            upcoming.values = {}
            for kept, kept_hash in upcoming.proposals.values():
                upcoming.values.setdefault(kept_hash, kept)
        return Commit(r, proposal.proposal.value, value_hash, certificate, proposal, beacon_after)
