"""What the round machine asks the node to do; the node performs them in order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from consensus.messages import Evidence, Proposal, QuorumCertificate


@dataclass(frozen=True)
class Broadcast:
    """Publish a signed proposal or vote to the committee.

    A vote must be stored durably before it is published, so that a restarted
    node can ``restore_vote`` it instead of signing a different one.
    """

    domain: str
    body: Mapping[str, object]
    signature: bytes


@dataclass(frozen=True)
class Commit:
    """Round ``round`` is final: apply ``proposal`` (None: an empty, skipped round).

    ``beacon_after`` is the beacon of round ``round + 1``. Commit the certified
    records, never a local recomputation (DESIGN.md §7).
    """

    round: int
    proposal: Proposal | None
    certificate: QuorumCertificate
    beacon_after: bytes


@dataclass(frozen=True)
class Equivocation:
    """A member signed two conflicting messages for one round: publish and record."""

    evidence: Evidence


@dataclass(frozen=True)
class FetchProposal:
    """A proposal was certified that this validator never received.

    Fetch it (``sync/``) and pass it to ``proposal_received``, or pass the
    proposal with this certificate to ``certificate_received``.
    """

    round: int
    proposal_hash: bytes
    certificate: QuorumCertificate


@dataclass(frozen=True)
class Rejected:
    """An input was dropped; ``reason`` is a stable code for logs and metrics."""

    message: str
    round: int
    reason: str


Action = Broadcast | Commit | Equivocation | FetchProposal | Rejected
