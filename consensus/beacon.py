"""The randomness beacon and stake-weighted leader election (DESIGN.md §7).

Each beacon hashes the previous one with the hash of what the previous round
finalized, so nobody can predict a leader before the round before it is
final, and every validator that finalized the same rounds draws the same one.
"""

from __future__ import annotations

import hashlib

from consensus.committee import Committee, Member

BEACON_SIZE = 32
SKIP_HASH = bytes(32)
"""The proposal hash a skipped round contributes to the beacon chain."""


def genesis_beacon(committee_digest: bytes) -> bytes:
    """The beacon of round 0: ``sha256(b"beacon" ‖ b"genesis" ‖ committee digest)``."""
    _check(committee_digest, "committee digest")
    return hashlib.sha256(b"beacon" + b"genesis" + committee_digest).digest()


def next_beacon(previous: bytes, previous_proposal_hash: bytes) -> bytes:
    """``sha256(b"beacon" ‖ beacon(r-1) ‖ proposal_hash(r-1))``; a skip uses ``SKIP_HASH``."""
    _check(previous, "beacon")
    _check(previous_proposal_hash, "proposal hash")
    return hashlib.sha256(b"beacon" + previous + previous_proposal_hash).digest()


def leader_of(beacon: bytes, committee: Committee) -> Member:
    """The member drawn by stake: ``int(beacon) % total_stake`` over members by public key.

    The modulo bias is below total_stake / 2**256, negligible for any stake.
    """
    _check(beacon, "beacon")
    ticket = int.from_bytes(beacon, "big") % committee.total_stake
    for member in committee.members:
        if ticket < member.stake:
            return member
        ticket -= member.stake
    raise AssertionError("ticket beyond total stake")


def _check(value: bytes, what: str) -> None:
    if len(value) != BEACON_SIZE:
        raise ValueError(f"{what} must be {BEACON_SIZE} bytes, got {len(value)}")
