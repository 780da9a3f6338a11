"""Quorum arithmetic, and safety and liveness of the round machine over simulated networks.

Each schedule follows from one seed (``run_schedule``): which members are
faulty and how, the network's delays, losses, duplicates, reordering and
partition until it heals, the members' clock offsets, and maybe an honest
member's crash and restart. A failing example prints its seed;
``run_schedule(seed, stakes)`` replays it exactly (``Simulation.describe``
and the nodes' ``sent`` and ``commits`` show what happened).

Safety and liveness are asserted on every schedule, with the gossip of
Tendermint's model (``Network.relay``) and without it. Without it a lost
message is gone unless a member resends it, and honest members resend
``relay_messages()``: resending only ``current_messages()`` left members
locked on a value whose prevote quorum the others had lost for good (the
``@example`` seeds below stalled so).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from fractions import Fraction

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consensus import Committee, Member, QuorumCertificate, Timeouts, Vote, VoteKind
from tests.unit.consensus.consensus_fakes import (
    FAULTY_BEHAVIOURS_DRAWN,
    Behaviour,
    FastCrypto,
    Network,
    Simulation,
)

ROUNDS = 3
ROUND_SECONDS = 1
MAX_CLOCK_OFFSET_MS = 3_000
MAX_HEAL_MS = 8_000
TIMEOUTS = Timeouts(propose_ms=600, prevote_ms=300, precommit_ms=300, delta_ms=150, max_ms=5_000)
LIVENESS_MS = 30_000
"""Once the network has healed and every member's clock has closed the last round,
every honest member has committed every round within this much virtual time."""
MAX_VIEWS = 16
"""... and no member decided a round in a later view than this."""

seeds = st.integers(min_value=0, max_value=2**32 - 1)


def schedule_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def run_schedule(
    seed: int,
    stakes: Sequence[int],
    *,
    rounds: int = ROUNDS,
    faulty: bool = True,
    relay: bool = True,
    withholder: bool = False,
) -> Simulation:
    """Draw a schedule from ``seed`` and run it until every honest member finishes or the bound.

    Faulty members (random behaviours, less than 1/3 of the stake), the
    network (loss, duplicates, reordering, a partition, all until a heal
    time), the clock offsets and maybe one honest member's crash and restart
    all come from ``seed``. With ``withholder`` the first faulty member drawn
    withholds its proposals' data (``Behaviour.WITHHOLDER``).
    """
    rng = random.Random(seed)
    n, total = len(stakes), sum(stakes)
    behaviours: dict[int, Behaviour] = {}
    if faulty:
        members = list(range(n))
        rng.shuffle(members)
        faulty_stake = 0
        for i in members[: rng.randint(0, n)]:
            if (faulty_stake + stakes[i]) * 3 < total:
                faulty_stake += stakes[i]
                behaviours[i] = rng.choice(FAULTY_BEHAVIOURS_DRAWN)
                if withholder and len(behaviours) == 1:
                    behaviours[i] = Behaviour.WITHHOLDER
    heal_ms = rng.choice([0, rng.randint(0, MAX_HEAL_MS)])
    network = Network(
        chaos_latency_ms=rng.choice([100, 400, 1500]),
        drop=rng.choice([0.0, rng.random() * 0.6]),
        duplicate=rng.random() * 0.2,
        reorder=rng.random() * 0.3,
        heal_ms=heal_ms,
        partitioned=frozenset(i for i in range(n) if rng.random() < 0.25),
        relay=relay,
    )
    offsets = [rng.randint(0, MAX_CLOCK_OFFSET_MS) for _ in range(n)]
    crashes = {}
    honest = [i for i in range(n) if i not in behaviours]
    if rng.random() < 0.3:
        crash_ms = rng.randint(0, max(heal_ms, rounds * ROUND_SECONDS * 1000))
        crashes[rng.choice(honest)] = (crash_ms, crash_ms + rng.randint(50, 3_000))
    sim = Simulation(
        stakes,
        seed=seed,
        rounds=rounds,
        network=network,
        behaviours=behaviours,
        timeouts=TIMEOUTS,
        round_seconds=ROUND_SECONDS,
        clock_offsets_ms=offsets,
        crypto=FastCrypto,
        crashes=crashes,
    )
    sim.run(liveness_deadline(sim))
    return sim


def liveness_deadline(sim: Simulation) -> int:
    """Virtual time by which every honest member must have finished."""
    last_close = sim.rounds * sim.round_ms + max(n.clock_offset_ms for n in sim.nodes)
    restarted = max(sim.network.heal_ms, last_close) + 3_000  # the longest crash
    return restarted + LIVENESS_MS


def replay(seed: int, stakes: Sequence[int], **kwargs: object) -> str:
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"replay with run_schedule({seed}, {list(stakes)}{args})"


def check_safe(sim: Simulation, how: str) -> None:
    violations = sim.safety_violations()
    assert not violations, f"{how}: {violations}\n{sim.describe()}"
    for node in sim.honest:
        for commit in node.commits:  # validity: no replayed records
            rounds = {sim.first_committed[r] for r in commit.value.records}
            assert rounds <= {commit.round}, f"{how}: replayed records committed"
        if node.restarts == 0:  # asked again only after 'no, for this view'
            asked = [(v.round, v.value_hash) for v in node.verify_requests]
            again = {(v.round, v.value_hash) for v in node.refused_for_view}
            repeated = {a for a in asked if asked.count(a) > 1}
            assert repeated <= again, f"{how}: a value verified twice"
        assert node.machine is not None and node.machine.held_rounds() <= 13, how
        for evidence in node.evidence:  # only faulty members are ever accused
            offender = sim.node_of(evidence.offender)
            assert not offender.honest, (
                f"{how}: honest v{offender.member} accused\n{sim.describe()}"
            )
            assert evidence.verify(sim.committee, node.crypto), how


def check_live(sim: Simulation, how: str) -> None:
    assert sim.done(), f"{how}: not every honest member finished\n{sim.describe()}"
    views = [
        c.certificate.view
        for node in sim.honest
        for c in node.commits
        if c.round not in node.synced
    ]
    assert max(views, default=0) <= MAX_VIEWS, (
        f"{how}: decided only in view {max(views)}\n{sim.describe()}"
    )


# -- quorum arithmetic ---------------------------------------------------------------


def key(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


stakes_st = st.lists(st.integers(1, 100), min_size=1, max_size=7)
arithmetic = settings(max_examples=300, derandomize=True, database=None)


class _KeyedCrypto(FastCrypto):
    """Signs as ``public_key`` (FastCrypto signatures are a hash of key and message)."""

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key


def committee_of(stakes: Sequence[int]) -> Committee:
    return Committee(0, 10, 6, tuple(Member(str(i), key(i), s) for i, s in enumerate(stakes)))


@arithmetic
@given(stakes_st, st.integers(0, 10**6))
def test_quorum_is_exactly_two_thirds(stakes: list[int], stake: int) -> None:
    c = committee_of(stakes)
    assert c.has_quorum(stake) == (Fraction(stake, c.total_stake) >= Fraction(2, 3))


@arithmetic
@given(stakes_st, st.data())
def test_two_quorums_share_more_than_a_third_of_the_stake(
    stakes: list[int], data: st.DataObject
) -> None:
    c = committee_of(stakes)
    indices = range(len(stakes))
    first = data.draw(st.sets(st.sampled_from(indices)))
    second = data.draw(st.sets(st.sampled_from(indices)))
    stake = {i: m.stake for i, m in enumerate(c.members)}
    if c.has_quorum(sum(stake[i] for i in first)) and c.has_quorum(sum(stake[i] for i in second)):
        shared = sum(stake[i] for i in first & second)
        assert 3 * shared >= c.total_stake  # at least 1/3: with less faulty, an honest one
        faulty = data.draw(st.sets(st.sampled_from(indices)))
        if 3 * sum(stake[i] for i in faulty) < c.total_stake:
            assert (first & second) - faulty


@arithmetic
@given(stakes_st, st.data())
def test_no_two_certificates_for_different_values(stakes: list[int], data: st.DataObject) -> None:
    """Faulty members (< 1/3 stake) sign every value; honest ones sign one each."""
    c = committee_of(stakes)
    members = list(c.members)
    faulty = data.draw(st.sets(st.sampled_from(range(len(members)))))
    if sum(members[i].stake for i in faulty) * 3 >= c.total_stake:
        faulty = set()
    values = [bytes(32), bytes([1] * 32), bytes([2] * 32)]
    choice = {
        i: data.draw(st.sampled_from([None, *values]))
        for i in range(len(members))
        if i not in faulty
    }
    view = data.draw(st.integers(0, 3))
    certified = []
    for value in values:
        votes = []
        for i, m in enumerate(members):
            if i in faulty or choice[i] == value:
                signer = _KeyedCrypto(m.public_key)
                v = Vote(VoteKind.PRECOMMIT, 5, view, m.public_key, value)
                votes.append((m.public_key, signer.sign(Vote.DOMAIN, v.body())))
        if QuorumCertificate(5, view, value, tuple(votes)).verify(c, _KeyedCrypto(b"")):
            certified.append(value)
    assert len(certified) <= 1


# -- the machine over simulated networks ------------------------------------------------


FOUR = (1, 1, 1, 1)
SEVEN_UNEQUAL = (1, 2, 3, 4, 5, 6, 7)
SEVEN = (1, 1, 1, 1, 1, 1, 1)


@schedule_settings(1000)
@given(seeds)
def test_four_equal_members_are_safe_and_live(seed: int) -> None:
    sim = run_schedule(seed, FOUR)
    check_safe(sim, replay(seed, FOUR))
    check_live(sim, replay(seed, FOUR))


@schedule_settings(300)
@given(seeds)
def test_seven_unequal_members_are_safe_and_live(seed: int) -> None:
    sim = run_schedule(seed, SEVEN_UNEQUAL)
    check_safe(sim, replay(seed, SEVEN_UNEQUAL))
    check_live(sim, replay(seed, SEVEN_UNEQUAL))


@schedule_settings(200)
@given(seeds)
def test_seven_equal_members_are_safe_and_live(seed: int) -> None:
    sim = run_schedule(seed, SEVEN)
    check_safe(sim, replay(seed, SEVEN))
    check_live(sim, replay(seed, SEVEN))


@schedule_settings(400)
@given(seeds, st.sampled_from([FOUR, SEVEN_UNEQUAL]))
@example(841, FOUR)  # locked on a prevote quorum another never received
@example(805, FOUR)
@example(1259, FOUR)
@example(802, SEVEN_UNEQUAL)
@example(1013, SEVEN_UNEQUAL)
@example(1786, SEVEN_UNEQUAL)  # locked on a quorum counting an equivocator's two prevotes
@example(1478, SEVEN_UNEQUAL)
@example(9240, FOUR)  # a restarted member one view ahead of one that needs its prevote
def test_safe_and_live_when_lost_messages_are_never_relayed(
    seed: int, stakes: tuple[int, ...]
) -> None:
    """Without gossip a lost message stays lost until a member resends ``relay_messages()``."""
    sim = run_schedule(seed, stakes, relay=False)
    check_safe(sim, replay(seed, stakes, relay=False))
    check_live(sim, replay(seed, stakes, relay=False))


@schedule_settings(300)
@given(seeds, st.sampled_from([FOUR, SEVEN_UNEQUAL]), st.booleans())
def test_safe_and_live_with_a_proposer_that_withholds_its_data(
    seed: int, stakes: tuple[int, ...], relay: bool
) -> None:
    """A withholder gives its proposal's data to just enough members to lock with its
    prevote, then falls silent; a member left without the data refuses for that view
    only, and gets the data from a locked member when it proposes the value again."""
    sim = run_schedule(seed, stakes, relay=relay, withholder=True)
    check_safe(sim, replay(seed, stakes, relay=relay, withholder=True))
    check_live(sim, replay(seed, stakes, relay=relay, withholder=True))


def test_a_schedule_replays_exactly() -> None:
    first, second = run_schedule(1234, SEVEN_UNEQUAL), run_schedule(1234, SEVEN_UNEQUAL)
    assert first.events == second.events and first.now == second.now
    assert [[c.value_hash for c in n.commits] for n in first.nodes] == [
        [c.value_hash for c in n.commits] for n in second.nodes
    ]
