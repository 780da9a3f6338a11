"""The committee: who validates, with what stake, and how time is cut into rounds.

The committee is configuration shared by every validator (DESIGN.md §7); its
``digest`` seeds the beacon chain, so two validators with different committee
files disagree from the first round instead of silently later.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

PUBLIC_KEY_SIZE = 32
UINT64_MAX = 2**64 - 1
DIGEST_DOMAIN = b"poc/v1/committee"


@dataclass(frozen=True)
class Member:
    """One validator: its Ed25519 public key and its stake (> 0)."""

    name: str
    public_key: bytes
    stake: int

    def __post_init__(self) -> None:
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"member {self.name!r}: public key must be {PUBLIC_KEY_SIZE} bytes")
        if not 0 < self.stake <= UINT64_MAX:
            raise ValueError(f"member {self.name!r}: stake must be in 1..2**64-1")


@dataclass(frozen=True)
class Committee:
    """The validators and the clock of rounds and epochs.

    Round r covers ``[round_start_ms(r), round_end_ms(r))``; round 0 starts at
    ``genesis_ms``. Epoch e is rounds ``e * epoch_rounds .. (e + 1) * epoch_rounds - 1``.
    ``members`` is kept sorted by public key (the order used by the digest and
    by leader election), so the order of a configuration file does not matter.
    """

    genesis_ms: int
    round_seconds: int
    epoch_rounds: int
    members: tuple[Member, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.genesis_ms <= UINT64_MAX:
            raise ValueError("genesis_ms must be a uint64")
        if not 0 < self.round_seconds <= UINT64_MAX // 1000:
            raise ValueError("round_seconds must be positive")
        if not 0 < self.epoch_rounds <= UINT64_MAX:
            raise ValueError("epoch_rounds must be positive")
        if not self.members:
            raise ValueError("a committee needs at least one member")
        ordered = tuple(sorted(self.members, key=lambda m: m.public_key))
        keys = [m.public_key for m in ordered]
        if len(set(keys)) != len(keys):
            raise ValueError("two members share a public key")
        object.__setattr__(self, "members", ordered)

    @property
    def total_stake(self) -> int:
        """Sum of all members' stakes."""
        return sum(m.stake for m in self.members)

    @property
    def round_ms(self) -> int:
        """Length of a round in milliseconds."""
        return self.round_seconds * 1000

    def member(self, public_key: bytes) -> Member | None:
        """The member with this public key, or None for a stranger."""
        for candidate in self.members:
            if candidate.public_key == public_key:
                return candidate
        return None

    def has_quorum(self, stake: int) -> bool:
        """Whether ``stake`` is at least 2/3 of the total (integers, no rounding).

        Two sets that each hold 2/3 share at least 1/3 of the stake, so with
        less than 1/3 faulty they share an honest member, who votes once.
        """
        return stake * 3 >= self.total_stake * 2

    def round_at(self, now_ms: int) -> int:
        """The round in progress at ``now_ms``; -1 before genesis (no round yet).

        A boundary instant belongs to the round it starts.
        """
        if now_ms < self.genesis_ms:
            return -1
        return (now_ms - self.genesis_ms) // self.round_ms

    def round_start_ms(self, round_number: int) -> int:
        """When round ``round_number`` (>= 0) starts."""
        _check_round(round_number)
        return self.genesis_ms + round_number * self.round_ms

    def round_end_ms(self, round_number: int) -> int:
        """When round ``round_number`` closes: the start of the next one (exclusive)."""
        return self.round_start_ms(round_number + 1)

    def epoch_of(self, round_number: int) -> int:
        """The epoch that round ``round_number`` belongs to."""
        _check_round(round_number)
        return round_number // self.epoch_rounds

    def epoch_start(self, epoch: int) -> int:
        """The first round of ``epoch`` (its beacon seeds the masks, DESIGN.md §4)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return epoch * self.epoch_rounds

    def digest(self) -> bytes:
        """SHA-256 of the committee's canonical byte encoding.

        Encoding: ``b"poc/v1/committee"``, then ``genesis_ms``,
        ``round_seconds``, ``epoch_rounds`` and the member count as unsigned
        64-bit big-endian integers, then for each member sorted by public key:
        the 32-byte public key, the stake (u64 big-endian), the UTF-8 name's
        length (u64 big-endian) and the name. Every field is fixed-size or
        length-prefixed, so two different committees never encode alike.
        """
        parts = [
            DIGEST_DOMAIN,
            _u64(self.genesis_ms),
            _u64(self.round_seconds),
            _u64(self.epoch_rounds),
            _u64(len(self.members)),
        ]
        for m in self.members:
            name = m.name.encode("utf-8")
            parts += [m.public_key, _u64(m.stake), _u64(len(name)), name]
        return hashlib.sha256(b"".join(parts)).digest()


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _check_round(round_number: int) -> None:
    if round_number < 0:
        raise ValueError(f"round must be >= 0, got {round_number}")
