"""The round driver: the executor of ``consensus.RoundMachine``'s actions.

It feeds the machine the clock (``round_closed``, timeouts) and the bus
(proposals, votes, certificates from sync) and performs what the machine
asks, in order: a signed message is stored before it is sent; a proposal's
records are built and a proposer's records are verified off the event loop
(``node.rounds.records`` and ``node.rounds.verify``); a commit writes the
certified records in one store transaction — submission states, history,
ledger, the final Results, the retained ``RoundSummary`` and the retained
``Balance`` of each submitter the round paid. All decisions are
the machine's; this module only does I/O.

Crash-only: a commit the store cannot write stops the process (the machine
has already moved on); the restarted node resumes from the store, replaying
what it signed so that it never signs anything different.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from consensus.actions import (
    Action,
    Broadcast,
    BuildProposal,
    CatchUp,
    Commit,
    Equivocation,
    FetchValue,
    Rejected,
    ScheduleTimeout,
    Step,
    VerifyProposal,
)
from consensus.committee import Committee
from consensus.messages import SignedProposal, SignedVote
from consensus.round import RoundMachine, Timeouts
from node.bus.client import Topics
from node.errors import EncoderUnavailable, Reason
from node.intake.admission import SYSTEM_CLOCK, Clock
from node.intake.signing import MessageSigner
from node.intake.wire import BALANCE_DOMAIN, RESULT_DOMAIN, Balance, Result, Status
from node.ops.config import Config
from node.ops.metrics import Metrics
from node.ops.threads import thread_cpu_timed
from node.rounds.chain import BeaconChain
from node.rounds.consensus_wire import (
    ConsensusWireError,
    decode_certificate,
    decode_evidence,
    decode_proposal,
    decode_signed,
    decode_vote,
    encode_certificate,
    encode_evidence,
    encode_signed,
)
from node.rounds.records import (
    Candidate,
    Mismatch,
    Prepared,
    RoundRecord,
    RoundRules,
    Transient,
    from_float16,
    proposal_bytes_max,
    score_round,
)
from node.rounds.sync import FetchedRound, SyncService
from node.rounds.verify import RecordVerifier
from node.store.sqlite import CommittedRound, Finalization, Outgoing, State, store_failed
from node.store.thread import StoreThread
from rewards.history import History

log = logging.getLogger("poc.rounds")

SUMMARY_DOMAIN = "poc/v1/round-summary"
EXIT_STORE_FAILED = 70
"""Exit status when the store cannot write: a certified round it cannot commit, or a
submission it cannot keep (crash-only recovery)."""
BYTES_WANTED_MAX = 4096
"""At most this many certified submissions' bytes are remembered as wanted from peers."""

Publish = Callable[[str, bytes], Awaitable[None]]
Committed = Callable[[int, list[tuple[bytes, int]], set[bytes]], None]
"""Told of each committed round: its number, the (submission id, item) of each item that
joined the history, in the order it joined, and the ids of the submissions it paid."""


def timeouts_of(config: Config) -> Timeouts:
    section = config.consensus
    return Timeouts(
        propose_ms=int(section.propose_timeout_s * 1000),
        prevote_ms=int(section.prevote_timeout_s * 1000),
        precommit_ms=int(section.precommit_timeout_s * 1000),
        delta_ms=int(section.timeout_delta_s * 1000),
        max_ms=int(section.max_timeout_s * 1000),
    )


def balance_messages(
    signer: MessageSigner, topics: Topics, round_number: int, totals: Mapping[bytes, int]
) -> list[Outgoing]:
    """The retained, signed ``Balance`` of each submitter in ``totals`` as of ``round_number``.

    ``totals`` are read from the certified ledger inside the commit's
    transaction, so every member signs the same values; each member has its
    own topic (MQTT keeps one retained message per topic).
    """
    me = signer.key.public_key
    return [
        Outgoing(
            topics.balance(submitter, me),
            signer.signed_bytes(
                BALANCE_DOMAIN.decode(), Balance(submitter, round_number, total, me).body()
            ),
            retain=True,
        )
        for submitter, total in totals.items()
    ]


