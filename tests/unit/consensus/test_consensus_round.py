"""The round state machine: a committee of one, and four validators in one process."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from consensus_fakes import FakeCrypto, Simulation, decode_broadcast, make_committee

from consensus import (
    SKIP_HASH,
    Broadcast,
    Commit,
    Equivocation,
    FetchProposal,
    Proposal,
    QuorumCertificate,
    Rejected,
    RoundMachine,
    SignedProposal,
    SignedVote,
    Vote,
    genesis_beacon,
    next_beacon,
)


def always(records: Sequence[bytes]) -> bool:
    return True


def test_committee_of_one_commits_on_round_close() -> None:
    committee, (crypto,) = make_committee([5])
    m = RoundMachine(committee, crypto.public_key, crypto, records_agree=always)
    actions = m.round_closed(0, [b"a", b"b"])
    assert [type(a) for a in actions] == [Broadcast, Broadcast, Commit]
    proposal_msg, vote_msg, commit = actions
    assert isinstance(proposal_msg, Broadcast) and proposal_msg.domain == Proposal.DOMAIN
    assert isinstance(vote_msg, Broadcast) and vote_msg.domain == Vote.DOMAIN
    assert isinstance(commit, Commit)
    assert commit.proposal == Proposal(0, crypto.public_key, (b"a", b"b"))
    h = commit.proposal.digest(crypto)
    assert commit.certificate.proposal_hash == h
    assert commit.certificate.verify(committee, crypto)
    assert commit.beacon_after == next_beacon(genesis_beacon(committee.digest()), h)
    assert m.next_round == 1 and m.beacon == commit.beacon_after
    second = m.round_closed(1, [])
    assert isinstance(second[-1], Commit) and second[-1].round == 1
    assert m.round_closed(0, [b"again"]) == [Rejected("round_closed", 0, "already_final")]


def test_committee_of_one_skips_on_timeout() -> None:
    committee, (crypto,) = make_committee([1])
    m = RoundMachine(committee, crypto.public_key, crypto, records_agree=always)
    actions = m.timeout(0)
    commit = actions[-1]
    assert isinstance(commit, Commit) and commit.proposal is None
    assert commit.certificate.proposal_hash is None
    assert commit.beacon_after == next_beacon(genesis_beacon(committee.digest()), SKIP_HASH)
    assert m.round_closed(0, [b"late"])[0].reason == "already_final"  # type: ignore[union-attr]


def test_rounds_closed_ahead_wait_for_their_turn() -> None:
    committee, (crypto,) = make_committee([1])
    m = RoundMachine(committee, crypto.public_key, crypto, records_agree=always)
    assert m.round_closed(1, [b"y"]) == []
    actions = m.round_closed(0, [b"x"])
    assert [a.round for a in actions if isinstance(a, Commit)] == [0, 1]


def test_four_validators_finalize_every_round_with_honest_leaders() -> None:
    sim = Simulation([1, 1, 1, 1])
    for r in range(12):
        sim.close_round(r, [f"r{r}".encode()])
        commits = [n.commits[-1] for n in sim.nodes]
        assert all(c.round == r for c in commits)
        assert all(
            c.proposal is not None and c.proposal.records == (f"r{r}".encode(),) for c in commits
        )
        assert len({c.beacon_after for c in commits}) == 1
        assert all(c.certificate.verify(sim.committee, sim.nodes[0].crypto) for c in commits)
    assert all(n.machine.next_round == 12 for n in sim.nodes)
    assert len({c.proposal.leader for c in sim.nodes[0].commits if c.proposal}) > 1


def test_silent_leader_gives_a_certified_skip() -> None:
    sim = Simulation([1, 1, 1, 1])
    leader = sim.by_key(sim.nodes[0].machine.leader.public_key)
    leader.online = False
    sim.close_round(0)
    assert all(not n.commits for n in sim.nodes)
    sim.time_out(0)
    for node in sim.nodes:
        if node.online:
            (commit,) = node.commits
            assert commit.proposal is None and commit.certificate.proposal_hash is None
            assert commit.certificate.verify(sim.committee, node.crypto)
            assert node.machine.next_round == 1


def test_disagreeing_records_vote_skip() -> None:
    sim = Simulation([1, 1, 1, 1], agree=lambda i, records: False)
    sim.close_round(0)
    sim.time_out(0)
    assert all(n.commits[0].proposal is None for n in sim.nodes)


def test_one_dissenter_does_not_block_the_proposal() -> None:
    sim = Simulation([1, 1, 1, 1], agree=lambda i, records: i != 2)
    sim.close_round(0)
    assert all(n.commits[0].proposal is not None for n in sim.nodes)


def test_equivocating_voter_is_caught() -> None:
    sim = Simulation([1, 1, 1, 1])
    leader_key = sim.nodes[0].machine.leader.public_key
    bad = next(n for n in sim.nodes if n.crypto.public_key != leader_key)
    honest = [n for n in sim.nodes if n is not bad]
    bad.online = False
    for vote_value in (bytes(range(32)), None):
        vote = Vote(0, bad.crypto.public_key, vote_value)
        signed = SignedVote(vote, bad.crypto.sign(Vote.DOMAIN, vote.body()))
        for node in honest:
            sim.handle(sim.nodes.index(node), node.machine.vote_received(signed))
    for node in honest:
        (eq,) = node.evidence
        assert eq.evidence.offender == bad.crypto.public_key and eq.evidence.kind == "vote"
        assert eq.evidence.verify(sim.committee, node.crypto)
    assert len({n.evidence[0].evidence for n in honest}) == 1
    sim.close_round(0)
    assert all(n.commits[0].proposal is not None for n in honest)


def test_equivocating_leader_is_caught() -> None:
    sim = Simulation([1, 1, 1, 1])
    leader = sim.by_key(sim.nodes[0].machine.leader.public_key)
    others = [n for n in sim.nodes if n is not leader]
    for records in ((b"one",), (b"two",)):
        p = Proposal(0, leader.crypto.public_key, records)
        signed = SignedProposal(p, leader.crypto.sign(Proposal.DOMAIN, p.body()))
        actions = others[0].machine.proposal_received(signed)
    (eq,) = actions
    assert isinstance(eq, Equivocation) and eq.evidence.kind == "proposal"
    assert eq.evidence.verify(sim.committee, others[0].crypto)


def test_bad_and_foreign_messages_are_rejected() -> None:
    committee, cryptos = make_committee([1, 1, 1, 1])
    m = RoundMachine(committee, cryptos[0].public_key, cryptos[0], records_agree=always)
    stranger = FakeCrypto(99)
    vote = Vote(0, stranger.public_key, None)
    assert m.vote_received(SignedVote(vote, stranger.sign(Vote.DOMAIN, vote.body())))[
        0
    ] == Rejected("vote", 0, "not_member")
    forged = Vote(0, cryptos[1].public_key, None)
    assert m.vote_received(SignedVote(forged, stranger.sign(Vote.DOMAIN, forged.body())))[0] == (
        Rejected("vote", 0, "bad_signature")
    )
    far = Vote(100, cryptos[1].public_key, None)
    assert m.vote_received(SignedVote(far, cryptos[1].sign(Vote.DOMAIN, far.body())))[0].reason == (  # type: ignore[union-attr]
        "too_far_ahead"
    )
    non_leader = next(c for c in cryptos if c.public_key != m.leader.public_key)
    p = Proposal(0, non_leader.public_key, ())
    assert m.proposal_received(SignedProposal(p, non_leader.sign(Proposal.DOMAIN, p.body())))[
        0
    ] == Rejected("proposal", 0, "not_leader")


def test_restored_vote_is_never_replaced() -> None:
    committee, cryptos = make_committee([1, 1, 1, 1])
    me = next(c for c in cryptos)
    first = RoundMachine(committee, me.public_key, me, records_agree=always)
    leader_key = first.leader.public_key
    if leader_key == me.public_key:
        me = next(c for c in cryptos if c.public_key != leader_key)
        first = RoundMachine(committee, me.public_key, me, records_agree=always)
    (skip_msg,) = first.timeout(0)
    assert isinstance(skip_msg, Broadcast)
    skip = decode_broadcast(skip_msg)
    assert isinstance(skip, SignedVote) and skip.vote.proposal_hash is None

    restarted = RoundMachine(committee, me.public_key, me, records_agree=always)
    assert restarted.restore_vote(skip) == [skip_msg]
    leader = next(c for c in cryptos if c.public_key == leader_key)
    p = Proposal(0, leader_key, (b"r",))
    assert restarted.round_closed(0, [b"r"]) == []
    assert (
        restarted.proposal_received(SignedProposal(p, leader.sign(Proposal.DOMAIN, p.body()))) == []
    )
    assert restarted.my_vote(0) == skip
    with pytest.raises(ValueError):
        other = Vote(0, me.public_key, p.digest(me))
        restarted.restore_vote(SignedVote(other, me.sign(Vote.DOMAIN, other.body())))


def test_certified_proposal_never_received_is_fetched() -> None:
    sim = Simulation([1, 1, 1, 1])
    leader = sim.by_key(sim.nodes[0].machine.leader.public_key)
    late = next(n for n in sim.nodes if n is not leader)
    late.online = False
    sim.close_round(0, [b"x"])
    late.online = True
    actions: list[object] = []
    for node in sim.nodes:
        if node is not late:
            vote = node.machine.my_vote(0)
            if vote is None:
                vote = _vote_from_commit(node.commits[0], node.crypto.public_key)
            actions += late.machine.vote_received(vote)
    fetch = [a for a in actions if isinstance(a, FetchProposal)]
    assert len(fetch) == 1
    commit = leader.commits[0]
    result = late.machine.certificate_received(fetch[0].certificate, commit.proposal)
    assert isinstance(result[0], Commit) and result[0].beacon_after == commit.beacon_after
    assert late.machine.certificate_received(commit.certificate, commit.proposal)[0] == Rejected(
        "certificate", 0, "already_final"
    )


def _vote_from_commit(commit: Commit, voter: bytes) -> SignedVote:
    signature = dict(commit.certificate.votes)[voter]
    return SignedVote(Vote(commit.round, voter, commit.certificate.proposal_hash), signature)


def test_certificate_checks() -> None:
    committee, cryptos = make_committee([1, 1, 1, 1])
    h = bytes(32 * [7])

    def signed(i: int, value: bytes | None = h) -> tuple[bytes, bytes]:
        v = Vote(3, cryptos[i].public_key, value)
        return (cryptos[i].public_key, cryptos[i].sign(Vote.DOMAIN, v.body()))

    c = cryptos[0]
    assert QuorumCertificate(3, h, (signed(0), signed(1), signed(2))).verify(committee, c)
    assert QuorumCertificate(3, h, (signed(0), signed(1))).why_invalid(committee, c) == "no_quorum"
    dup = (signed(0), signed(0), signed(1))
    assert QuorumCertificate(3, h, dup).why_invalid(committee, c) == "duplicate_voter"
    wrong = (signed(0), signed(1), signed(2, None))
    assert QuorumCertificate(3, h, wrong).why_invalid(committee, c) == "bad_signature"
    qc = QuorumCertificate(3, None, (signed(3, None), signed(1, None), signed(2, None)))
    assert qc.verify(committee, c)
    assert QuorumCertificate.from_body(qc.body()) == qc
    assert qc.body()["proposal_hash"] == b""
