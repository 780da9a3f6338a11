"""``Balance``: its wire form, the quorum a reader waits for, and when a member publishes one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from consensus.actions import BuildProposal, Commit
from consensus.committee import Committee, Member
from consensus.round import RoundMachine
from node.bus.client import Topics
from node.intake.codec import CodecError, pack, unpack
from node.intake.keys import SigningKey
from node.intake.signing import MessageSigner
from node.intake.wire import BALANCE_DOMAIN, RESULT_DOMAIN, Balance, verify_balance
from node.ops.balance import committee_of_one, judge, report, shortfall
from node.ops.config import load_config
from node.ops.metrics import Metrics
from node.rounds.driver import RoundDriver, balance_messages
from node.rounds.records import RoundRecord
from node.store.sqlite import CommittedRound, Finalization, Outgoing, State, Store
from node.store.thread import StoreThread
from rewards.history import History
from tests.peer import verify_balance as peer_verify_balance

TOPICS = Topics("poc/v1")
ALICE, BOB = b"a" * 32, b"b" * 32


def signed(signer: MessageSigner, balance: Balance, domain: bytes = BALANCE_DOMAIN) -> bytes:
    return signer.signed_bytes(domain.decode(), balance.body())


# -- the message --------------------------------------------------------------


def test_a_balance_verifies_here_and_for_a_peer_written_from_the_protocol():
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    raw = signed(signer, Balance(ALICE, 7, 1234, me))
    assert verify_balance(raw) == Balance(ALICE, 7, 1234, me)
    message = peer_verify_balance(raw)
    assert (message["submitter"], message["round"], message["balance"]) == (ALICE, 7, 1234)


def test_a_tampered_misdirected_or_forged_balance_is_refused():
    signer = MessageSigner(SigningKey.generate())
    other = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    genuine = unpack(signed(signer, Balance(ALICE, 7, 1234, me)))

    for field, value in [("balance", 99_999), ("round", 8), ("submitter", BOB)]:
        with pytest.raises(CodecError, match="signature"):
            verify_balance(pack({**genuine, field: value}))
    # Another key's signature over a Balance naming this validator.
    forged = {
        **genuine,
        "sig": other.sign(BALANCE_DOMAIN.decode(), Balance(ALICE, 7, 9, me).body()),
    }
    with pytest.raises(CodecError, match="signature"):
        verify_balance(pack(forged))
    # The right key, the wrong domain: a signature is never reusable across messages.
    with pytest.raises(CodecError, match="signature"):
        verify_balance(signed(signer, Balance(ALICE, 7, 1234, me), RESULT_DOMAIN))
    # Schema: a field more or less, a short key, a negative or boolean number, junk.
    with pytest.raises(CodecError, match="exactly"):
        verify_balance(pack({**genuine, "note": "trust me"}))
    with pytest.raises(CodecError, match="exactly"):
        verify_balance(pack({k: v for k, v in genuine.items() if k != "round"}))
    with pytest.raises(CodecError, match="32-byte"):
        verify_balance(pack({**genuine, "submitter": b"short"}))
    with pytest.raises(CodecError, match="uint64"):
        verify_balance(pack({**genuine, "balance": -1}))
    with pytest.raises(CodecError, match="uint64"):
        verify_balance(pack({**genuine, "round": True}))
    with pytest.raises(CodecError):
        verify_balance(b"\xc1 not msgpack")
    with pytest.raises(CodecError):  # the same map, not canonically encoded
        import msgpack

        verify_balance(msgpack.packb(dict(reversed(list(genuine.items()))), use_bin_type=True))


# -- the quorum ---------------------------------------------------------------


def committee_of(*stakes: int) -> tuple[Committee, list[bytes]]:
    keys = [bytes([index + 1]) * 32 for index in range(len(stakes))]
    members = tuple(
        Member(f"v{i}", key, stake) for i, (key, stake) in enumerate(zip(keys, stakes, strict=True))
    )
    return Committee(0, 1, 1, members), keys


def test_one_lying_member_is_outvoted_and_named():
    committee, (v0, v1, v2) = committee_of(100, 100, 100)
    verdict = judge(
        committee,
        ALICE,
        [Balance(ALICE, 5, 70, v0), Balance(ALICE, 5, 70, v1), Balance(ALICE, 5, 1_000_000, v2)],
    )
    assert (verdict.round, verdict.balance) == (5, 70)
    assert [m.name for m in verdict.agreed] == ["v0", "v1"]
    assert [m.name for m in verdict.disagreed] == ["v2"]
    assert report(verdict) == [
        "balance 70 at round 5",
        "agreed: v0, v1 (stake 200 of 300)",
        "disagreed: v2 (1000000 at round 5)",
    ]


def test_a_liar_with_a_silent_member_leaves_no_quorum():
    committee, (v0, _, v2) = committee_of(100, 100, 100)
    verdict = judge(committee, ALICE, [Balance(ALICE, 5, 70, v0), Balance(ALICE, 5, 9, v2)])
    assert not verdict.reached and verdict.balance is None
    assert [m.name for m in verdict.silent] == ["v1"]
    assert "silent: v1" in shortfall(verdict)


def test_a_silent_member_is_named_but_a_quorum_without_it_stands():
    committee, (v0, v1, _) = committee_of(100, 100, 100)
    verdict = judge(committee, ALICE, [Balance(ALICE, 5, 70, v0), Balance(ALICE, 5, 70, v1)])
    assert verdict.balance == 70
    assert [m.name for m in verdict.silent] == ["v2"] and verdict.disagreed == ()
    assert report(verdict)[-1] == "silent: v2"


def test_keys_outside_the_committee_and_other_submitters_count_for_nothing():
    committee, (v0, v1, v2) = committee_of(100, 100, 100)
    strangers = [Balance(ALICE, 9, 5, bytes([0xEE - i]) * 32) for i in range(10)]
    misdirected = [Balance(BOB, 9, 5, v1), Balance(BOB, 9, 5, v2)]
    verdict = judge(committee, ALICE, [Balance(ALICE, 5, 70, v0), *strangers, *misdirected])
    assert not verdict.reached
    assert set(verdict.claims) == {v0}
    assert [m.name for m in verdict.silent] == ["v1", "v2"]


def test_stake_not_headcount_makes_the_quorum():
    committee, (big, small1, small2) = committee_of(300, 100, 100)
    two_small = judge(
        committee, ALICE, [Balance(ALICE, 5, 1, small1), Balance(ALICE, 5, 1, small2)]
    )
    assert not two_small.reached  # 200 of 500
    whale = judge(committee, ALICE, [Balance(ALICE, 5, 2, big), Balance(ALICE, 5, 2, small1)])
    assert whale.balance == 2  # 400 of 500
    alone = judge(committee, ALICE, [Balance(ALICE, 5, 2, big)])
    assert not alone.reached  # 300 of 500 is below two thirds


def test_a_member_counts_once_with_its_newest_statement():
    committee, (v0, v1, v2) = committee_of(100, 100, 100)
    # v2 moved on to round 6 (its older Balance of round 5 arrives late): the
    # round-5 value still holds a quorum, and v2 is not counted for it too.
    verdict = judge(
        committee,
        ALICE,
        [
            Balance(ALICE, 6, 90, v2),
            Balance(ALICE, 5, 70, v0),
            Balance(ALICE, 5, 70, v1),
            Balance(ALICE, 5, 70, v2),
        ],
    )
    assert (verdict.round, verdict.balance) == (5, 70)
    assert [m.name for m in verdict.agreed] == ["v0", "v1"]
    assert verdict.disagreed[0].name == "v2"
    assert "disagreed: v2 (90 at round 6)" in report(verdict)
    # Once a quorum has moved on, the newer value is the one.
    newer = judge(committee, ALICE, [Balance(ALICE, 6, 90, v) for v in (v0, v1)])
    assert (newer.round, newer.balance) == (6, 90)


def test_without_a_committee_file_the_one_member_that_answered_is_the_committee():
    validator = b"\x07" * 32
    committee = committee_of_one(validator)
    assert judge(committee, ALICE, [Balance(ALICE, 3, 12, validator)]).balance == 12
    assert not judge(committee, ALICE, [Balance(ALICE, 3, 12, b"\x08" * 32)]).reached


# -- publishing: in the commit, for credited submitters only ------------------


def final(identity: bytes, submitter: bytes, reward: int) -> Finalization:
    return Finalization(identity, submitter, State.FINAL, None, (), (), reward)


def test_a_commit_queues_the_new_total_of_each_submitter_it_credited(tmp_path: Path):
    store = Store(tmp_path / "s.db")
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key

    def commit(number: int, outcomes: list[Finalization]) -> bool:
        return store.commit_round(
            CommittedRound(number, b"v" * 32, b"b" * 32, b"c", b"s"),
            outcomes,
            [Outgoing("poc/v1/rounds/x", b"summary", True)],
            1,
            balance_messages=lambda totals: balance_messages(signer, TOPICS, number, totals),
        )

    carol = b"c" * 32
    assert commit(1, [final(b"1" * 32, ALICE, 70), final(b"2" * 32, BOB, 0)])
    # Round 2 pays Alice again and Carol for the first time; Bob earns nothing again;
    # a submission already paid (certified twice) credits nobody.
    assert commit(
        2,
        [
            final(b"3" * 32, ALICE, 30),
            final(b"4" * 32, carol, 5),
            final(b"5" * 32, BOB, 0),
            Finalization(b"6" * 32, BOB, State.REJECTED, "pair_too_far", (), (), 0),
        ],
    )
    assert commit(3, [final(b"1" * 32, ALICE, 70), final(b"7" * 32, BOB, 0)])
    assert not commit(2, [final(b"8" * 32, ALICE, 1)])  # already committed: nothing queued
    announced = [
        (entry.topic, verify_balance(entry.payload), entry.retain)
        for entry in store.outbox(0, 100)
        if "/balances/" in entry.topic
    ]
    assert announced == [
        (f"poc/v1/balances/{ALICE.hex()}/{me.hex()}", Balance(ALICE, 1, 70, me), True),
        (f"poc/v1/balances/{ALICE.hex()}/{me.hex()}", Balance(ALICE, 2, 100, me), True),
        (f"poc/v1/balances/{carol.hex()}/{me.hex()}", Balance(carol, 2, 5, me), True),
    ]
    assert store.balances() == {ALICE: 100, carol: 5}


def test_a_balance_that_cannot_be_made_rolls_the_whole_round_back(tmp_path: Path):
    store = Store(tmp_path / "s.db")

    def broken(totals: object) -> list[Outgoing]:
        raise RuntimeError("no signing today")

    with pytest.raises(RuntimeError):
        store.commit_round(
            CommittedRound(1, b"v" * 32, b"b" * 32, b"c", b"s"),
            [final(b"1" * 32, ALICE, 70)],
            [Outgoing("t", b"final result")],
            1,
            balance_messages=broken,
        )
    assert store.last_round() is None
    assert store.balances() == {} and store.outbox(0, 10) == []


def solo_commit(signer: MessageSigner, records: list[RoundRecord]) -> tuple[Committee, Commit]:
    """A certified round 0 of a committee of one, as the consensus machine decides it."""
    me = signer.key.public_key
    committee = Committee(0, 1, 10, (Member("solo", me, 1),))
    machine = RoundMachine(committee, me, signer, first_round=0, beacon=b"b" * 32)
    build = next(a for a in machine.round_closed(0) if isinstance(a, BuildProposal))
    actions = machine.proposal_built(0, build.view, [r.to_bytes() for r in records])
    return committee, next(a for a in actions if isinstance(a, Commit))


def record(identity: bytes, submitter: bytes, reward: int) -> RoundRecord:
    return RoundRecord(identity, submitter, "final", None, 0, (), None, None, reward, reward)


def test_the_driver_publishes_balances_with_the_round_it_commits(tmp_path: Path):
    signer = MessageSigner(SigningKey.generate())
    me = signer.key.public_key
    committee, commit = solo_commit(
        signer,
        [record(b"1" * 32, ALICE, 40), record(b"2" * 32, ALICE, 2), record(b"3" * 32, BOB, 0)],
    )

    async def scenario() -> list[tuple[str, bytes, bool]]:
        store = StoreThread(Store(tmp_path / "s.db"))
        chain = SimpleNamespace(advanced=lambda *args: asyncio.sleep(0))
        driver = RoundDriver(
            load_config(),
            committee,
            signer,
            store,
            History(8),  # these records add nothing to it
            SimpleNamespace(),  # the rules: only proposals and checks use them
            chain,  # type: ignore[arg-type]
            Metrics(CollectorRegistry()),
            TOPICS,
            lambda: None,
        )
        await driver._commit(commit)
        entries = await store.call(lambda db: db.outbox(0, 100))
        store.close()
        return [(e.topic, e.payload, e.retain) for e in entries]

    entries = asyncio.run(scenario())
    balances = [(t, verify_balance(p), r) for t, p, r in entries if "/balances/" in t]
    assert balances == [(TOPICS.balance(ALICE, me), Balance(ALICE, 0, 42, me), True)]
    # After the round's Results and its summary, in the same outbox.
    assert [t.split("/")[2] for t, _, _ in entries] == ["results"] * 3 + ["rounds", "balances"]


def test_nobody_answering_names_every_member_silent():
    committee, _ = committee_of(100, 100)
    verdict = judge(committee, ALICE, [])
    assert not verdict.reached
    assert shortfall(verdict) == "silent: v0, v1 (a key never paid has no balance)"


def test_the_command_fails_on_one_line_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from node.intake.keys import write_key
    from node.ops.cli import main

    with pytest.raises(SystemExit) as helped:
        main(["balance", "--help"])
    assert helped.value.code == 0 and "usage: poc-node balance" in capsys.readouterr().out
    assert main(["balance", "--key", str(tmp_path / "missing.key")]) == 1
    assert "cannot read key" in capsys.readouterr().err
    key = tmp_path / "me.key"
    write_key(SigningKey.generate(), key)
    assert main(["balance", "--key", str(key), "--bus", "http://x"]) == 1
    assert "is not mqtt://HOST:PORT" in capsys.readouterr().err
    assert main(["balance", "--key", str(key), "--bus", "mqtt://127.0.0.1:9"]) == 1
    error = capsys.readouterr().err
    assert "cannot reach the broker" in error and error.count("\n") == 1