class RoundDriver:
    """Drives one validator's rounds."""

    def __init__(
        self,
        config: Config,
        committee: Committee,
        signer: MessageSigner,
        store: StoreThread,
        history: History,
        rules: RoundRules,
        chain: BeaconChain,
        metrics: Metrics,
        topics: Topics,
        on_outbox: Callable[[], None],
        *,
        verifier: RecordVerifier | None = None,
        sync: SyncService | None = None,
        publish: Publish | None = None,
        history_lock: asyncio.Lock | None = None,
        clock: Clock = SYSTEM_CLOCK,
        on_committed: Committed | None = None,
    ) -> None:
        self._config = config
        self._on_committed = on_committed
        self._committee = committee
        self._signer = signer
        self._store = store
        self._history = history
        self._rules = rules
        self._chain = chain
        self._metrics = metrics
        self._topics = topics
        self._on_outbox = on_outbox
        self._verifier = verifier
        self._sync = sync
        self._publish = publish
        self._clock = clock
        self._machine: RoundMachine | None = None
        self._solo = len(committee.members) == 1
        self._lock = asyncio.Lock()
        self._history_lock = history_lock or asyncio.Lock()
        self._progress = asyncio.Event()
        self._catch_up = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self._names = {member.public_key: member.name for member in committee.members}
        self._decided_at = time.monotonic()
        # Submissions certified here whose bytes neither peers nor the bus have given
        # yet (rounds learned by sync): asked for again after every commit.
        self._bytes_wanted: set[bytes] = set()
        self._fetching_bytes = False
        self._proposal_bytes = proposal_bytes_max(config.rounds.max_records, history.dim)

    # -- start ---------------------------------------------------------------

    async def start(self) -> None:
        """Resume after the last committed round, with what this member signed before."""
        now_round = max(self._committee.round_at(self._clock.now_ms()), 0)
        target = now_round if self._solo else -1
        first_round, beacon = await self._store.call(
            lambda store: self._chain.resume_point(store, target)
        )
        self._machine = RoundMachine(
            self._committee,
            self._signer.key.public_key,
            self._signer,
            timeouts=timeouts_of(self._config),
            first_round=first_round,
            beacon=beacon,
        )
        signed = await self._store.signed_since(first_round)
        restored = []
        for raw in signed:
            try:
                restored.append(decode_signed(raw))
            except ConsensusWireError as error:
                log.error("event=stored_message_unreadable error=%r", str(error))
        await self._chain.advanced(first_round, beacon)
        self._metrics.finalized_round.set(first_round - 1)
        if self._sync is not None and not self._solo:  # what a stop left unfetched
            self._bytes_wanted = set(
                await self._store.call(lambda db: db.finals_without_bytes(BYTES_WANTED_MAX))
            )
            self._metrics.sync_bytes_wanted.set(len(self._bytes_wanted))
        log.info(
            "event=rounds_resumed next_round=%d beacon=%s members=%d restored_messages=%d",
            first_round,
            beacon.hex()[:16],
            len(self._committee.members),
            len(restored),
        )
        async with self._lock:
            await self._perform(self.machine.restore(restored))

    @property
    def machine(self) -> RoundMachine:
        assert self._machine is not None, "start() first"
        return self._machine

    # -- the clock -----------------------------------------------------------

    async def run(self) -> None:
        """Tell the machine when the clock passes the end of the round it is deciding."""
        while True:
            round_number = self.machine.next_round
            now = self._clock.now_ms()
            clock_round = max(self._committee.round_at(now), 0)
            self._metrics.round.set(clock_round)
            self._metrics.sync_lag.set(max(clock_round - round_number, 0))
            self._metrics.view.set(self.machine.view)
            end = self._committee.round_end_ms(round_number)
            if now < end:
                await self._wait_progress((end - now) / 1000)
                continue
            if not self.machine.started:
                async with self._lock:
                    await self._perform(self.machine.round_closed(round_number))
                continue
            await self._wait_progress(1.0)

    async def _wait_progress(self, seconds: float) -> None:
        self._progress.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._progress.wait()
        except TimeoutError:
            pass

    async def rebroadcast_loop(self) -> None:
        """Send again, while the round is undecided, what lets the others decide it.

        The protocol's liveness assumes that messages between honest members
        eventually arrive (``RoundMachine.relay_messages``); a member that was
        disconnected, frozen or started late gets them again this way.
        """
        if self._solo or self._publish is None:
            return
        period = self._config.consensus.rebroadcast_s
        while True:
            await asyncio.sleep(period)
            if time.monotonic() - self._decided_at < period:
                continue
            for message in self.machine.relay_messages():
                await self._send(message)

    # -- the bus -------------------------------------------------------------

    async def on_message(self, topic: str, payload: bytes) -> None:
        """A consensus or sync message; returns quickly (recomputation runs in the background)."""
        prefix = self._topics.prefix
        try:
            if self._too_large(topic, payload):
                return
            if topic == f"{prefix}/consensus/votes":
                vote = decode_vote(payload)
                async with self._lock:
                    actions = self.machine.vote_received(vote)
                    if not any(isinstance(a, Rejected) for a in actions):
                        self._metrics.votes.labels(member=self._name(vote.signer)).inc()
                    await self._perform(actions)
            elif topic == f"{prefix}/consensus/proposals":
                proposal = decode_proposal(payload)
                async with self._lock:
                    await self._perform(self.machine.proposal_received(proposal))
            elif topic == f"{prefix}/consensus/evidence":
                await self._evidence_received(payload)
            elif self._sync is not None and topic == self._sync.request_topic:
                self._spawn(self._sync.on_request(payload))
            elif self._sync is not None and topic == self._sync.reply_topic:
                await self._sync.on_reply(payload)
        except ConsensusWireError as error:
            self._metrics.consensus_rejected.labels(reason="malformed").inc()
            log.info("event=bad_consensus_message topic=%s error=%r", topic, str(error))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if store_failed(error):
                raise  # nothing more can be kept: stop, unacknowledged
            # An error of the node's own on one message: that message is dropped (and
            # acknowledged). Escaping, it ended the node, and the broker's redelivery of
            # the unacknowledged message ended it again on every restart.
            self._metrics.internal_errors.labels(stage="consensus").inc()
            log.error(
                "event=consensus_message_failed topic=%s bytes=%d error=%r",
                topic,
                len(payload),
                error,
                exc_info=error,
            )

    def _too_large(self, topic: str, payload: bytes) -> bool:
        """A proposal, or evidence (two of them), larger than an honest member's can be.

        Refused before decoding: held for a future round, such proposals would
        let one member pin gigabytes in every peer (the codec's own limit is
        64 MiB a message), and evidence of them would fill the disk.
        """
        prefix = self._topics.prefix
        if topic == f"{prefix}/consensus/proposals":
            limit = self._proposal_bytes
        elif topic == f"{prefix}/consensus/evidence":
            limit = 2 * self._proposal_bytes + 4096
        else:
            return False
        if len(payload) <= limit:
            return False
        self._metrics.consensus_rejected.labels(reason="too_large").inc()
        log.info(
            "event=bad_consensus_message topic=%s bytes=%d limit=%d", topic, len(payload), limit
        )
        return True

    def background_tasks(self) -> list[asyncio.Task[None]]:
        """The tasks the driver runs beside its loops (builds and checks of values)."""
        return list(self._background)

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception:  # one message's failure never stops the node
                log.exception("event=consensus_task_failed")

        task = asyncio.create_task(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def sync_loop(self) -> None:
        """Fetch certified rounds while this member lags: behind the clock, or told so."""
        if self._sync is None:
            return
        while True:
            clock_round = max(self._committee.round_at(self._clock.now_ms()), 0)
            if clock_round - self.machine.next_round >= 2 or self._catch_up.is_set():
                self._catch_up.clear()
                if await self._sync_from(self.machine.next_round):
                    continue
            try:
                async with asyncio.timeout(max(self._committee.round_seconds / 2, 0.5)):
                    await self._catch_up.wait()
            except TimeoutError:
                pass

    def _valid_round(self, fetched: FetchedRound) -> bool:
        try:
            certificate = decode_certificate(fetched.certificate)
            signed = decode_proposal(fetched.proposal)
        except ConsensusWireError:
            return False
        return (
            certificate.round == fetched.round
            and signed.round == fetched.round
            and certificate.why_invalid(self._committee, self._signer) is None
            and signed.proposal.value.digest(self._signer) == certificate.value_hash
            and signed.verify(self._signer)
            # a reply is checked for the next round only, whose beacon names proposers
            and signed.signer == self.machine.proposer(signed.view).public_key
        )

    async def _sync_from(self, first: int) -> bool:
        """Apply finalized rounds from ``first`` on; whether any was applied."""
        assert self._sync is not None
        fetched = await self._sync.fetch_rounds(
            first, self._config.consensus.sync_timeout_s, self._valid_round
        )
        applied = False
        for entry in fetched:
            # The machine verifies each certificate and proposal before it commits
            # (``certificate_received``); the reply's first round was checked once
            # more, to choose the reply.
            if entry.round != self.machine.next_round:
                break
            try:
                certificate = decode_certificate(entry.certificate)
                signed = decode_proposal(entry.proposal)
            except ConsensusWireError:
                break
            async with self._lock:
                actions = self.machine.certificate_received(certificate, signed)
                await self._perform(actions)
            if any(isinstance(a, Rejected) for a in actions):
                break
            applied = True
        return applied

    async def _evidence_received(self, payload: bytes) -> None:
        evidence = decode_evidence(payload)
        why = self.machine.evidence_out_of_window(evidence.round) or evidence.why_invalid(
            self._committee, self._signer
        )
        if why is not None:
            self._metrics.consensus_rejected.labels(reason=f"evidence_{why}").inc()
            log.info("event=evidence_refused why=%s", why)
            return
        await self._record_evidence(evidence, publish=False)

    # -- performing actions --------------------------------------------------

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Broadcast):
                await self._broadcast(action.message)
            elif isinstance(action, ScheduleTimeout):
                self._schedule(action)
            elif isinstance(action, BuildProposal):
                self._spawn(self._build(action))
            elif isinstance(action, VerifyProposal):
                self._spawn(self._verify(action))
            elif isinstance(action, Commit):
                await self._commit_or_die(action)
            elif isinstance(action, FetchValue | CatchUp):
                self._catch_up.set()
            elif isinstance(action, Equivocation):
                await self._record_evidence(action.evidence, publish=True)
            else:
                self._metrics.consensus_rejected.labels(reason=action.reason).inc()
                log.debug("event=consensus_rejected action=%r", action)

    async def _broadcast(self, message: SignedProposal | SignedVote) -> None:
        """Store what this member signed, then send it (a committee of one sends nothing)."""
        payload = encode_signed(message)
        kept = await self._store.record_signed(message.round, message.view, message.kind, payload)
        if kept != payload:  # pragma: no cover - the machine never signs twice
            log.error("event=signed_twice round=%d view=%d", message.round, message.view)
            return
        await self._send(message)

    async def _send(self, message: SignedProposal | SignedVote) -> None:
        if self._solo or self._publish is None:
            return
        kind = "proposals" if isinstance(message, SignedProposal) else "votes"
        await self._publish(f"{self._topics.prefix}/consensus/{kind}", encode_signed(message))

    def _schedule(self, action: ScheduleTimeout) -> None:
        """A timeout that fires after the machine moved on is ignored by it."""
        asyncio.get_running_loop().call_later(
            action.delay_ms / 1000,
            lambda: self._spawn(self._timeout(action.step, action.round, action.view)),
        )

    async def _timeout(self, step: Step, round_number: int, view: int) -> None:
        async with self._lock:
            await self._perform(self.machine.timeout(step, round_number, view))

    async def _build(self, action: BuildProposal) -> None:
        records = await self._proposal_records(action.round)
        async with self._lock:
            await self._perform(self.machine.proposal_built(action.round, action.view, records))

    async def _proposal_records(self, round_number: int) -> list[bytes]:
        """This member's records for ``round_number``: the oldest accepted submissions, scored.

        At most ``rounds.max_records`` of them, so that a value stays below the
        broker's packet limit and its check within the propose timeout under a
        flood; the others wait for the next rounds (or expire).
        """
        started = time.perf_counter()
        oldest = None if self._solo else round_number - self._config.rounds.expiry_rounds
        waiting = await self._store.waiting(self._config.rounds.max_records, oldest)
        score_cpu = self._metrics.stage_cpu.labels(stage="score").inc
        cpu_started = time.thread_time()  # reading the candidates on the loop is scoring's
        candidates = [  # oldest first
            Candidate(s.id, s.submitter, Prepared.from_bytes(s.prepared)) for s in waiting
        ]
        score_cpu(time.thread_time() - cpu_started)
        certified = await self._store.accepted_hashes(
            [item.sha256 for candidate in candidates for item in candidate.prepared.items]
        )

        async def scored(candidates: list[Candidate]) -> list[RoundRecord]:
            async with self._history_lock:
                return await asyncio.to_thread(
                    thread_cpu_timed,
                    score_cpu,
                    score_round,
                    candidates,
                    self._history,
                    self._rules,
                    certified,
                )

        records = await scored(candidates)
        # Never propose what this member would refuse: left out, they expire. (A
        # committee of one has no other member to refuse, and nothing expires there.)
        checker = None if self._solo else self._verifier
        refused = (  # a few ms for a full round: off the loop, like scoring
            {}
            if checker is None
            else await asyncio.to_thread(checker.own_refusals, candidates, records)
        )
        if refused:
            for identity, why in refused.items():
                self._metrics.internal_errors.labels(stage="consensus").inc()
                log.error(
                    "event=proposal_self_check_failed round=%d submission=%s why=%r",
                    round_number,
                    identity.hex()[:16],
                    why,
                )
            records = await scored([c for c in candidates if c.submission_id not in refused])
        self._metrics.stage_seconds.labels(stage="score").observe(time.perf_counter() - started)
        cpu_started = time.thread_time()
        encoded = [record.to_bytes() for record in records]
        score_cpu(time.thread_time() - cpu_started)
        return encoded

    async def _verify(self, action: VerifyProposal) -> None:
        ok = self._verifier is None
        lasting = True
        if self._verifier is not None:
            try:
                await self._verifier.check(action.records, round_number=action.round)
                ok = True
            except Mismatch as mismatch:
                lasting = not isinstance(mismatch, Transient)
                if action.round < self.machine.next_round:
                    return  # decided meanwhile (certified by the others): moot
                self._metrics.record_mismatches.inc()
                log.warning(
                    "event=record_mismatch round=%d view=%d proposer=%s why=%r",
                    action.round,
                    action.view,
                    self._name(self.machine.proposer(action.view).public_key)
                    if action.round == self.machine.next_round
                    else "?",
                    str(mismatch),
                )
            except Exception as error:
                # Not a judgement of the value (the encoders died under it, the store
                # failed, a defect of the node's own): unanswered, the value stayed
                # "being verified" for the rest of the round and was never asked again.
                # (A store that cannot write ends the node at its next commit.)
                lasting = False
                if isinstance(error, EncoderUnavailable):
                    log.warning(
                        "event=verify_unavailable round=%d view=%d error=%r",
                        action.round,
                        action.view,
                        str(error),
                    )
                else:
                    self._metrics.internal_errors.labels(stage="consensus").inc()
                    log.exception("event=verify_failed round=%d view=%d", action.round, action.view)
        async with self._lock:
            await self._perform(
                self.machine.value_verified(action.round, action.value_hash, ok, lasting=lasting)
            )

    async def _record_evidence(self, evidence: Any, *, publish: bool) -> None:
        payload = encode_evidence(evidence)
        now = self._clock.now_ms()
        fresh = await self._store.record_evidence(
            evidence.round, evidence.view, evidence.kind, evidence.offender, payload, now
        )
        if not fresh:
            return
        self._metrics.equivocations.labels(member=self._name(evidence.offender)).inc()
        log.warning(
            "event=equivocation offender=%s round=%d view=%d kind=%s",
            self._name(evidence.offender),
            evidence.round,
            evidence.view,
            evidence.kind,
        )
        if publish and self._publish is not None and not self._solo:
            await self._publish(f"{self._topics.prefix}/consensus/evidence", payload)

    # -- commit --------------------------------------------------------------

    async def _commit_or_die(self, commit: Commit) -> None:
        try:
            await self._commit(commit)
        except Exception:
            # The machine has moved past this round: continuing would diverge
            # from the store. Crash-only: exit, and recover from the store.
            log.critical("event=commit_failed round=%d; exiting to recover", commit.round)
            logging.shutdown()
            os._exit(EXIT_STORE_FAILED)

    async def _commit(self, commit: Commit) -> None:
        started = time.perf_counter()
        # The loop's CPU for this round, counted as "commit": its synchronous
        # parts only (an await lets other work run on this thread).
        cpu_started = time.thread_time()
        records = [RoundRecord.from_bytes(raw) for raw in commit.value.records]
        ids = [record.submission_id for record in records]
        cpu = time.thread_time() - cpu_started
        decided = await self._store.decided_states(ids)
        me = self._signer.key.public_key
        outcomes = []
        outgoing = []
        cpu_started = time.thread_time()
        for record in records:
            final = record.status == "final"
            outcomes.append(
                Finalization(
                    record.submission_id,
                    record.submitter,
                    State.FINAL if final else State.REJECTED,
                    None if record.reason is None else str(record.reason),
                    record.history_items,
                    record.accepted_hashes,
                    record.reward,
                    record.own_items,
                )
            )
            if record.submission_id in decided:
                log.warning(
                    "event=certified_record_for_decided_submission round=%d submission=%s state=%s",
                    commit.round,
                    record.submission_id.hex()[:16],
                    decided[record.submission_id],
                )
                continue
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
        cpu += time.thread_time() - cpu_started
        outgoing += await self._expire(commit.round, set(ids), outcomes)
        cpu_started = time.thread_time()
        summary = self._summary(commit, records)
        outgoing.append(Outgoing(self._topics.round(commit.round), summary, retain=True))
        retention = self._config.rounds.summary_retention_rounds
        if commit.round >= retention:  # an empty retained message clears the old summary
            outgoing.append(Outgoing(self._topics.round(commit.round - retention), b"", True))
        committed = CommittedRound(
            commit.round,
            commit.value_hash,
            commit.beacon_after,
            encode_certificate(commit.certificate),
            summary,
            None if commit.proposal is None else encode_signed(commit.proposal),
        )
        now = self._clock.now_ms()
        cpu += time.thread_time() - cpu_started
        self._metrics.stage_cpu.labels(stage="commit").inc(cpu)

        epoch_beacon = (
            (self._committee.epoch_of(commit.round + 1), commit.beacon_after)
            if (commit.round + 1) % self._committee.epoch_rounds == 0
            else None
        )
        if not await self._store.commit_round(
            committed,
            outcomes,
            outgoing,
            now,
            prune_signed_before=commit.round - 2,
            epoch_beacon=epoch_beacon,
            balance_messages=lambda totals: balance_messages(
                self._signer, self._topics, commit.round, totals
            ),
        ):
            log.warning("event=round_already_committed round=%d", commit.round)
            return
        joining = [
            (record.submission_id, item)
            for record in records
            if decided.get(record.submission_id) is not State.FINAL  # already in the history
            for item in record.history_items
        ]
        joined = [item for _, item in joining]
        own = [
            item
            for record in records
            if decided.get(record.submission_id) is not State.FINAL
            for item in record.own_items
        ]
        if joined:
            async with self._history_lock:
                self._history.add(
                    [modality for _, modality, _ in joined],
                    np.stack([from_float16(vector) for _, _, vector in joined]),
                )
                if own:
                    self._history.add_own(
                        [modality for _, modality, _ in own],
                        np.stack([from_float16(vector) for _, _, vector in own]),
                    )
        if self._on_committed is not None:  # no await since the add: still in step with H
            self._on_committed(
                commit.round,
                [(identity, item[0]) for identity, item in joining],
                {record.submission_id for record in records if record.reward > 0},
            )
        await self._chain.advanced(commit.round + 1, commit.beacon_after)
        if self._sync is not None:
            missing = await self._store.missing_raw(ids)
            room = BYTES_WANTED_MAX - len(self._bytes_wanted)
            self._bytes_wanted.update(missing[: max(room, 0)])
            self._metrics.sync_bytes_wanted.set(len(self._bytes_wanted))
            if self._bytes_wanted and not self._fetching_bytes:  # one request at a time
                self._fetching_bytes = True
                self._spawn(self._fetch_bytes())
        self._decided_at = time.monotonic()
        self._account(commit, records, now, started)
        self._progress.set()
        self._on_outbox()

    async def _fetch_bytes(self) -> None:
        """Ask peers for the bytes of submissions certified here without them.

        What no peer answers in time stays wanted: it is asked for again after the
        next commit, unless the bus delivered it meanwhile (the intake's ``keep_raw``).
        """
        assert self._sync is not None
        try:
            asked = sorted(self._bytes_wanted)
            missing = await self._store.missing_raw(asked)
            self._bytes_wanted.difference_update(set(asked) - set(missing))  # kept since
            found = await self._sync.fetch_submissions(
                missing, self._config.consensus.sync_timeout_s
            )
            for identity, raw in found.items():  # only bytes hashing to their ids
                await self._store.keep_raw(identity, raw)
            self._bytes_wanted.difference_update(found)
        finally:
            self._fetching_bytes = False
            self._metrics.sync_bytes_wanted.set(len(self._bytes_wanted))
        if len(found) < len(missing):
            log.info(
                "event=certified_bytes_missing count=%d (asked for again after the next "
                "round, or kept when they arrive)",
                len(missing) - len(found),
            )

    async def _expire(
        self, round_number: int, certified: set[bytes], outcomes: list[Finalization]
    ) -> list[Outgoing]:
        """Pending submissions no certified round took in time are ``expired``."""
        if self._solo:
            return []
        oldest = round_number - self._config.rounds.expiry_rounds - 1
        outgoing = []
        me = self._signer.key.public_key
        for identity, submitter in await self._store.expiring(oldest):
            if identity in certified:
                continue
            outcomes.append(
                Finalization(identity, submitter, State.REJECTED, str(Reason.EXPIRED), (), (), 0)
            )
            result = Result(identity, me, Status.REJECTED, Reason.EXPIRED, round_number)
            outgoing.append(
                Outgoing(
                    self._topics.results(submitter),
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
            if record.reason is not None:  # judged with its round: pair_too_far, duplicate
                self._metrics.rejections.labels(reason=str(record.reason)).inc()
        self._metrics.rewards.inc(paid)
        self._metrics.rounds.labels(outcome="final" if records else "empty").inc()
        self._metrics.decided_view.observe(commit.certificate.view)
        self._metrics.finalized_round.set(commit.round)
        self._metrics.history_size.set(len(self._history))
        self._metrics.stage_seconds.labels(stage="commit").observe(time.perf_counter() - started)
        self._metrics.finality_seconds.observe(
            max(now - self._committee.round_end_ms(commit.round), 0) / 1000
        )
        if records:
            log.info(
                "event=round_final round=%d view=%d submissions=%d paid=%d history=%d",
                commit.round,
                commit.certificate.view,
                len(records),
                paid,
                len(self._history),
            )
        elif commit.certificate.view > 0:
            log.info("event=round_empty round=%d view=%d", commit.round, commit.certificate.view)

    def _summary(self, commit: Commit, records: list[RoundRecord]) -> bytes:
        body = {
            "v": 1,
            "round": commit.round,
            "view": commit.certificate.view,
            "validator": self._signer.key.public_key,
            "value_hash": commit.value_hash,
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
            "certificate": commit.certificate.body(),
        }
        return self._signer.signed_bytes(SUMMARY_DOMAIN, body)

    def _name(self, key: bytes) -> str:
        return self._names.get(key, key.hex()[:16])
