"""The round driver: closes rounds on the clock, runs consensus, commits results.

At the end of round r the driver scores every accepted submission against the
history (DESIGN.md §6), hands the records to the consensus state machine
(§7) and performs the actions it returns. A ``Commit`` is applied from the
*certified* records in one store transaction: submission states, history,
ledger, the final Results and the retained ``RoundSummary``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from consensus.actions import Action, Broadcast, Commit, Equivocation
from consensus.committee import Committee
from consensus.messages import QuorumCertificate, SignedVote, Vote
from consensus.round import RoundMachine
from node.bus import Topics
from node.chain import BeaconChain
from node.codec import pack
from node.config import Config
from node.errors import Reason
from node.intake import SYSTEM_CLOCK, Clock
from node.metrics import Metrics
from node.records import Candidate, Prepared, RoundRecord, from_float16, score_round
from node.signing import MessageSigner
from node.store import CommittedRound, Finalization, Outgoing, State, Store
from node.wire import RESULT_DOMAIN, Result, Status
from rewards.history import HistoryIndex

log = logging.getLogger("poc.rounds")

SUMMARY_DOMAIN = "poc/v1/round-summary"
StoreCall = Callable[[Callable[[Store], Any]], Awaitable[Any]]


class RoundDriver:
    """Drives one validator's rounds."""

    def __init__(
        self,
        config: Config,
        committee: Committee,
        signer: MessageSigner,
        store: StoreCall,
        history: HistoryIndex,
        chain: BeaconChain,
        metrics: Metrics,
        topics: Topics,
        on_outbox: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._committee = committee
        self._signer = signer
        self._store = store
        self._history = history
        self._chain = chain
        self._metrics = metrics
        self._topics = topics
        self._on_outbox = on_outbox
        self._clock = clock
        self._machine: RoundMachine | None = None

    async def start(self) -> None:
        """Resume after the last committed round (walking skipped ones)."""
        now_round = max(self._committee.round_at(self._clock.now_ms()), 0)
        first_round, beacon = await self._store(
            lambda store: self._chain.resume_point(store, now_round)
        )
        self._machine = RoundMachine(
            self._committee,
            self._signer.key.public_key,
            self._signer,
            records_agree=lambda records: True,
            first_round=first_round,
            beacon=beacon,
        )
        signed = await self._store(lambda store: store.signed_vote(first_round))
        if signed is not None:
            self._machine.restore_vote(self._decode_vote(signed))
        await self._chain.advanced(first_round, beacon)
        self._metrics.finalized_round.set(first_round - 1)
        log.info("event=rounds_resumed next_round=%d beacon=%s", first_round, beacon.hex()[:16])

    @property
    def machine(self) -> RoundMachine:
        assert self._machine is not None, "start() first"
        return self._machine

    async def run(self) -> None:
        """Close each round when the clock passes its end."""
        while True:
            round_number = self.machine.next_round
            wait_ms = self._committee.round_end_ms(round_number) - self._clock.now_ms()
            self._metrics.round.set(max(self._committee.round_at(self._clock.now_ms()), 0))
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
                continue
            await self.close_round(round_number)

    async def close_round(self, round_number: int) -> None:
        started = time.perf_counter()
        accepted = await self._store(lambda store: store.submissions_in(State.ACCEPTED))
        candidates = [
            Candidate(s.id, s.submitter, Prepared.from_bytes(s.prepared))
            for s in accepted
            if s.prepared is not None
        ]
        records = await asyncio.to_thread(
            score_round, candidates, self._history, self._config.scoring
        )
        self._metrics.stage_seconds.labels(stage="score").observe(time.perf_counter() - started)
        actions = self.machine.round_closed(round_number, [r.to_bytes() for r in records])
        await self._perform(actions)

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                await self._broadcast(action)
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, Equivocation):
                log.warning(
                    "event=equivocation offender=%s round=%d",
                    action.evidence.offender.hex()[:16],
                    action.evidence.round,
                )
            else:
                log.info("event=consensus_action action=%r", action)

    async def _broadcast(self, action: Broadcast) -> None:
        body = dict(action.body)
        if action.domain == Vote.DOMAIN:
            payload = pack({**body, "sig": action.signature})
            round_number = int(body["round"])  # type: ignore[call-overload]
            # What this validator signed is durable before anybody can see it.
            await self._store(lambda store: store.record_vote(round_number, payload))
            topic = f"{self._topics.prefix}/consensus/votes"
        else:
            topic = f"{self._topics.prefix}/consensus/proposals"
        if len(self._committee.members) > 1:
            outgoing = Outgoing(topic, pack({**body, "sig": action.signature}))
            await self._store(lambda store: store.enqueue([outgoing]))
            self._on_outbox()

    @staticmethod
    def _decode_vote(payload: bytes) -> SignedVote:
        from node.codec import unpack

        body = unpack(payload)
        signature = body.pop("sig")
        return SignedVote(Vote.from_body(body), signature)

    async def _commit(self, commit: Commit) -> None:
        started = time.perf_counter()
        records = (
            [RoundRecord.from_bytes(raw) for raw in commit.proposal.records]
            if commit.proposal is not None
            else []
        )
        me = self._signer.key.public_key
        outcomes = []
        outgoing = []
        for record in records:
            final = record.status == "final"
            outcomes.append(
                Finalization(
                    record.submission_id,
                    record.submitter,
                    State.FINAL if final else State.REJECTED,
                    None if record.reason is None else str(record.reason),
                    record.history_vectors,
                    record.reward,
                )
            )
            result = Result(
                record.submission_id,
                me,
                Status.FINAL if final else Status.REJECTED,
                record.reason,
                commit.round,
                record.embeddings,
                record.pair_distance_ppm,
                record.scores_ppm,
                record.reward,
            )
            outgoing.append(
                Outgoing(
                    self._topics.results(record.submitter),
                    self._signer.signed_bytes(RESULT_DOMAIN.decode(), result.body()),
                )
            )
        summary = self._summary(commit, records)
        outgoing.append(Outgoing(self._topics.round(commit.round), summary, retain=True))
        committed = CommittedRound(
            commit.round,
            None if commit.certificate.proposal_hash is None else commit.certificate.proposal_hash,
            commit.beacon_after,
            pack(commit.certificate.body()),
            summary,
        )
        now = self._clock.now_ms()
        epoch_start = (commit.round + 1) % self._committee.epoch_rounds == 0

        def write(store: Store) -> bool:
            done = store.commit_round(committed, outcomes, outgoing, now)
            if epoch_start:
                epoch = self._committee.epoch_of(commit.round + 1)
                store.set_meta(f"epoch_beacon/{epoch}", commit.beacon_after)
            return done

        if not await self._store(write):
            log.warning("event=round_already_committed round=%d", commit.round)
            return
        vectors = [from_float16(v) for record in records for v in record.history_vectors]
        if vectors:
            self._history.add(np.stack(vectors))
        await self._chain.advanced(commit.round + 1, commit.beacon_after)
        paid = sum(record.reward for record in records)
        for record in records:
            self._metrics.results.labels(status=record.status).inc()
            if record.reason is Reason.PAIR_TOO_FAR:
                self._metrics.rejections.labels(reason=str(Reason.PAIR_TOO_FAR)).inc()
        self._metrics.rewards.inc(paid)
        self._metrics.rounds.labels(outcome="skip" if commit.proposal is None else "final").inc()
        self._metrics.finalized_round.set(commit.round)
        self._metrics.history_size.set(len(self._history))
        self._metrics.stage_seconds.labels(stage="commit").observe(time.perf_counter() - started)
        self._on_outbox()
        if records:
            log.info(
                "event=round_final round=%d submissions=%d paid=%d history=%d",
                commit.round,
                len(records),
                paid,
                len(self._history),
            )

    def _summary(self, commit: Commit, records: list[RoundRecord]) -> bytes:
        certificate: QuorumCertificate = commit.certificate
        body = {
            "v": 1,
            "round": commit.round,
            "validator": self._signer.key.public_key,
            "proposal_hash": certificate.proposal_hash or b"",
            "beacon_after": commit.beacon_after,
            "records": [
                {
                    "submission_id": r.submission_id,
                    "submitter": r.submitter,
                    "status": r.status,
                    "reason": None if r.reason is None else str(r.reason),
                    "score": r.score,
                    "reward": r.reward,
                }
                for r in records
            ],
            "certificate": certificate.body(),
        }
        return self._signer.signed_bytes(SUMMARY_DOMAIN, body)
