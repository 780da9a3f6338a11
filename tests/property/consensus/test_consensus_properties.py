"""Quorum arithmetic and safety of the round machine under any delivery order."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from consensus import (
    Broadcast,
    Commit,
    Committee,
    Member,
    Proposal,
    QuorumCertificate,
    RoundMachine,
    SignedProposal,
    SignedVote,
    Vote,
)


class HashCrypto:
    """A fast stand-in for Ed25519: a signature is a hash of key and message.

    Only the quorum arithmetic and the state machine are under test here;
    real signatures are exercised in tests/unit/consensus.
    """

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key

    def digest(self, domain: str, body: Mapping[str, object]) -> bytes:
        return hashlib.sha256(domain.encode() + repr(sorted(body.items())).encode()).digest()

    def sign(self, domain: str, body: Mapping[str, object]) -> bytes:
        return self._sig(self.public_key, domain, body)

    def verify(
        self, public_key: bytes, domain: str, body: Mapping[str, object], signature: bytes
    ) -> bool:
        return signature == self._sig(public_key, domain, body)

    def _sig(self, key: bytes, domain: str, body: Mapping[str, object]) -> bytes:
        d = self.digest(domain, body)
        return hashlib.sha512(key + d).digest()


def key(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "big")).digest()


stakes_st = st.lists(st.integers(1, 100), min_size=1, max_size=7)


@given(stakes_st, st.integers(0, 10**6))
def test_quorum_is_exactly_two_thirds(stakes: list[int], stake: int) -> None:
    c = Committee(0, 10, 6, tuple(Member(str(i), key(i), s) for i, s in enumerate(stakes)))
    assert c.has_quorum(stake) == (Fraction(stake, c.total_stake) >= Fraction(2, 3))


@given(stakes_st, st.data())
def test_no_two_certificates_for_different_values(stakes: list[int], data: st.DataObject) -> None:
    """Faulty members (< 1/3 stake) sign every value; honest ones sign one each."""
    c = Committee(0, 10, 6, tuple(Member(str(i), key(i), s) for i, s in enumerate(stakes)))
    members = list(c.members)
    faulty = data.draw(st.sets(st.sampled_from(range(len(members)))))
    if sum(members[i].stake for i in faulty) * 3 >= c.total_stake:
        faulty = set()
    values: list[bytes | None] = [None, bytes(32), bytes([1] * 32)]
    certified = []
    crypto = HashCrypto(b"")
    choice = {i: data.draw(st.sampled_from(values)) for i in range(len(members)) if i not in faulty}
    for value in values:
        votes = []
        for i, m in enumerate(members):
            if i in faulty or choice[i] == value:
                v = Vote(5, m.public_key, value)
                votes.append((m.public_key, HashCrypto(m.public_key).sign(Vote.DOMAIN, v.body())))
        if QuorumCertificate(5, value, tuple(votes)).verify(c, crypto):
            certified.append(value)
    assert len(certified) <= 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 5), min_size=4, max_size=4),
    st.randoms(use_true_random=False),
    st.sets(st.integers(0, 3), max_size=3),
)
def test_any_delivery_order_commits_one_value_per_round(
    stakes: list[int], rnd: random.Random, disagree: set[int]
) -> None:
    """Messages are delivered in random order, timeouts fire at random moments.

    Honest members may commit a proposal or a skip, but never two different
    things for one round, and every round they commit has a valid certificate.
    """
    cryptos = [HashCrypto(key(i)) for i in range(4)]
    c = Committee(
        0,
        10,
        6,
        tuple(
            Member(str(i), k.public_key, s)
            for i, (k, s) in enumerate(zip(cryptos, stakes, strict=True))
        ),
    )

    def judge(i: int) -> Callable[[Sequence[bytes]], bool]:
        return lambda records: i not in disagree

    machines = [
        RoundMachine(c, k.public_key, k, records_agree=judge(i)) for i, k in enumerate(cryptos)
    ]
    commits: list[dict[int, Commit]] = [{} for _ in machines]
    pending: list[tuple[int, SignedProposal | SignedVote]] = []
    events: list[tuple[str, int, int]] = [
        (kind, i, r) for r in range(3) for i in range(4) for kind in ("close", "timeout")
    ]

    def perform(i: int, actions: list[object]) -> None:
        for a in actions:
            if isinstance(a, Broadcast):
                if a.domain == Proposal.DOMAIN:
                    msg: SignedProposal | SignedVote = SignedProposal(
                        Proposal.from_body(a.body), a.signature
                    )
                else:
                    msg = SignedVote(Vote.from_body(a.body), a.signature)
                pending.extend((j, msg) for j in range(4) if j != i)
            elif isinstance(a, Commit):
                assert a.round not in commits[i]
                commits[i][a.round] = a

    while events or pending:
        if pending and (not events or rnd.random() < 0.7):
            j, msg = pending.pop(rnd.randrange(len(pending)))
            m = machines[j]
            perform(
                j,
                list(
                    m.proposal_received(msg)
                    if isinstance(msg, SignedProposal)
                    else m.vote_received(msg)
                ),
            )
        else:
            kind, i, r = events.pop(rnd.randrange(len(events)))
            m = machines[i]
            perform(i, list(m.round_closed(r, [b"rec"]) if kind == "close" else m.timeout(r)))

    for r in range(3):
        values = {(cm[r].proposal, cm[r].certificate.proposal_hash) for cm in commits if r in cm}
        assert len(values) <= 1
        for cm in commits:
            if r in cm:
                assert cm[r].certificate.verify(c, cryptos[0])
    for cm in commits:
        assert sorted(cm) == list(range(len(cm)))
