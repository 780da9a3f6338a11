"""``poc-node balance``: a submitter's balance, as a quorum of the committee's stake states it.

After each round that credits a submitter, every committee member publishes
a signed, retained ``Balance`` of it on ``balances/<submitter>/<member>``
(docs/PROTOCOL.md). The reader collects them, keeps the ones whose signature
verifies, which name this submitter and come from a committee member (the
newest per member), and groups the members by the (round, balance) they
state. The value stands once the members that agree on it hold a quorum of
the committee's stake (``Committee.has_quorum``); no single member, nor
anyone outside the committee, can make the reader believe another.

:func:`judge` is that decision alone, without a broker.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt

from consensus.committee import Committee, Member
from node.bus.client import Topics
from node.errors import NodeError
from node.intake.codec import CodecError
from node.intake.keys import load_key
from node.intake.wire import Balance, verify_balance
from node.ops.submitter import Access, BusTarget

SETTLE_S = 1.0
"""How long to wait for the members still silent once a quorum agrees (retained messages
arrive together, right after subscribing)."""


@dataclass(frozen=True)
class Verdict:
    """What the members' Balances of one submitter establish."""

    committee: Committee
    claims: dict[bytes, Balance]
    """The newest Balance of each member that answered, by member key."""
    round: int | None
    balance: int | None
    """The agreed value, None without a quorum."""
    agreed: tuple[Member, ...]
    """The members behind the agreed value (without a quorum: the largest group)."""
    disagreed: tuple[Member, ...]
    silent: tuple[Member, ...]

    @property
    def reached(self) -> bool:
        return self.balance is not None

    def stake(self, members: Iterable[Member]) -> int:
        return sum(member.stake for member in members)


def judge(committee: Committee, submitter: bytes, balances: Iterable[Balance]) -> Verdict:
    """The value a quorum of ``committee``'s stake agrees on, from verified Balances.

    A Balance of another submitter, or by a key outside the committee, is
    ignored; each member counts once, with its newest (highest round)
    statement, so a member cannot stand behind two values. Members are
    disjoint between groups, so at most one group can hold a quorum.
    """
    claims: dict[bytes, Balance] = {}
    for balance in balances:
        if balance.submitter != submitter or committee.member(balance.validator) is None:
            continue
        known = claims.get(balance.validator)
        if known is None or balance.round >= known.round:
            claims[balance.validator] = balance
    groups: dict[tuple[int, int], list[Member]] = {}
    for key, claim in claims.items():
        member = committee.member(key)
        assert member is not None
        groups.setdefault((claim.round, claim.balance), []).append(member)
    ranked = sorted(
        groups.items(), key=lambda group: (sum(m.stake for m in group[1]), group[0]), reverse=True
    )
    silent = tuple(m for m in committee.members if m.public_key not in claims)
    if not ranked:
        return Verdict(committee, claims, None, None, (), (), silent)
    (round_number, value), group = ranked[0]
    agreed = [m for m in committee.members if m in group]  # in the committee's order
    disagreed = tuple(m for m in committee.members if m.public_key in claims and m not in agreed)
    if not committee.has_quorum(sum(m.stake for m in agreed)):
        return Verdict(committee, claims, None, None, tuple(agreed), disagreed, silent)
    return Verdict(committee, claims, round_number, value, tuple(agreed), disagreed, silent)


def report(verdict: Verdict) -> list[str]:
    """The lines ``poc-node balance`` prints for a verdict reached."""
    total = verdict.committee.total_stake
    lines = [
        f"balance {verdict.balance} at round {verdict.round}",
        f"agreed: {_names(verdict.agreed)} (stake {verdict.stake(verdict.agreed)} of {total})",
    ]
    if verdict.disagreed:
        lines.append(f"disagreed: {_claims(verdict, verdict.disagreed)}")
    if verdict.silent:
        lines.append(f"silent: {_names(verdict.silent)}")
    return lines


