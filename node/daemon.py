"""The composition root: builds every part from the config and runs them together.

One ``asyncio.TaskGroup`` holds every long-lived task, each named. SIGTERM
and SIGINT start a graceful drain: intake stops, submissions already queued
are prepared, the outbox is flushed while the broker is reachable, and the
process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
from prometheus_client import CollectorRegistry

from consensus.committee import Committee, Member
from encoders.errors import WeightsError
from encoders.shard import Shard
from node.bus.broker import EmbeddedBroker, embedded_broker
from node.bus.client import Bus, OutboxPublisher, Topics
from node.errors import NodeError
from node.intake.admission import Clock, Intake
from node.intake.codec import pack, unpack
from node.intake.keys import SigningKey, load_key, write_key
from node.intake.signing import MessageSigner
from node.ops.committee_file import load_committee
from node.ops.config import Config
from node.ops.explore import Explorer, ExploreSite
from node.ops.http import http_server
from node.ops.metrics import Metrics
from node.ops.systemd import notify
from node.ops.threads import name_thread
from node.pipeline.batching import BatchPolicy
from node.pipeline.encoding import EncoderService
from node.pipeline.engines import Engine, InProcess, ShardSpec, WorkerProcesses
from node.pipeline.sandbox import DecoderPool
from node.rounds.chain import BeaconChain
from node.rounds.driver import RoundDriver
from node.rounds.history import history_index, load_history
from node.rounds.records import RoundRules, Tolerances
from node.rounds.sync import SyncService
from node.rounds.verify import RecordVerifier
from node.store.sqlite import Store
from node.store.thread import StoreThread
from rewards.history import set_search_threads

log = logging.getLogger("poc.node")

T = TypeVar("T")

DRAIN_TIMEOUT_S = 10.0
STORE_STAGES = {
    "commit_round": "commit_write",
    "outbox": "publish",
    "published": "publish",
    "admit": "intake",
    "reject": "intake",
}
"""The stage a store call's CPU time counts for (any other: ``store``)."""


