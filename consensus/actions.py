"""What the round machine asks the node to do; the node performs them in order."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from consensus.messages import Evidence, QuorumCertificate, SignedProposal, SignedVote, Value


class Step(StrEnum):
    """Where a member is within a view; a timeout names the step it ends."""

    PROPOSE = "propose"
    PREVOTE = "prevote"
    PRECOMMIT = "precommit"


@dataclass(frozen=True)
class Broadcast:
    """Store ``message`` durably, then publish it to the committee.

    The machine signs at most one proposal, prevote and precommit per
    (round, view); storing before sending lets a restarted node ``restore``
    them instead of signing different ones.
    """

    message: SignedProposal | SignedVote


@dataclass(frozen=True)
class BuildProposal:
    """This member proposes in (round, view) and holds no valid value: compute its records.

    Answer with ``proposal_built(round, view, records)`` (records of round
    ``round`` scored against the history after round ``round - 1``).
    """

    round: int
    view: int


@dataclass(frozen=True)
class VerifyProposal:
    """Recompute the records of the view proposer's value; answer ``value_verified``.

    Asked at most once per value of a round (once more in a later view after a
    verdict that was not a judgement of the value, ``value_verified(...,
    lasting=False)``), only for the proposal of the current view's proposer,
    after its signature was checked.
    """

    round: int
    view: int
    value_hash: bytes
    records: tuple[bytes, ...]


@dataclass(frozen=True)
class ScheduleTimeout:
    """Call ``timeout(step, round, view)`` after ``delay_ms`` of the node's clock."""

    step: Step
    round: int
    view: int
    delay_ms: int


@dataclass(frozen=True)
class Commit:
    """Round ``round`` is final with ``value``: commit the certified records.

    ``beacon_after`` is the beacon of round ``round + 1``. Commit the certified
    records, never a local recomputation (DESIGN.md §7). A store that cannot
    commit must stop the process: the machine has already moved on.
    """

    round: int
    value: Value
    value_hash: bytes
    certificate: QuorumCertificate
    proposal: SignedProposal | None
    beacon_after: bytes


@dataclass(frozen=True)
class FetchValue:
    """Precommits of a quorum name a value whose records this member never received.

    Fetch the round (``sync/``) and pass it to ``certificate_received``.
    """

    round: int
    value_hash: bytes
    certificate: QuorumCertificate


@dataclass(frozen=True)
class CatchUp:
    """Members holding more than 1/3 of the stake are at rounds ahead: fetch finalized rounds."""

    from_round: int


@dataclass(frozen=True)
class Equivocation:
    """A member signed two conflicting messages for one (round, view): record and publish."""

    evidence: Evidence


@dataclass(frozen=True)
class Rejected:
    """An input was dropped; ``reason`` is a stable code for logs and metrics."""

    message: str
    round: int
    reason: str


Action = (
    Broadcast
    | BuildProposal
    | VerifyProposal
    | ScheduleTimeout
    | Commit
    | FetchValue
    | CatchUp
    | Equivocation
    | Rejected
)