def shortfall(verdict: Verdict) -> str:
    """Why no value stands, on one line."""
    if not verdict.claims:
        return f"silent: {_names(verdict.silent)} (a key never paid has no balance)"
    parts = [f"answered: {_claims(verdict, verdict.agreed + verdict.disagreed)}"]
    parts.append(
        f"largest agreeing stake {verdict.stake(verdict.agreed)} of {verdict.committee.total_stake}"
    )
    if verdict.silent:
        parts.append(f"silent: {_names(verdict.silent)}")
    return "; ".join(parts)


def _names(members: Iterable[Member]) -> str:
    return ", ".join(member.name for member in members)


def _claims(verdict: Verdict, members: Iterable[Member]) -> str:
    return ", ".join(
        f"{m.name} ({verdict.claims[m.public_key].balance} at round "
        f"{verdict.claims[m.public_key].round})"
        for m in members
    )


def committee_of_one(validator: bytes) -> Committee:
    """The committee a reader without a committee file trusts: the member that answered."""
    return Committee(0, 1, 1, (Member(validator.hex()[:16], validator, 1),))


async def run_balance(
    key_path: Path,
    bus_url: str,
    prefix: str,
    committee: Committee | None,
    timeout_s: float,
    *,
    access: Access | None = None,
    settle_s: float = SETTLE_S,
) -> int:
    """Print the submitter's balance once a quorum agrees; raise :class:`NodeError` if none does.

    Without ``committee`` the first member that answers is trusted alone
    (a committee of one, as the node's default), and said so.
    """
    target = BusTarget(bus_url, prefix)
    key = load_key(key_path)
    client = target.client(key, access or Access())
    submitter = key.public_key
    received: list[Balance] = []
    trusted = committee
    verdict: Verdict | None = None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    settle_until: float | None = None
    try:
        async with client:
            await client.subscribe(Topics(prefix).balances(submitter), qos=1)
            messages = aiter(client.messages)
            while True:
                until = deadline if settle_until is None else min(deadline, settle_until)
                if loop.time() >= until:
                    break
                try:
                    async with asyncio.timeout(until - loop.time()):
                        message = await anext(messages)
                except TimeoutError:
                    break
                payload = message.payload
                if not isinstance(payload, bytes | bytearray) or not payload:
                    continue
                try:
                    balance = verify_balance(bytes(payload))
                except CodecError:
                    print("ignoring a message that is not a valid signed Balance", file=sys.stderr)
                    continue
                if balance.submitter != submitter:
                    print("ignoring a Balance of another submitter", file=sys.stderr)
                    continue
                if trusted is None:
                    trusted = committee_of_one(balance.validator)
                    print(
                        f"no --committee: trusting the one member that answered, "
                        f"{balance.validator.hex()} (a committee of one, as the node's default)",
                        flush=True,
                    )
                if trusted.member(balance.validator) is None:
                    print(
                        f"ignoring a Balance signed by {balance.validator.hex()[:16]}, "
                        "not a committee member",
                        file=sys.stderr,
                    )
                    continue
                received.append(balance)
                verdict = judge(trusted, submitter, received)
                if not verdict.reached:  # (a member moved on to a newer round first)
                    settle_until = None
                elif not verdict.silent:
                    break
                elif settle_until is None:
                    settle_until = loop.time() + settle_s
    except aiomqtt.MqttError as error:
        raise NodeError(f"cannot reach the broker at {bus_url}: {error}") from None
    if verdict is None or not verdict.reached:
        if trusted is None:
            why = "no member answered (a key never paid has no balance)"
        else:
            why = shortfall(verdict or judge(trusted, submitter, ()))
        raise NodeError(
            f"no quorum of the committee's stake agreed on a balance of {key.public_hex} "
            f"within {timeout_s:g} s: {why}"
        )
    for line in report(verdict):
        print(line, flush=True)
    return 0
