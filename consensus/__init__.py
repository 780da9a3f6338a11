"""Consensus: committee, beacon, views and votes, certificates, evidence, the round machine.

Pure state machines: methods take events and return actions; the node does
the I/O, owns the clock and supplies the cryptography (``Crypto``).
"""

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
from consensus.beacon import SKIP_HASH, genesis_beacon, leader_of, next_beacon, proposer_of
from consensus.committee import Committee, Member
from consensus.crypto import Crypto
from consensus.messages import (
    NO_VIEW,
    Evidence,
    MalformedMessage,
    Proposal,
    QuorumCertificate,
    Signed,
    SignedProposal,
    SignedVote,
    Value,
    Vote,
    VoteKind,
)
from consensus.round import RoundMachine, Timeouts

__all__ = [
    "NO_VIEW",
    "SKIP_HASH",
    "Action",
    "Broadcast",
    "BuildProposal",
    "CatchUp",
    "Commit",
    "Committee",
    "Crypto",
    "Equivocation",
    "Evidence",
    "FetchValue",
    "MalformedMessage",
    "Member",
    "Proposal",
    "QuorumCertificate",
    "Rejected",
    "RoundMachine",
    "ScheduleTimeout",
    "Signed",
    "SignedProposal",
    "SignedVote",
    "Step",
    "Timeouts",
    "Value",
    "VerifyProposal",
    "Vote",
    "VoteKind",
    "genesis_beacon",
    "leader_of",
    "next_beacon",
    "proposer_of",
]
