"""Encoder worker processes: the same embeddings as the node's own shard, and no batch lost
when a worker dies in the middle of it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from encoders.embedding import EncodeRequest
from encoders.modality import Modality
from encoders.shard import Shard
from node.errors import NodeError
from node.pipeline.engines import InProcess, ShardSpec, WorkerProcesses
from tests.conftest import session_weights


def spec(manifest: Path | None = None, sha: str | None = None) -> ShardSpec:
    weights = session_weights()
    return ShardSpec(
        Path(manifest or weights["manifest"]),
        sha or weights["manifest_sha256"],
        "cpu",
        1.0,
        4,
        1,
    )


def requests(count: int) -> list[EncodeRequest]:
    out = []
    for index in range(count):
        text = f"a red circle moves left, number {index}"
        out.append(EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()))
    return out


def worker_pids(engine: WorkerProcesses) -> list[int]:
    return [
        process.pid
        for worker in engine._workers  # a test looks inside: which process to kill
        for process in getattr(worker, "_processes", {}).values()
    ]


async def test_workers_give_exactly_the_node_s_own_embeddings() -> None:
    weights = session_weights()
    shard = Shard.load(Path(weights["manifest"]), weights["manifest_sha256"])
    engine = WorkerProcesses(spec(), 2, shard.weights_id)
    try:
        await engine.start()
        batch = requests(6)
        (theirs, cpu), (again, _) = await asyncio.gather(
            engine.embed(0, batch, b"beacon"), engine.embed(1, batch, b"beacon")
        )
        mine, _ = await InProcess(shard).embed(0, batch, b"beacon")
        for a, b, c in zip(theirs, again, mine, strict=True):
            assert np.array_equal(a.vector, c.vector) and np.array_equal(b.vector, c.vector)
            assert a.encoder_losses == c.encoder_losses
        assert cpu > 0
        # Each worker warmed every modality up before its first batch.
        assert engine.warmed == [["text", "image", "audio", "video"]] * 2
    finally:
        engine.close()


async def test_a_worker_killed_mid_batch_costs_time_never_the_batch() -> None:
    weights = session_weights()
    shard = Shard.load(Path(weights["manifest"]), weights["manifest_sha256"])
    engine = WorkerProcesses(spec(), 1, shard.weights_id)
    try:
        await engine.start()
        (victim,) = worker_pids(engine)
        batch = requests(48)
        # The worker's depth: one batch running, the next waiting in its pipe.
        running = asyncio.create_task(engine.embed(0, batch, b"beacon"))
        behind = asyncio.create_task(engine.embed(0, batch[:8], b"beacon"))
        await asyncio.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        embeddings, _ = await asyncio.wait_for(running, 120)
        waited, _ = await asyncio.wait_for(behind, 120)
        assert len(embeddings) == 48 and len(waited) == 8
        # One new worker took both over (the second loss did not replace it again).
        (replacement,) = worker_pids(engine)
        assert replacement != victim
        mine, _ = await InProcess(shard).embed(0, batch[:3], b"beacon")
        assert all(
            np.array_equal(a.vector, b.vector) for a, b in zip(embeddings[:3], mine, strict=True)
        )
    finally:
        engine.close()


async def test_workers_that_cannot_load_the_weights_stop_the_start(tmp_path: Path) -> None:
    engine = WorkerProcesses(spec(tmp_path / "missing.json", "0" * 64), 1, "x")
    try:
        with pytest.raises(NodeError, match="could not load the weights"):
            await engine.start()
    finally:
        engine.close()


def test_a_node_with_worker_processes_publishes_the_same_embeddings(tmp_path: Path) -> None:
    """Two nodes with one validator key on two brokers: workers or not, the same Results."""
    from node.intake.keys import SigningKey, write_key
    from tests.conftest import start_mosquitto, start_node, write_node_config
    from tests.media import image_bytes, wav_bytes
    from tests.peer import Peer, ResultListener, submission_id

    key = tmp_path / "validator.key"
    write_key(SigningKey.generate(), key)
    peer = Peer()
    raws = [
        peer.submission(
            [("text", "text/plain", b"a red circle"), ("image", "image/png", image_bytes("RGB"))]
        ),
        peer.submission(
            [("text", "text/plain", b"a spoken word"), ("audio", "audio/wav", wav_bytes("PCM_16"))]
        ),
        peer.submission([("text", "text/plain", b"one more caption")]),
    ]
    finals = {}
    # One committee for both: its genesis is in the committee's digest, which seeds
    # the epoch beacon, which seeds the masks that weigh the ensemble's encoders.
    # Two geneses would be two committees whose embeddings differ by up to 1e-3. One
    # epoch for both runs too: on a busy machine the second would start in the next.
    rounds = {
        "genesis_ms": time.time_ns() // 10**6 - 60_000,
        "round_seconds": 2,
        "epoch_rounds": 100_000,
    }
    for workers in (0, 2):
        directory = tmp_path / f"workers-{workers}"
        directory.mkdir()
        broker = start_mosquitto(directory)
        config = write_node_config(
            directory / "node.yaml",
            node={"key": str(key)},
            encoders={"workers": workers},
            rounds=rounds,
        )
        node = start_node(directory / "node", f"mqtt://127.0.0.1:{broker.port}", config)
        try:

            async def scenario(port: int = broker.port) -> list[dict]:
                async with ResultListener(port) as listener:
                    for raw in raws:
                        await listener.publish(raw)
                    return [await listener.final(submission_id(raw), 120) for raw in raws]

            finals[workers] = asyncio.run(scenario())
            if workers:
                assert node.metric("poc_encoder_workers") == workers
        finally:
            assert node.stop() == 0, node.log_text()
            broker.stop()
    for local, pooled in zip(finals[0], finals[2], strict=True):
        assert local["status"] == pooled["status"] == "final"
        # Bit for bit within one batch (above); across nodes the batches differ with
        # timing and the node's own thread runs torch with two threads: float rounding
        # only (measured: at most 1.2e-10), far inside these bounds.
        for a, b in zip(local["embeddings"], pooled["embeddings"], strict=True):
            assert a["modality"] == b["modality"] and a["fused"] == b["fused"]
            va = np.frombuffer(a["vector"], "<f2").astype(np.float64)
            vb = np.frombuffer(b["vector"], "<f2").astype(np.float64)
            assert 1 - va @ vb / np.linalg.norm(va) / np.linalg.norm(vb) < 1e-6
        if local["pair_distance_ppm"] is not None:
            assert abs(local["pair_distance_ppm"] - pooled["pair_distance_ppm"]) < 10


async def test_a_backlog_of_captions_is_encoded_in_batches_of_like_length() -> None:
    """The real shard behind a worker process, the node's encoder service in front: 32
    captions arrive at once, short and long in turn. Batched by wordpieces they pad not
    at all (in arrival order each batch would be padded to a long one), and every
    embedding is the one the caption gets alone."""
    from prometheus_client import CollectorRegistry

    from node.ops.config import DEFAULT_CONFIG, load_config
    from node.ops.metrics import Metrics
    from node.pipeline.batching import BatchPolicy
    from node.pipeline.encoding import EncoderService

    weights = session_weights()
    shard = Shard.load(Path(weights["manifest"]), weights["manifest_sha256"])
    words = ["red", "blue", "green", "small", "large", "round", "square", "bright"] * 2
    texts = [
        caption
        for i, word in enumerate(words)
        for caption in (
            f"a {word} star",
            f"a {word} star moves slowly across a wide field, turning once, number {i}",
        )
    ]
    batch = [EncodeRequest(Modality.TEXT, t, hashlib.sha256(t.encode()).digest()) for t in texts]
    short, long = (
        {shard.input_length(r) for r in batch[::2]},
        {shard.input_length(r) for r in batch[1::2]},
    )
    assert len(short) == len(long) == 1 and short != long  # two lengths, alternating
    policy = BatchPolicy.of(load_config(DEFAULT_CONFIG).encoders)
    metrics = Metrics(CollectorRegistry())
    service = EncoderService(
        shard, policy, 256, metrics, WorkerProcesses(spec(), 1, shard.weights_id)
    )
    await service.engine.start()
    task = asyncio.create_task(service.run())
    try:
        together = await asyncio.gather(*(service.embed([r], b"beacon") for r in batch))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        service.close()
    content, computed = (
        metrics.registry.get_sample_value("poc_encode_text_tokens_total", {"kind": kind})
        for kind in ("content", "computed")
    )
    assert content == sum(shard.input_length(r) for r in batch)
    assert computed == content  # every batch held captions of one length...
    batches = metrics.registry.get_sample_value(
        "poc_encode_batch_items_count", {"modality": "text"}
    )
    assert batches is not None and batches <= 8  # ...and they were batches, not single items
    alone = [shard.embed([r], b"beacon")[0] for r in batch]
    for (mine,), its_own in zip(together, alone, strict=True):
        np.testing.assert_allclose(mine.vector, its_own.vector, atol=1e-5)
