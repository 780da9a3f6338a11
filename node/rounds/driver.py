"""The round driver: closes rounds on the clock, runs consensus, commits results.

At the end of round r the leader scores every accepted submission against
the history (DESIGN.md §6) and proposes the records; every member checks
them against its own computation (``node.rounds.verify``) and votes; a quorum
certificate commits the *certified* records in one store transaction:
submission states, history, ledger, the final Results and the retained
``RoundSummary``. Consensus itself is the pure ``RoundMachine``; this
module performs what it asks (durable votes before sending, broadcasts,
commits, evidence, fetches) and feeds it the bus and the clock.

A committee of one decides alone: its own vote certifies each round, and
rounds it did not run (the node was down) are skipped rounds of the chain.
A member of a larger committee catches up through sync.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from consensus.actions import Action, Broadcast, Commit, Equivocation, FetchProposal, Rejected
from consensus.committee import Committee
from consensus.messages import QuorumCertificate, SignedProposal, Vote
from consensus.round import RoundMachine
from node.bus.client import Topics
from node.rounds.chain import BeaconChain
from node.intake.codec import pack
from node.ops.config import Config
from node.rounds.consensus_wire import (
    ConsensusWireError,
    decode_certificate,
    decode_proposal,
    decode_vote,
    encode_certificate,
    encode_proposal,
)
from node.errors import Reason
from node.intake.admission import SYSTEM_CLOCK, Clock
from node.ops.metrics import Metrics
from node.rounds.records import Candidate, Prepared, RoundRecord, from_float16, score_round
from node.intake.signing import MessageSigner
from node.store.sqlite import CommittedRound, Finalization, Outgoing, State, Store, StoreCall
from node.rounds.sync import SyncService
from node.rounds.verify import Mismatch, RecordVerifier
from node.intake.wire import RESULT_DOMAIN, Result, Status
from rewards.history import HistoryIndex

log = logging.getLogger("poc.rounds")

SUMMARY_DOMAIN = "poc/v1/round-summary"


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
        *,
        verifier: RecordVerifier | None = None,
        sync: SyncService | None = None,
        history_lock: asyncio.Lock | None = None,
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
        self._verifier = verifier
        self._sync = sync
        self._clock = clock
        self._machine: RoundMachine | None = None
        self._solo = len(committee.members) == 1
        self._lock = asyncio.Lock()
        self._history_lock = history_lock or asyncio.Lock()
        self._progress = asyncio.Event()
        self._closed: set[int] = set()
        self._timed_out: set[int] = set()
        self._verdicts: dict[bytes, bool] = {}
        self._signed_proposals: dict[int, SignedProposal] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._names = {member.public_key: member.name for member in committee.members}

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        """Resume after the last committed round."""
        now_round = max(self._committee.round_at(self._clock.now_ms()), 0)
        if self._solo:
            first_round, beacon = await self._store(
                lambda store: self._chain.resume_point(store, now_round)
            )
        else:
            first_round, beacon = await self._store(
                lambda store: self._chain.resume_point(store, -1)
            )
        self._machine = RoundMachine(
            self._committee,
            self._signer.key.public_key,
            self._signer,
            records_agree=self._agree,
            first_round=first_round,
            beacon=beacon,
        )
        actions: list[Action] = []
        for number in range(first_round, first_round + 8):

            def signed(store: Store, n: int = number) -> tuple[bytes | None, bytes | None]:
                return store.signed_vote(n), store.signed_proposal(n)

            vote, proposal = await self._store(signed)
            if proposal is not None:
                actions += self._machine.restore_proposal(decode_proposal(proposal))
            if vote is not None:
                actions += self._machine.restore_vote(decode_vote(vote))
        await self._chain.advanced(first_round, beacon)
        self._metrics.finalized_round.set(first_round - 1)
        log.info(
            "event=rounds_resumed next_round=%d beacon=%s members=%d",
            first_round,
            beacon.hex()[:16],
            len(self._committee.members),
        )
        async with self._lock:
            await self._perform(actions)

    @property
    def machine(self) -> RoundMachine:
        assert self._machine is not None, "start() first"
        return self._machine

    def _agree(self, records: Any) -> bool:
        return self._verdicts.get(_records_key(records), False)

    # -- the clock -----------------------------------------------------------

    async def run(self) -> None:
        """Close each round when the clock passes its end; time out silent rounds."""
        timeout_ms = int(self._config.rounds.finality_timeout_s * 1000)
        while True:
            round_number = self.machine.next_round
            now = self._clock.now_ms()
            clock_round = max(self._committee.round_at(now), 0)
            self._metrics.round.set(clock_round)
            self._metrics.sync_lag.set(max(clock_round - round_number, 0))
            end = self._committee.round_end_ms(round_number)
            if now < end:
                await self._wait_progress((end - now) / 1000)
                continue
            if round_number not in self._closed:
                await self.close_round(round_number)
                continue
            deadline = end + timeout_ms
            if now >= deadline and round_number not in self._timed_out:
                self._timed_out.add(round_number)
                async with self._lock:
                    await self._perform(self.machine.timeout(round_number))
                continue
            await self._wait_progress(max(deadline - now, 200) / 1000)

    async def _wait_progress(self, seconds: float) -> None:
        self._progress.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._progress.wait()
        except TimeoutError:
            pass

    async def close_round(self, round_number: int) -> None:
        """The clock passed the end of ``round_number`` (the next round to finalize)."""
        self._closed.add(round_number)
        records: list[bytes] = []
        if self.machine.leader.public_key == self._signer.key.public_key:
            records = await self._leader_records(round_number)
        async with self._lock:
            await self._perform(self.machine.round_closed(round_number, records))

    async def _leader_records(self, round_number: int) -> list[bytes]:
        started = time.perf_counter()
        accepted = await self._store(lambda store: store.submissions_in(State.ACCEPTED))
        oldest = round_number - self._config.rounds.expiry_rounds
        candidates = [
            Candidate(s.id, s.submitter, Prepared.from_bytes(s.prepared))
            for s in accepted
            if s.prepared is not None and (self._solo or (s.intake_round or 0) >= oldest)
        ]
        async with self._history_lock:
            records = await asyncio.to_thread(
                score_round, candidates, self._history, self._config.scoring
            )
        self._metrics.stage_seconds.labels(stage="score").observe(time.perf_counter() - started)
        return [record.to_bytes() for record in records]

    # -- the bus -------------------------------------------------------------

    async def on_message(self, topic: str, payload: bytes) -> None:
        """A consensus or sync message; returns at once (work runs in the background)."""
        prefix = self._topics.prefix
        try:
            if topic == f"{prefix}/consensus/votes":
                signed_vote = decode_vote(payload)
                async with self._lock:
                    actions = self.machine.vote_received(signed_vote)
                    if not any(isinstance(a, Rejected) for a in actions):
                        self._metrics.votes.labels(
                            member=self._names.get(signed_vote.signer, "unknown")
                        ).inc()
                    await self._perform(actions)
            elif topic == f"{prefix}/consensus/proposals":
                self._spawn(self._on_proposal(decode_proposal(payload)))
            elif topic == f"{prefix}/consensus/evidence":
                log.debug("event=evidence_seen bytes=%d", len(payload))
            elif self._sync is not None and topic == self._sync.request_topic:
                self._spawn(self._sync.on_request(payload))
            elif self._sync is not None and topic == self._sync.reply_topic:
                await self._sync.on_reply(payload)
        except ConsensusWireError as error:
            log.warning("event=bad_consensus_message topic=%s error=%r", topic, str(error))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:  # one message's failure never stops the node
                log.exception("event=consensus_task_failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_proposal(self, signed: SignedProposal) -> None:
        round_number = signed.round
        if self._committee.member(signed.signer) is None:
            return
        deadline = self._committee.round_end_ms(round_number) + int(
            self._config.rounds.finality_timeout_s * 1000
        )
        # Records are scored against the history after round r - 1: wait for it.
        while self.machine.next_round < round_number and self._clock.now_ms() < deadline:
            await self._wait_progress(0.1)
        if self.machine.next_round > round_number:
            return
        key = _records_key(signed.proposal.records)
        if key not in self._verdicts and self._verifier is not None:
            try:
                await self._verifier.check(signed.proposal.records)
                self._verdicts[key] = True
            except Mismatch as mismatch:
                self._verdicts[key] = False
                self._metrics.record_mismatches.inc()
                log.warning(
                    "event=record_mismatch round=%d leader=%s why=%r",
                    round_number,
                    self._names.get(signed.signer, signed.signer.hex()[:16]),
                    str(mismatch),
                )
        async with self._lock:
            self._signed_proposals.setdefault(round_number, signed)
            await self._perform(self.machine.proposal_received(signed))

    async def sync_loop(self) -> None:
        """Fetch certified rounds from peers while this node lags behind the clock."""
        if self._sync is None:
            return
        while True:
            clock_round = max(self._committee.round_at(self._clock.now_ms()), 0)
            behind = clock_round - self.machine.next_round
            if behind >= 2:
                fetched = await self._sync.fetch_rounds(
                    self.machine.next_round, self._config.consensus.sync_timeout_s
                )
                for entry in fetched:
                    if entry.round != self.machine.next_round:
                        continue
                    try:
                        certificate = decode_certificate(entry.certificate)
                        signed = (
                            decode_proposal(entry.proposal) if entry.proposal is not None else None
                        )
                    except ConsensusWireError as error:
                        log.warning(
                            "event=sync_bad_round round=%d error=%r", entry.round, str(error)
                        )
                        break
                    async with self._lock:
                        if signed is not None:
                            self._signed_proposals[entry.round] = signed
                        actions = self.machine.certificate_received(
                            certificate, None if signed is None else signed.proposal
                        )
                        await self._perform(actions)
                    if any(isinstance(a, Rejected) for a in actions):
                        log.warning(
                            "event=sync_round_refused round=%d actions=%r", entry.round, actions
                        )
                        break
                if fetched:
                    continue
            await asyncio.sleep(self._committee.round_seconds / 2)

    # -- performing actions --------------------------------------------------

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                await self._broadcast(action)
            elif isinstance(action, Commit):
                await self._commit(action)
            elif isinstance(action, Equivocation):
                await self._equivocation(action)
            elif isinstance(action, FetchProposal):
                self._spawn(self._fetch_certified(action))
            else:
                log.debug("event=consensus_rejected action=%r", action)

    async def _broadcast(self, action: Broadcast) -> None:
        body = dict(action.body)
        payload = pack({**body, "sig": action.signature})
        round_number = int(body["round"])  # type: ignore[call-overload]
        # What this validator signed is durable before anybody can see it.
        if action.domain == Vote.DOMAIN:
            await self._store(lambda store: store.record_vote(round_number, payload))
            topic = f"{self._topics.prefix}/consensus/votes"
        else:
            await self._store(lambda store: store.record_proposal(round_number, payload))
            topic = f"{self._topics.prefix}/consensus/proposals"
        if not self._solo:
            outgoing = Outgoing(topic, payload)
            await self._store(lambda store: store.enqueue([outgoing]))
            self._on_outbox()

    async def _equivocation(self, action: Equivocation) -> None:
        evidence = action.evidence
        payload = pack(evidence.body())
        now = self._clock.now_ms()
        fresh = await self._store(
            lambda store: store.record_evidence(evidence.round, evidence.offender, payload, now)
        )
        if fresh:
            self._metrics.equivocations.inc()
            log.warning(
                "event=equivocation offender=%s round=%d kind=%s",
                self._names.get(evidence.offender, evidence.offender.hex()[:16]),
                evidence.round,
                evidence.kind,
            )
            outgoing = Outgoing(f"{self._topics.prefix}/consensus/evidence", payload)
            await self._store(lambda store: store.enqueue([outgoing]))
            self._on_outbox()

    async def _fetch_certified(self, action: FetchProposal) -> None:
        if self._sync is None:
            return
        for entry in await self._sync.fetch_rounds(
            action.round, self._config.consensus.sync_timeout_s
        ):
            if entry.round == action.round and entry.proposal is not None:
                try:
                    proposal = decode_proposal(entry.proposal)
                except ConsensusWireError:
                    continue
                async with self._lock:
                    self._signed_proposals[action.round] = proposal
                    await self._perform(
                        self.machine.certificate_received(action.certificate, proposal.proposal)
                    )
                return

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
        outgoing += await self._expire(commit.round, {r.submission_id for r in records}, outcomes)
        summary = self._summary(commit, records)
        outgoing.append(Outgoing(self._topics.round(commit.round), summary, retain=True))
        proposal_bytes = None
        if commit.proposal is not None:
            own = await self._store(lambda store: store.signed_proposal(commit.round))
            proposal_bytes = self._proposal_bytes(commit, own)
        committed = CommittedRound(
            commit.round,
            commit.certificate.proposal_hash,
            commit.beacon_after,
            encode_certificate(commit.certificate),
            summary,
            proposal_bytes,
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
            async with self._history_lock:
                self._history.add(np.stack(vectors))
        await self._chain.advanced(commit.round + 1, commit.beacon_after)
        for old in [n for n in self._signed_proposals if n <= commit.round]:
            del self._signed_proposals[old]
        self._closed.discard(commit.round)
        self._timed_out.discard(commit.round)
        self._account(commit, records, now, started)
        self._progress.set()
        self._on_outbox()

    def _proposal_bytes(self, commit: Commit, own: bytes | None) -> bytes | None:
        """The signed proposal certified by ``commit``, kept for sync and audit."""
        candidates = [decode_proposal(own)] if own is not None else []
        received = self._signed_proposals.get(commit.round)
        if received is not None:
            candidates.append(received)
        for signed in candidates:
            if signed.proposal == commit.proposal:
                return encode_proposal(signed)
        return None

    async def _expire(
        self, round_number: int, certified: set[bytes], outcomes: list[Finalization]
    ) -> list[Outgoing]:
        """Pending submissions no certified round took in time are ``expired``."""
        if self._solo:
            return []
        oldest = round_number - self._config.rounds.expiry_rounds - 1
        accepted = await self._store(lambda store: store.submissions_in(State.ACCEPTED))
        outgoing = []
        me = self._signer.key.public_key
        for stored in accepted:
            if stored.id in certified or (stored.intake_round or 0) >= oldest:
                continue
            outcomes.append(
                Finalization(
                    stored.id, stored.submitter, State.REJECTED, str(Reason.EXPIRED), (), 0
                )
            )
            result = Result(stored.id, me, Status.REJECTED, Reason.EXPIRED, round_number)
            outgoing.append(
                Outgoing(
                    self._topics.results(stored.submitter),
                    self._signer.signed_bytes(RESULT_DOMAIN.decode(), result.body()),
                )
            )
            self._metrics.rejections.labels(reason=str(Reason.EXPIRED)).inc()
        return outgoing

    def _account(
        self, commit: Commit, records: list[RoundRecord], now: int, started: float
    ) -> None:
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
        self._metrics.finality_seconds.observe(
            max(now - self._committee.round_end_ms(commit.round), 0) / 1000
        )
        if records:
            log.info(
                "event=round_final round=%d submissions=%d paid=%d history=%d",
                commit.round,
                len(records),
                paid,
                len(self._history),
            )
        elif commit.proposal is None:
            log.info("event=round_skipped round=%d", commit.round)

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


def _records_key(records: Any) -> bytes:
    return pack(list(records))
