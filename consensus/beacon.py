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
"""What a round that no member ran contributes to the beacon chain.

Only a committee of one has such rounds (the node was down: nobody could
have decided them); every decided round contributes its value hash.
"""


def genesis_beacon(committee_digest: bytes) -> bytes:
    """The beacon of round 0: ``sha256(b"beacon" ‖ b"genesis" ‖ committee digest)``."""
    _check(committee_digest, "committee digest")
    return hashlib.sha256(b"beacon" + b"genesis" + committee_digest).digest()


def next_beacon(previous: bytes, previous_value_hash: bytes) -> bytes:
    """``sha256(b"beacon" ‖ beacon(r-1) ‖ value_hash(r-1))``; a round not run uses ``SKIP_HASH``."""
    _check(previous, "beacon")
    _check(previous_value_hash, "value hash")
    return hashlib.sha256(b"beacon" + previous + previous_value_hash).digest()


def proposer_of(beacon: bytes, view: int, committee: Committee) -> Member:
    """The proposer of view ``view`` of the round whose beacon is ``beacon``.

    Drawn by stake from ``sha256(beacon ‖ view as u64 big-endian)``, so each
    view of a round has its own, unpredictable before the round's beacon.
    """
    _check(beacon, "beacon")
    if not 0 <= view < 2**64:
        raise ValueError(f"view must be a uint64, got {view}")
    return leader_of(hashlib.sha256(beacon + view.to_bytes(8, "big")).digest(), committee)


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
