"""Intake and preparation: from bytes on the bus to an accepted submission.

``receive`` runs for every message, in bus order, and returns only once the
outcome is durable (the bus acknowledges the message after it): verified
submissions are stored, refused ones are stored as rejections with their
Result in the outbox. ``prepare`` then decodes (sandboxed), encodes
(batched) and fuses each stored submission and marks it accepted.

Check order (the first that fails names the reason): the stateless checks of
:func:`node.intake.wire.parse_submission`, then ``wrong_topic``, ``stale``, ``rate_limited``,
``replay``, ``duplicate``; while preparing, ``too_large`` (media headers) and
``undecodable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from consensus.committee import Committee
from encoders.errors import EncoderError
from node.bus.client import Topics
from node.errors import EncoderUnavailable, Reason, Rejected
from node.intake.signing import MessageSigner
from node.intake.wire import (
    RESULT_DOMAIN,
    Result,
    Status,
    Submission,
    WireLimits,
    parse_submission,
    submission_id,
)
from node.ops.config import Config
from node.ops.metrics import Metrics
from node.ops.threads import thread_cpu_timed
from node.pipeline.encoding import EncoderService
from node.pipeline.prepare import Preparer, fusion_alpha, media_limits
from node.pipeline.sandbox import DecoderPool
from node.rounds.chain import BeaconChain
from node.store.sqlite import Admission, Outgoing, State, StoredSubmission, store_failed
from node.store.thread import StoreThread

log = logging.getLogger("poc.intake")

PREPARE_ATTEMPTS = 3
"""Times a submission is prepared while the encoders fail under it, before it is refused."""
PREPARE_PAUSE_S = 5.0
"""Pause before preparing again, times the attempt (workers are replaced meanwhile): a
submission is refused only after the encoders failed under it through 15 s of kills."""


@dataclass(frozen=True)
class Pending:
    """A verified, durably stored submission waiting for decoding and encoding."""

    submission: Submission
    intake_round: int


class ByteBudget:
    """At most ``limit`` bytes held at once; ``take`` waits, first come first served.

    A holder larger than the whole budget takes all of it (so it waits until
    nothing else is held): it is delayed, never refused.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def held(self) -> int:
        return self._held

    async def take(self, size: int) -> None:
        share = min(size, self._limit)
        if not self._waiters and self._held + share <= self._limit:
            self._held += share
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (share, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(size)  # granted, then cancelled: hand it on
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._wake()
            raise

    def give(self, size: int) -> None:
        self._held -= min(size, self._limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            share, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self._held + share > self._limit:
                return
            self._waiters.popleft()
            self._held += share
            waiter.set_result(None)


class RateLimiter:
    """A token bucket per submitter, remembering a bounded number of submitters."""

    def __init__(self, per_minute: int, burst: int, capacity: int = 100_000) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._capacity = capacity
        self._buckets: OrderedDict[bytes, tuple[float, float]] = OrderedDict()

    def allow(self, submitter: bytes, now_s: float) -> bool:
        tokens, last = self._buckets.pop(submitter, (self._burst, now_s))
        tokens = min(self._burst, tokens + (now_s - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[submitter] = (tokens - 1.0 if allowed else tokens, now_s)
        if len(self._buckets) > self._capacity:
            self._buckets.popitem(last=False)
        return allowed


@dataclass(frozen=True)
class Clock:
    """Wall-clock milliseconds; a seam for tests."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


SYSTEM_CLOCK = Clock()


class Intake:
    """Verifies, stores, prepares and answers submissions."""

    def __init__(
        self,
        config: Config,
        signer: MessageSigner,
        store: StoreThread,
        decoders: DecoderPool,
        encoder: EncoderService,
        chain: BeaconChain,
        committee: Committee,
        metrics: Metrics,
        topics: Topics,
        on_outbox: Callable[[], None],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._config = config
        self._signer = signer
        self._store = store
        self.preparer = Preparer(
            decoders, encoder, chain, media_limits(config), fusion_alpha(config), metrics
        )
        self._committee = committee
        self._metrics = metrics
        self._topics = topics
        self._on_outbox = on_outbox
        self._clock = clock
        limits = config.limits
        self._wire_limits = WireLimits(limits.message_bytes, limits.text_bytes, limits.image_bytes)
        self._rate = RateLimiter(
            config.intake.rate_limit.per_minute, config.intake.rate_limit.burst
        )
        self._window_ms = config.intake.stale_window_s * 1000
        self._verify_cpu = metrics.stage_cpu.labels(stage="verify").inc
        self._intake_cpu = metrics.stage_cpu.labels(stage="intake").inc
        self._known = store.store.known_ids()
        self._sign_cpu = metrics.stage_cpu.labels(stage="sign").inc
        self.queue: asyncio.Queue[Pending] = asyncio.Queue(maxsize=config.intake.queue_size)
        self._queued_bytes = ByteBudget(config.intake.queue_mb * 1024 * 1024)
        self._receiving = asyncio.Event()
        self._receiving.set()

    async def idle(self) -> None:
        """Wait until no submission is queued or being prepared."""
        await self.queue.join()

    def stop_receiving(self) -> None:
        """Leave new messages unhandled (and so unacknowledged) from now on."""
        self._receiving.clear()

    # -- answers --------------------------------------------------------------

    def _result(self, result: Result, submitter: bytes) -> Outgoing:
        self._metrics.results.labels(status=str(result.status)).inc()
        started = time.thread_time()
        payload = self._signer.signed_bytes(RESULT_DOMAIN.decode(), result.body())
        self._sign_cpu(time.thread_time() - started)
        return Outgoing(self._topics.results(submitter), payload)

    async def _reject(
        self,
        identity: bytes,
        submitter: bytes,
        reason: Reason,
        detail: str,
        nonce: tuple[int, int] | None = None,
        extra: Result | None = None,
    ) -> None:
        result = extra or Result(identity, self._signer.key.public_key, Status.REJECTED, reason)
        outgoing = self._result(result, submitter)
        now = self._clock.now_ms()
        written = await self._store.reject(identity, submitter, reason, now, outgoing, nonce=nonce)
        if written:
            self._metrics.rejections.labels(reason=str(reason)).inc()
            log.info(
                "event=rejected submission=%s submitter=%s reason=%s detail=%r",
                identity.hex()[:16],
                submitter.hex()[:16],
                reason,
                detail,
            )
            self._on_outbox()

    # -- receive --------------------------------------------------------------

    async def receive(self, raw: bytes, topic: str | None = None) -> None:
        """Handle one message from a submissions topic; durable when it returns.

        ``topic`` is where it was published: a submission on another key's
        topic is ``wrong_topic`` (checked after its signature, so only its
        signer ever hears of it); one refused before its signature was checked
        is answered only on its claimed submitter's own topic (else it is
        unattributed). ``None`` skips both checks (tests, tools).
        """
        await self._receiving.wait()
        self._metrics.messages.inc()
        try:
            await self._receive(raw, topic)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if store_failed(error):
                # Nothing more can be kept: stop, the message unacknowledged (the broker
                # keeps it for the restart), rather than lose it.
                log.critical("event=store_failed stage=intake error=%r; exiting to recover", error)
                raise
            await self._failed_at_intake(raw, error)

    async def _receive(self, raw: bytes, topic: str | None) -> None:
        started = time.perf_counter()
        try:
            # One trip off the loop: the hash (up to 8 MiB), the store's answer,
            # then verification.
            identity, submission = await asyncio.to_thread(self._unknown_and_verified, raw)
        finally:
            self._metrics.stage_seconds.labels(stage="verify").observe(
                time.perf_counter() - started
            )
        if isinstance(submission, Rejected):
            claimed = submission.submitter
            if (
                claimed is not None
                and not submission.signed
                and topic is not None
                and topic != self._topics.submission(claimed)
            ):
                # Unsigned bytes naming a key other than their topic's: anyone can write
                # them, and a Result would land on that key's results topic (spam on a
                # victim's topic, signed by this validator). On its own topic, only the
                # key's broker account (ACL) can have sent them.
                claimed = None
            if claimed is None:
                self._metrics.unattributed.inc()
                log.warning(
                    "event=unattributed_message bytes=%d reason=%s detail=%r topic=%s",
                    len(raw),
                    submission.reason,
                    submission.detail,
                    topic,
                )
                return
            await self._reject(identity, claimed, submission.reason, submission.detail)
            return
        if submission is None:
            self._metrics.redeliveries.inc()
            # Finalized by a round this member learned by sync: keep its bytes now
            # (they hash to its id) for peers' sync and for audits.
            await self._store.keep_raw(identity, raw)
            await self._answer_rejection_again(identity)
            return
        if topic is not None and topic != self._topics.submission(submission.submitter):
            await self._reject(
                identity,
                submission.submitter,
                Reason.WRONG_TOPIC,
                f"published on {topic}, not on its submitter's own topic",
            )
            return
        await self._admit(submission)

    async def _failed_at_intake(self, raw: bytes, error: Exception) -> None:
        """One message met an error of the node's own: it is refused, and nothing else.

        A node that died on it would die again on every restart (the broker
        delivers the unacknowledged message again). A new message whose
        signature holds is answered ``malformed`` (the closed set has no code
        for the node's own fault; the log and ``poc_internal_errors_total``
        name it); any other is only logged, like unattributable bytes. A
        submission the store already holds keeps its state: the error met a
        copy of it, or came after it was kept (a restart resumes it).
        """
        self._metrics.internal_errors.labels(stage="intake").inc()
        identity = submission_id(raw)
        log.error(
            "event=intake_failed submission=%s bytes=%d error=%r",
            identity.hex()[:16],
            len(raw),
            error,
            exc_info=error,
        )
        try:
            if await asyncio.to_thread(self._known, identity):
                return
            submission = await asyncio.to_thread(parse_submission, raw, self._wire_limits)
        except Exception as again:  # unattributable, or the parser's own fault
            if store_failed(again):
                raise
            return
        try:
            await self._reject(
                identity,
                submission.submitter,
                Reason.MALFORMED,
                f"internal error at intake: {type(error).__name__}",
            )
        except Exception as again:
            if store_failed(again):
                raise
            log.exception("event=intake_failed submission=%s answer=none", identity.hex()[:16])

    def _unknown_and_verified(self, raw: bytes) -> tuple[bytes, Submission | Rejected | None]:
        """The submission's id, and ``None`` for a submission the store knows (a copy, not
        verified again), else the parsed, verified submission or why it is refused.
        Runs on a worker thread."""
        identity = thread_cpu_timed(self._verify_cpu, submission_id, raw)
        if thread_cpu_timed(self._intake_cpu, self._known, identity):
            return identity, None
        try:
            submission = thread_cpu_timed(
                self._verify_cpu, parse_submission, raw, self._wire_limits, identity
            )
        except Rejected as rejected:
            return identity, rejected
        return identity, submission

    async def _answer_rejection_again(self, identity: bytes) -> None:
        """The same bytes again after a rejection: the rejection is answered again.

        A submitter that was offline when the answer went out (``submit
        --batch`` resuming after an interruption) learns it by publishing the
        same bytes. Accepted and final submissions are not answered again:
        their outcome is the round's, in its retained RoundSummary. A flood of
        redeliveries is held to the submitter's own rate.
        """
        rejection = await self._store.rejection_of(identity)
        if rejection is None:
            return
        submitter, reason, round_number = rejection
        if not self._rate.allow(submitter, self._clock.now_ms() / 1000):
            return
        result = Result(
            identity, self._signer.key.public_key, Status.REJECTED, Reason(reason), round_number
        )
        await self._store.enqueue([self._result(result, submitter)])
        self._on_outbox()

    async def _admit(self, submission: Submission) -> None:
        now = self._clock.now_ms()
        identity = submission.id
        if abs(submission.created_ms - now) > self._window_ms:
            await self._reject(
                identity,
                submission.submitter,
                Reason.STALE,
                f"created_ms is {submission.created_ms - now} ms from now",
            )
            return
        if not self._rate.allow(submission.submitter, now / 1000):
            await self._reject(
                identity, submission.submitter, Reason.RATE_LIMITED, "submitter exceeds its rate"
            )
            return
        intake_round = max(self._committee.round_at(now), 0)
        admission = await self._store.admit(
            identity,
            submission.submitter,
            submission.nonce,
            submission.created_ms,
            [item.sha256 for item in submission.items],
            submission.raw,
            now,
            intake_round,
            self._window_ms,
        )
        if admission is Admission.KNOWN:
            self._metrics.redeliveries.inc()
        elif admission is Admission.REPLAY:
            await self._reject(
                identity,
                submission.submitter,
                Reason.REPLAY,
                f"nonce {submission.nonce} was already used",
            )
        elif admission is Admission.DUPLICATE:
            await self._reject(
                identity,
                submission.submitter,
                Reason.DUPLICATE,
                "an item's data was already submitted",
                nonce=(submission.nonce, submission.created_ms),
            )
        else:
            # The parsed submission travels on: it is parsed and verified once.
            # Waits while full (by count or bytes): the bus stops being acknowledged.
            await self._queued_bytes.take(len(submission.raw))
            self._metrics.intake_bytes.set(self._queued_bytes.held)
            await self.queue.put(Pending(submission, intake_round))
            self._metrics.queue_depth.labels(queue="prepare").set(self.queue.qsize())

    async def resume(self) -> None:
        """Queue the submissions stored but not prepared before the last stop."""
        stored = await self._store.submissions_in(State.RECEIVED)
        for row in stored:
            try:  # signature checks: off the event loop, as on the live path
                pending = await asyncio.to_thread(self._reparse, row)
            except Rejected as rejected:  # the limits changed since it was stored
                await self._reject(row.id, row.submitter, rejected.reason, rejected.detail)
                continue
            await self._queued_bytes.take(len(pending.submission.raw))
            await self.queue.put(pending)
        if stored:
            log.info("event=resumed submissions=%d", len(stored))

    def _reparse(self, row: StoredSubmission) -> Pending:
        """A submission stored before a restart, parsed again (its bytes were verified)."""
        assert row.raw is not None
        return Pending(parse_submission(row.raw, self._wire_limits), row.intake_round or 0)

    # -- prepare --------------------------------------------------------------

    async def run_preparers(self, concurrency: int) -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(concurrency):
                group.create_task(self._preparer(), name=f"preparer-{index}")

    async def _preparer(self) -> None:
        while True:
            await self._prepare_next()

    async def _prepare_next(self) -> None:
        """Take one submission and prepare it. Its own coroutine, so that nothing of it
        outlives it: an idle preparer waits in ``queue.get()`` with its frame alive, and
        locals of that frame kept its last submission (found from the outside: the raw
        bytes and a copy of every item, 15 MB for a large clip, in each of up to 56
        idle preparers, outside the ``queue_mb`` budget, which had given them back)."""
        pending = await self.queue.get()
        self._metrics.queue_depth.labels(queue="prepare").set(self.queue.qsize())
        submission = pending.submission
        try:
            await self._prepare(pending)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # one submission's failure never stops the node
            if store_failed(error):
                # ... but a store that cannot keep its outcome does: rejecting it
                # for that (found from the outside: a valid submission refused
                # `undecodable` for good) loses it. Left `received`, it is prepared
                # again after the restart.
                log.critical(
                    "event=store_failed stage=prepare submission=%s error=%r; exiting to recover",
                    submission.id.hex()[:16],
                    error,
                )
                raise
            log.exception("event=prepare_failed submission=%s", submission.id.hex()[:16])
            self._metrics.internal_errors.labels(stage="prepare").inc()
            # A check that cannot run rejects; it never passes.
            await self._reject(
                submission.id,
                submission.submitter,
                Reason.UNDECODABLE,
                f"internal error while preparing: {type(error).__name__}",
            )
        finally:
            self._queued_bytes.give(len(submission.raw))
            self._metrics.intake_bytes.set(self._queued_bytes.held)
            self.queue.task_done()

    async def _prepare(self, pending: Pending) -> None:
        submission = pending.submission
        epoch = self._committee.epoch_of(pending.intake_round)
        attempt = 1
        while True:
            try:
                prepared = await self.preparer.prepare(submission, epoch)
                break
            except EncoderError as error:
                reason = Reason(error.reason) if error.reason in set(Reason) else Reason.UNDECODABLE
                await self._reject(submission.id, submission.submitter, reason, str(error))
                return
            except EncoderUnavailable as error:
                # Workers killed (out of memory, say) while they held it: not the
                # submission's fault, so it is prepared again. Only one that has
                # every time ended the encoders under it is refused.
                if attempt == PREPARE_ATTEMPTS:
                    await self._reject(
                        submission.id,
                        submission.submitter,
                        Reason.UNDECODABLE,
                        f"the encoders failed {attempt} times on it: {error}",
                    )
                    return
                log.warning(
                    "event=prepare_again submission=%s attempt=%d error=%r",
                    submission.id.hex()[:16],
                    attempt,
                    str(error),
                )
                self._metrics.prepare_retries.inc()
                await asyncio.sleep(PREPARE_PAUSE_S * attempt)
                attempt += 1
        result = Result(
            submission.id,
            self._signer.key.public_key,
            Status.ACCEPTED,
            None,
            None,
            prepared.entries(),
            prepared.pair_distance_ppm,
            None,
            0,
        )
        outgoing = self._result(result, submission.submitter)
        if await self._store.accept(submission.id, prepared.to_bytes(), outgoing):
            log.info(
                "event=accepted submission=%s items=%d distance_ppm=%s",
                submission.id.hex()[:16],
                len(prepared.items),
                prepared.pair_distance_ppm,
            )
            self._on_outbox()

    @property
    def wire_limits(self) -> WireLimits:
        return self._wire_limits