async def cancel_all(tasks: list[asyncio.Task[Any]], every_s: float = 2.0) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again those still running.

    One cancellation can be lost: on Python 3.11 ``asyncio.wait_for`` (which
    aiomqtt awaits a PUBACK with) returns the result of a future that completed
    in the same turn of the loop as the cancellation, and the task goes on. A
    stop that cancelled once then waited for ever, the sync loop still asking
    every few seconds on a closed session (seen after a node resumed from
    SIGSTOP, when every timer fires at once). A later cancellation meets the
    task at another await. The first wait is long enough for a task's own
    cleanup (a bus session's graceful disconnect) not to be cut short.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
        if pending:
            log.warning(
                "event=task_cancel_again tasks=%s", ",".join(sorted(t.get_name() for t in pending))
            )


def validator_key(config: Config) -> SigningKey:
    """The configured key, or ``<data_dir>/validator.key``, created on first start."""
    path = config.node.key or config.node.data_dir / "validator.key"
    if config.node.key is None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_key(SigningKey.generate(), path)
        log.info("event=key_created path=%s", path)
    return load_key(path)


def committee_of_one(config: Config, key: SigningKey) -> Committee:
    rounds = config.rounds
    return Committee(
        genesis_ms=rounds.genesis_ms,
        round_seconds=rounds.round_seconds,
        epoch_rounds=rounds.epoch_rounds,
        members=(Member("self", key.public_key, 1),),
    )


def describe_committee(committee: Committee) -> bytes:
    """The committee as stored in a node's metadata, for offline audits."""
    return pack(
        {
            "genesis_ms": committee.genesis_ms,
            "round_seconds": committee.round_seconds,
            "epoch_rounds": committee.epoch_rounds,
            "members": [[m.name, m.public_key, m.stake] for m in committee.members],
        }
    )


def committee_from_description(raw: bytes) -> Committee:
    body = unpack(raw)
    return Committee(
        genesis_ms=body["genesis_ms"],
        round_seconds=body["round_seconds"],
        epoch_rounds=body["epoch_rounds"],
        members=tuple(Member(name, key, stake) for name, key, stake in body["members"]),
    )


def load_shard(config: Config) -> Shard:
    """The pinned shard, refused with a message if it does not fit the configuration."""
    encoders = config.encoders
    try:
        shard = Shard.load(
            encoders.manifest,
            encoders.manifest_sha256,
            device=encoders.device,
            tau=encoders.tau,
            mask_count=encoders.mask_count,
        )
    except WeightsError as error:
        raise NodeError(f"encoder weights refused: {error}") from None
    calibrated = shard.scoring.k
    if config.scoring.qualify_ratio is None and calibrated not in (None, config.scoring.k):
        # d_E / d_nn depends on k: a ratio measured for another k pays the wrong items,
        # and members on different k disagree on every record that pays.
        raise NodeError(
            f"scoring.k is {config.scoring.k} but the manifest's qualify_ratio was calibrated "
            f"for k = {calibrated}: set scoring.k: {calibrated}, or run `poc-node calibrate "
            f"--k {config.scoring.k}` on the weights, or set scoring.qualify_ratio yourself"
        )
    return shard


DEFAULT_CPU_WORKERS = 2
"""Encoder workers on CPU when the config leaves it open (bench/bench_e2e.py)."""


def encoder_workers(config: Config) -> int:
    """``encoders.workers``, or its default: none on a GPU, two on CPU (none with Ray)."""
    if config.encoders.backend == "ray":
        return 0
    workers = config.encoders.workers
    if workers is None:
        return 0 if config.encoders.device.startswith("cuda") else DEFAULT_CPU_WORKERS
    return workers


def prepared_at_once(config: Config) -> int:
    """Submissions prepared at once: enough to fill the next batch of every modality
    while the encoders work on one each (and to keep every decoder busy).

    Counted over every modality, not the largest batch: single items of four
    modalities spread the submissions in flight over four queues (with 16 in
    flight their batches held 3 items, against 8 for pairs)."""
    policy = BatchPolicy.of(config.encoders)
    return max(2 * config.decode.workers, 2 * sum(b.size for b in policy.batches.values()))


def encoder_engine(config: Config, shard: Shard, metrics: Metrics | None = None) -> Engine:
    """The node's own thread, worker processes (``encoder_workers``), or a Ray Serve pool."""
    encoders = config.encoders
    if encoders.backend == "ray":
        from node.pipeline.ray_engine import RayServe

        return RayServe(encoders, shard.weights_id, metrics or Metrics(CollectorRegistry()))
    workers = encoder_workers(config)
    if not workers:
        return InProcess(shard)
    threads = encoders.threads or max(1, (os.cpu_count() or 1) // workers)
    spec = ShardSpec(
        encoders.manifest,
        encoders.manifest_sha256,
        encoders.device,
        encoders.tau,
        encoders.mask_count,
        threads,
    )
    return WorkerProcesses(spec, workers, shard.weights_id)


def _start_work_thread(search_threads: int) -> None:
    """Each worker thread of the loop's executor (scores, verification) says who it is
    and how many threads its history searches may use (OpenMP's setting is per thread)."""
    name_thread("poc-work")
    set_search_threads(search_threads)


class Node:
    """A running validator."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = Metrics(registry or CollectorRegistry())
        self.key = validator_key(config)
        self.signer = MessageSigner(self.key)
        if config.node.committee is None:
            self.committee = committee_of_one(config, self.key)
        else:
            self.committee = load_committee(config.node.committee)
            if self.committee.member(self.key.public_key) is None:
                raise NodeError(
                    f"this validator's key {self.key.public_hex} is not a member of the "
                    f"committee in {config.node.committee}"
                )
        self.metrics.committee.labels(
            digest=self.committee.digest().hex(), members=str(len(self.committee.members))
        ).set(1)
        self.topics = Topics(config.bus.topic_prefix)
        # Built here so that a bad TLS file is refused before the encoders load.
        client_id = config.bus.client_id or f"poc-node-{self.key.public_hex[:16]}"
        if config.bus.embedded and config.bus.client_id is None:
            # MQTT gives a session to whoever connects with its client id, and the
            # embedded broker (amqtt) drops the old one before it authenticates anyone:
            # a client using the node's public id cut the node off and the submissions
            # published meanwhile were never answered. The broker lives and dies with
            # this process, so nothing needs the id to outlast it: an unguessable one.
            client_id += f"-{secrets.token_hex(16)}"
        self.bus = Bus(config.bus, client_id, self.metrics)
        # A second session carries everything the node publishes, and a committee's
        # consensus and sync: votes never wait behind submissions, and the submissions
        # session awaits no answer, so under a flood it can stop reading its socket
        # and let TCP hold the backlog in the broker (node.bus.client).
        self.consensus_bus = Bus(
            config.bus, f"{client_id}-consensus", self.metrics, role="consensus"
        )
        self.http_port: int | None = None
        self._stopping = asyncio.Event()
        self._encoders_loaded = False
        self._embedded: EmbeddedBroker | None = None
        self._engine: Engine | None = None
        self.metrics.ready.set_function(lambda: float(all(self.ready().values())))
        self._explorer: Explorer | None = None

    def ready(self) -> dict[str, bool]:
        checks = {
            "encoders_loaded": self._encoders_loaded,
            "bus_connected": self.bus.connected.is_set(),
        }
        checks["consensus_bus_connected"] = self.consensus_bus.connected.is_set()
        if self.config.encoders.backend == "ray":
            # A replica running and the weights of the pool checked (node.pipeline.ray_engine).
            checks["encoder_pool"] = bool(getattr(self._engine, "ready", False))
        return checks

    async def _publish_now(self, topic: str, payload: bytes) -> None:
        """Publish consensus and sync traffic on the consensus session.

        Nothing here needs the outbox: what this member signed is stored before
        it is sent and sent again while undecided; a message lost while
        disconnected is dropped.
        """
        try:
            await self.consensus_bus.publish(topic, payload)
        except (aiomqtt.MqttError, TimeoutError) as error:
            log.info("event=consensus_publish_failed topic=%s error=%r", topic, str(error))

    def _store_cpu(self, method: str, seconds: float) -> None:
        stage = STORE_STAGES.get(method, "store")
        self.metrics.stage_cpu.labels(stage=stage).inc(seconds)

    def stop(self) -> None:
        """Begin a graceful drain (what SIGTERM does)."""
        # With the encoder pool on Ray, Ray's native SIGTERM handler (abseil's failure
        # handler) runs before this one and arms a 3-s SIGALRM that aborts the process
        # (ray-project/ray#64830): a drain, deleting the pool and leaving the cluster
        # take longer than that on a busy machine. The node sets no alarm of its own.
        signal.alarm(0)
        self._stopping.set()

    async def run(self, install_signals: bool = True) -> None:
        config = self.config
        if install_signals:
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop)
        log.info(
            "event=starting validator=%s committee=%s data_dir=%s",
            self.key.public_hex,
            self.committee.digest().hex()[:16],
            config.node.data_dir,
        )
        async with AsyncExitStack() as stack:
            site = ExploreSite(config) if config.http.explore else None
            self.http_port = await stack.enter_async_context(
                http_server(config.http.host, config.http.port, self.metrics, self.ready, site)
            )
            loop = asyncio.get_running_loop()
            # Named, so that CPU time can be told apart (node.ops.threads).
            work = ThreadPoolExecutor(
                thread_name_prefix="work",
                initializer=_start_work_thread,
                initargs=(config.scoring.threads,),
            )
            loop.set_default_executor(work)
            stack.callback(work.shutdown, wait=False, cancel_futures=True)
            store = StoreThread(Store(Path(config.node.data_dir) / "node.sqlite3"), self._store_cpu)
            stack.callback(store.close)

            if config.encoders.threads:
                import torch

                torch.set_num_threads(config.encoders.threads)
            shard = await asyncio.to_thread(load_shard, config)
            described = describe_committee(self.committee)
            await store.set_meta("committee", described)
            # Off the loop, on the store's thread, in chunks: /healthz answers
            # while a large history is read.
            index = history_index(config.scoring.device, config.scoring.index)
            history = await store.call(
                lambda db: load_history(
                    shard,
                    db.history_chunks(shard.dim),
                    index,
                    db.history_chunks(shard.dim, table="own_vectors"),
                )
            )
            self.metrics.history_size.set(len(history))
            log.info(
                "event=encoders_loaded weights=%s dim=%d history=%d history_index=%s",
                shard.weights_id[:16],
                shard.dim,
                len(history),
                getattr(index, "func", index).__name__ + f"/{config.scoring.device}",
            )

            if config.bus.embedded:
                self._embedded = await stack.enter_async_context(
                    embedded_broker(
                        config.bus.host,
                        config.bus.port,
                        first=(self.bus.client_id, self.consensus_bus.client_id),
                        prefix=config.bus.topic_prefix,
                    )
                )
            decoders = DecoderPool(
                config.decode.workers,
                config.decode.timeout_s,
                config.decode.memory_mb,
                config.decode.cpu_seconds,
                self.metrics.stage_cpu.labels(stage="decode").inc,
                self.metrics.stage_cpu.labels(stage="decode_text").inc,
                lambda kind: self.metrics.decoder_failures.labels(kind=kind).inc(),
                self.metrics.stage_cpu.labels(stage="decode_submit").inc,
            )
            stack.callback(decoders.close)
            encoder = EncoderService(
                shard,
                BatchPolicy.of(config.encoders),
                config.encoders.queue_size,
                self.metrics,
                encoder_engine(config, shard, self.metrics),
                config.encoders.cache_items,
            )
            stack.callback(encoder.close)
            self._engine = encoder.engine
            await encoder.engine.start()
            self.metrics.encoder_workers.set(encoder_workers(config))
            self.metrics.queue_capacity.labels(queue="prepare").set(config.intake.queue_size)
            self.metrics.queue_capacity.labels(queue="encode").set(config.encoders.queue_size)
            self._encoders_loaded = True

            async def fetch(after: int, limit: int) -> list[tuple[int, str, bytes, bool]]:
                entries = await store.outbox(after, limit)
                self.metrics.queue_depth.labels(queue="outbox").set(len(entries))
                return [(e.seq, e.topic, e.payload, e.retain) for e in entries]

            async def done(seqs: list[int]) -> None:
                await store.published(seqs)

            publisher = OutboxPublisher(
                self.consensus_bus, fetch, done, config.bus.publish_window, self.metrics
            )
            chain = BeaconChain(self.committee)
            clock = Clock()
            intake = Intake(
                config,
                self.signer,
                store,
                decoders,
                encoder,
                chain,
                self.committee,
                self.metrics,
                self.topics,
                publisher.notify,
                clock,
            )
            history_lock = asyncio.Lock()
            sync = SyncService(
                self.signer,
                self.committee,
                self.topics.prefix,
                store,
                self._publish_now,
                config.consensus.sync_reply_bytes,
            )
            verifier = RecordVerifier(
                store,
                intake.preparer.prepare,
                lambda ids: sync.fetch_submissions(ids, config.consensus.sync_timeout_s),
                shard.delta,
                history,
                RoundRules.of(config.scoring, shard.scoring),
                Tolerances.of(config.consensus),
                intake.wire_limits,
                history_lock,
                max_records=config.rounds.max_records,
            )
            explorer = None
            if site is not None:
                explorer = Explorer(
                    config,
                    history,
                    history_lock,
                    RoundRules.of(config.scoring, shard.scoring),
                    intake.preparer.prepare,
                    store,
                    self.committee,
                )
                await explorer.load()
                site.explorer = explorer
            driver = RoundDriver(
                config,
                self.committee,
                self.signer,
                store,
                history,
                RoundRules.of(config.scoring, shard.scoring),
                chain,
                self.metrics,
                self.topics,
                publisher.notify,
                verifier=verifier,
                sync=sync,
                publish=self._publish_now,
                history_lock=history_lock,
                clock=clock,
                on_committed=None if explorer is None else explorer.committed,
            )
            self._sync = sync
            self._explorer = explorer
            await driver.start()
            await self._serve(intake, driver, encoder, publisher, store)
        log.info("event=stopped")

    async def _serve(
        self,
        intake: Intake,
        driver: RoundDriver,
        encoder: EncoderService,
        publisher: OutboxPublisher,
        store: StoreThread,
    ) -> None:
        async def on_submission(topic: str, payload: bytes) -> None:
            await intake.receive(payload, topic)

        prefix = self.topics.prefix
        consensus_topics = [
            f"{prefix}/consensus/proposals",
            f"{prefix}/consensus/votes",
            f"{prefix}/consensus/evidence",
            self._sync.request_topic,
            self._sync.reply_topic,
        ]
        try:
            async with asyncio.TaskGroup() as group:
                bus_task = group.create_task(
                    self.bus.run([self.topics.submissions], on_submission), name="bus"
                )
                workers = [
                    group.create_task(
                        self.consensus_bus.run(
                            consensus_topics if len(self.committee.members) > 1 else [],
                            driver.on_message,
                        ),
                        name="consensus-bus",
                    ),
                    group.create_task(encoder.run(), name="encoder"),
                    group.create_task(
                        intake.run_preparers(prepared_at_once(self.config)), name="preparers"
                    ),
                    group.create_task(driver.run(), name="rounds"),
                    group.create_task(driver.sync_loop(), name="sync"),
                    group.create_task(driver.rebroadcast_loop(), name="rebroadcast"),
                    # After the preparers started: the queue is bounded, and more
                    # submissions may await preparation than it holds.
                    group.create_task(intake.resume(), name="resume"),
                    group.create_task(publisher.run(), name="publisher"),
                ]
                if self._explorer is not None:
                    workers.append(group.create_task(self._explorer.run(), name="explore"))
                group.create_task(
                    self._drain_on_stop(bus_task, workers, intake, store, driver), name="drain"
                )
                group.create_task(self._notify_ready(), name="notify-ready")
                if self._embedded is not None:
                    group.create_task(self._open_when_subscribed(), name="open-broker")
        except* asyncio.CancelledError:
            pass

    async def _open_when_subscribed(self) -> None:
        """Admit submitters to the embedded broker once the node has subscribed."""
        await self.bus.connected.wait()
        if self._embedded is not None:
            self._embedded.open()

    async def _notify_ready(self) -> None:
        """Tell systemd (``Type=notify``) once every readiness condition holds."""
        while not all(self.ready().values()):
            if self._stopping.is_set():
                return
            await asyncio.sleep(0.1)
        if notify("READY=1", f"STATUS=validating, metrics on port {self.http_port}"):
            log.info("event=sd_notify_ready")

    async def _drain_on_stop(
        self,
        bus_task: asyncio.Task[Any],
        workers: list[asyncio.Task[Any]],
        intake: Intake,
        store: StoreThread,
        driver: RoundDriver,
    ) -> None:
        """Stop taking messages, finish what is queued, flush Results, then stop.

        Messages the bus delivers from now on are left unacknowledged, so the
        broker keeps them for the next start of this persistent session.
        """
        await self._stopping.wait()
        notify("STOPPING=1", "STATUS=draining")
        intake.stop_receiving()
        log.info("event=draining queued=%d", intake.queue.qsize())
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await intake.idle()
                while self.consensus_bus.connected.is_set():
                    unpublished: int = await store.outbox_size()
                    if not unpublished:
                        break
                    await asyncio.sleep(0.05)  # the publisher deletes entries as PUBACKs arrive
        except TimeoutError:
            unpublished = await store.outbox_size()
            log.warning(
                "event=drain_incomplete queued=%d unpublished=%d (both resumed at next start)",
                intake.queue.qsize(),
                unpublished,
            )
        await cancel_all([bus_task, *workers])
        # Then what the round driver runs beside them (building and checking values,
        # which may commit a round): before the store closes under them. A commit
        # cancelled mid-way is redone from the store at the next start; one that met
        # a closed store ended the node with 70 instead of 0.
        await cancel_all(driver.background_tasks())
