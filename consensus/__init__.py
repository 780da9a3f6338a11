"""Consensus: committee, beacon, votes, certificates, evidence and the round state machine.

Pure state machines: methods take events and return actions; the node does
the I/O, owns the clock and supplies the cryptography (``Crypto``).
"""

from consensus.actions import Action, Broadcast, Commit, Equivocation, FetchProposal, Rejected
from consensus.beacon import SKIP_HASH, genesis_beacon, leader_of, next_beacon
from consensus.committee import Committee, Member
from consensus.crypto import Crypto
from consensus.messages import (
    Evidence,
    MalformedMessage,
    Proposal,
    QuorumCertificate,
    SignedProposal,
    SignedVote,
    Vote,
)
from consensus.round import RoundMachine

__all__ = [
    "SKIP_HASH",
    "Action",
    "Broadcast",
    "Commit",
    "Committee",
    "Crypto",
    "Equivocation",
    "Evidence",
    "FetchProposal",
    "MalformedMessage",
    "Member",
    "Proposal",
    "QuorumCertificate",
    "Rejected",
    "RoundMachine",
    "SignedProposal",
    "SignedVote",
    "Vote",
    "genesis_beacon",
    "leader_of",
    "next_beacon",
]
