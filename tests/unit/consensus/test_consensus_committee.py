"""Committee arithmetic, beacon chain and leader election."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import pytest
from consensus_fakes import make_committee

from consensus import Committee, Member, genesis_beacon, leader_of, next_beacon, proposer_of
from consensus.beacon import SKIP_HASH


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_round_boundaries() -> None:
    c = Committee(1_000, 10, 6, (Member("a", key(1), 1),))
    assert c.round_at(999) == -1
    assert c.round_at(1_000) == 0
    assert c.round_at(10_999) == 0
    assert c.round_at(11_000) == 1
    assert c.round_start_ms(3) == 31_000 and c.round_end_ms(3) == 41_000
    assert c.round_at(c.round_end_ms(3) - 1) == 3 and c.round_at(c.round_end_ms(3)) == 4
    assert [c.epoch_of(r) for r in (0, 5, 6, 11, 12)] == [0, 0, 1, 1, 2]
    assert c.epoch_start(2) == 12
    with pytest.raises(ValueError):
        c.round_start_ms(-1)


def test_quorum_is_two_thirds_of_stake() -> None:
    c = Committee(0, 10, 6, tuple(Member(str(i), key(i), 1) for i in range(4)))
    assert c.total_stake == 4
    assert not c.has_quorum(2) and c.has_quorum(3)
    c3 = Committee(0, 10, 6, tuple(Member(str(i), key(i), 1) for i in range(3)))
    assert c3.has_quorum(2) and not c3.has_quorum(1)


def test_committee_validation_and_canonical_order() -> None:
    a, b = Member("a", key(2), 5), Member("b", key(1), 7)
    c1, c2 = Committee(0, 10, 6, (a, b)), Committee(0, 10, 6, (b, a))
    assert c1 == c2 and c1.digest() == c2.digest()
    assert c1.members[0] is b and c1.member(key(2)) is a and c1.member(key(3)) is None
    assert Committee(0, 10, 6, (a, Member("b", key(1), 8))).digest() != c1.digest()
    assert Committee(1, 10, 6, (a, b)).digest() != c1.digest()
    assert Committee(0, 10, 6, (a, Member("bb", key(1), 7))).digest() != c1.digest()
    with pytest.raises(ValueError):
        Committee(0, 10, 6, (a, Member("dup", key(2), 1)))
    with pytest.raises(ValueError):
        Committee(0, 10, 6, ())
    with pytest.raises(ValueError):
        Member("x", b"short", 1)
    with pytest.raises(ValueError):
        Member("x", key(1), 0)


def test_beacon_chain_is_deterministic() -> None:
    c, _ = make_committee([1, 2, 3])
    g = genesis_beacon(c.digest())
    assert g == hashlib.sha256(b"beacon" + b"genesis" + c.digest()).digest()
    h = bytes(range(32))
    b1 = next_beacon(g, h)
    assert b1 == hashlib.sha256(b"beacon" + g + h).digest()
    assert next_beacon(g, SKIP_HASH) == hashlib.sha256(b"beacon" + g + bytes(32)).digest()
    assert next_beacon(g, SKIP_HASH) != b1
    with pytest.raises(ValueError):
        next_beacon(g, b"")


def test_leader_walks_members_by_public_key() -> None:
    c = Committee(0, 10, 6, (Member("a", key(1), 2), Member("b", key(2), 3)))
    assert leader_of((0).to_bytes(32, "big"), c).name == "a"
    assert leader_of((1).to_bytes(32, "big"), c).name == "a"
    assert leader_of((2).to_bytes(32, "big"), c).name == "b"
    assert leader_of((4).to_bytes(32, "big"), c).name == "b"
    assert leader_of((5).to_bytes(32, "big"), c).name == "a"


def test_leaders_are_drawn_in_proportion_to_stake() -> None:
    stakes = [1, 2, 3, 10]
    c = Committee(0, 10, 6, tuple(Member(str(i), key(i + 1), s) for i, s in enumerate(stakes)))
    rng = random.Random(1234)
    draws = 40_000
    counts = Counter(leader_of(rng.randbytes(32), c).name for _ in range(draws))
    for i, s in enumerate(stakes):
        expected = draws * s / 16
        sigma = (draws * s / 16 * (1 - s / 16)) ** 0.5
        assert abs(counts[str(i)] - expected) < 5 * sigma


def test_proposer_of_a_view_is_drawn_from_the_beacon_and_the_view() -> None:
    c = Committee(
        0, 10, 6, tuple(Member(str(i), key(i + 1), s) for i, s in enumerate([1, 2, 3, 10]))
    )
    beacon = hashlib.sha256(b"some beacon").digest()
    assert proposer_of(beacon, 0, c) == proposer_of(beacon, 0, c)
    expected = leader_of(hashlib.sha256(beacon + (5).to_bytes(8, "big")).digest(), c)
    assert proposer_of(beacon, 5, c) == expected
    assert len({proposer_of(beacon, view, c).name for view in range(40)}) > 1
    other = hashlib.sha256(b"another beacon").digest()
    assert [proposer_of(beacon, v, c) for v in range(20)] != [
        proposer_of(other, v, c) for v in range(20)
    ]
    with pytest.raises(ValueError):
        proposer_of(beacon, -1, c)
    with pytest.raises(ValueError):
        proposer_of(b"short", 0, c)
    rng = random.Random(99)
    draws = 20_000
    counts = Counter(proposer_of(rng.randbytes(32), rng.randrange(4), c).name for _ in range(draws))
    for i, s in enumerate([1, 2, 3, 10]):
        expected_count = draws * s / 16
        sigma = (draws * s / 16 * (1 - s / 16)) ** 0.5
        assert abs(counts[str(i)] - expected_count) < 5 * sigma
