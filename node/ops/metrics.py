"""Prometheus metrics, built on a registry the caller passes in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from node.errors import Reason

_STAGE_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Metrics:
    """Every metric the node exports; tests read values back from ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.messages = Counter(
            "poc_messages_total", "Messages received on the submissions topic", registry=registry
        )
        self.rejections = Counter(
            "poc_rejections_total",
            "Submissions rejected, by reason code",
            ["reason"],
            registry=registry,
        )
        for reason in Reason:
            self.rejections.labels(reason=str(reason))
        self.unattributed = Counter(
            "poc_unattributed_messages_total",
            "Refused messages that name no submitter (logged, not answered)",
            registry=registry,
        )
        self.internal_errors = Counter(
            "poc_internal_errors_total",
            "Submissions the node failed to handle through an error of its own, by stage "
            "(intake, prepare: the submission is refused; consensus: the message is dropped; "
            "logged as event=intake_failed, prepare_failed, consensus_message_failed)",
            ["stage"],
            registry=registry,
        )
        for stage in ("intake", "prepare", "consensus"):
            self.internal_errors.labels(stage=stage)
        self.prepare_retries = Counter(
            "poc_prepare_retries_total",
            "Submissions prepared again because the encoders failed under them (workers or "
            "replicas died twice on a batch); logged as event=prepare_again",
            registry=registry,
        )
        self.results = Counter(
            "poc_results_total", "Results produced, by status", ["status"], registry=registry
        )
        self.redeliveries = Counter(
            "poc_redeliveries_total",
            "Submissions received again with identical bytes",
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "poc_stage_seconds",
            "Time spent per pipeline stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.stage_cpu = Counter(
            "poc_stage_cpu_seconds",
            "CPU time spent per pipeline stage (decode: in the decoder processes; "
            "encode: the encoder thread and the torch threads it started; "
            "bus: the MQTT client reading, writing, publishing and acknowledging)",
            ["stage"],
            registry=registry,
        )
        self.encoder_workers = Gauge(
            "poc_encoder_workers",
            "Encoder worker processes (encoders.workers; 0: the node's own thread encodes)",
            registry=registry,
        )
        self.encoder_pool_replicas = Gauge(
            "poc_encoder_pool_replicas",
            "Running replicas of the encoder pool on Ray Serve (encoders.backend: ray)",
            registry=registry,
        )
        self.encoder_pool_queued = Gauge(
            "poc_encoder_pool_queued",
            "Items sent to the encoder pool and not yet answered (in flight or waiting there)",
            registry=registry,
        )
        self.encoder_pool_retries = Counter(
            "poc_encoder_pool_retries",
            "Encoder pool calls sent again after their replica was lost",
            registry=registry,
        )
        self.encode_batch = Histogram(
            "poc_encode_batch_items",
            "Items per encoder micro-batch, by modality",
            ["modality"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=registry,
        )
        self.encode_tokens = Counter(
            "poc_encode_text_tokens",
            "Caption wordpieces the encoders read: content (the captions' own) and computed "
            "(each batch padded to its longest caption); their ratio is the padding's cost",
            ["kind"],
            registry=registry,
        )
        self.encode_cached = Counter(
            "poc_encode_cached_items",
            "Items whose embedding came from the cache of recent ones, not encoded again, "
            "by modality",
            ["modality"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "poc_queue_depth", "Items waiting, by queue", ["queue"], registry=registry
        )
        self.intake_bytes = Gauge(
            "poc_intake_queued_bytes",
            "Bytes of verified submissions queued or being prepared (intake.queue_mb bounds it)",
            registry=registry,
        )
        self.round = Gauge("poc_round", "The round the node's clock is in", registry=registry)
        self.finalized_round = Gauge(
            "poc_finalized_round", "The last finalized round", registry=registry
        )
        self.rounds = Counter(
            "poc_rounds_total", "Rounds committed, by outcome", ["outcome"], registry=registry
        )
        self.history_size = Gauge(
            "poc_history_size", "Embeddings in the history", registry=registry
        )
        self.rewards = Counter(
            "poc_rewards_base_units_total", "Base units paid to submitters", registry=registry
        )
        self.bus_connected = Gauge(
            "poc_bus_connected", "1 while connected to the MQTT broker", registry=registry
        )
        self.bus_reconnects = Counter(
            "poc_bus_reconnects_total",
            "Connections to the broker after the first",
            registry=registry,
        )
        self.bus_held = Gauge(
            "poc_bus_held_messages",
            "Messages delivered by the broker and not yet handled, per session "
            "(bounded by bus.receive_window)",
            ["session"],
            registry=registry,
        )
        self.bus_deferred = Counter(
            "poc_bus_deferred_total",
            "Deliveries past the receive window: QoS 1 left unacknowledged for the broker "
            "to deliver again, QoS 0 dropped",
            ["session", "qos"],
            registry=registry,
        )
        self.bus_pauses = Counter(
            "poc_bus_read_pauses_total",
            "Times a session stopped reading its socket with its receive window full",
            ["session"],
            registry=registry,
        )
        self.bus_window_reconnects = Counter(
            "poc_bus_window_reconnects_total",
            "Reconnections made to have deferred deliveries sent again",
            ["session"],
            registry=registry,
        )
        self.published = Counter(
            "poc_published_total",
            "Messages published and acknowledged by the broker",
            registry=registry,
        )
        self.encoder_diff_loss = Histogram(
            "poc_encoder_differential_loss",
            "Differential loss per encoder and modality",
            ["encoder", "modality"],
            buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0),
            registry=registry,
        )
        self.committee = Gauge(
            "poc_committee_info",
            "The committee this node runs (its digest) and its size",
            ["digest", "members"],
            registry=registry,
        )
        self.votes = Counter(
            "poc_votes_total", "Valid votes seen, by member", ["member"], registry=registry
        )
        self.finality_seconds = Histogram(
            "poc_time_to_finality_seconds",
            "From a round's end to its commit",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.record_mismatches = Counter(
            "poc_record_mismatches_total",
            "Leader proposals refused after recomputation",
            registry=registry,
        )
        self.equivocations = Counter(
            "poc_equivocations_total",
            "Equivocations proven (evidence verified and recorded), by offending member",
            ["member"],
            registry=registry,
        )
        self.consensus_rejected = Counter(
            "poc_consensus_rejected_total",
            "Consensus messages dropped at screening, by reason",
            ["reason"],
            registry=registry,
        )
        self.decided_view = Histogram(
            "poc_round_decided_view",
            "The view in which each committed round was decided (0: its first proposer's)",
            buckets=(0, 1, 2, 3, 5, 8, 13),
            registry=registry,
        )
        self.view = Gauge(
            "poc_consensus_view",
            "The view of the round being decided (0: its first proposer's)",
            registry=registry,
        )
        self.sync_lag = Gauge(
            "poc_sync_lag_rounds",
            "Rounds between the clock and the last finalized round",
            registry=registry,
        )
        self.sync_bytes_wanted = Gauge(
            "poc_sync_bytes_wanted",
            "Submissions certified here whose bytes this member still asks its peers for",
            registry=registry,
        )
        self.decoder_failures = Counter(
            "poc_decoder_failures_total",
            "Decoder processes stopped (timeout), dead (crash) or out of memory on an item",
            ["kind"],
            registry=registry,
        )
        for kind in ("timeout", "crash", "memory"):
            self.decoder_failures.labels(kind=kind)
        self.queue_capacity = Gauge(
            "poc_queue_capacity",
            "Items a queue holds at most, by queue",
            ["queue"],
            registry=registry,
        )
        self.ready = Gauge(
            "poc_ready", "1 once encoders are loaded and the bus connected", registry=registry
        )
