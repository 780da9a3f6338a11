"""The encoder pool on Ray Serve, on a real local Ray cluster: a head node this module
starts (2 CPUs), a node with ``encoders.backend: ray`` and two replicas of half a CPU,
real Mosquitto brokers.

The cluster is stopped at the end by killing its process group (``ray stop --force``
would stop every Ray cluster of the machine). Ray replaces 127.0.0.1 by the machine's
own address, so the cluster is not confined to loopback (docs/DESIGN-NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from encoders.embedding import EncodeRequest
from encoders.modality import Modality
from encoders.shard import Shard
from node.intake.keys import SigningKey, write_key
from tests.conftest import (
    ROOT,
    Broker,
    NodeProcess,
    free_port,
    session_weights,
    start_mosquitto,
    start_node,
    write_node_config,
)
from tests.media import noise_png
from tests.peer import Peer, ResultListener, submission_id

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # Ray Serve's own pydantic models, when this process imports it.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray"),
]

RAY = Path(sys.executable).parent / "ray"
APP = "poc-encoders-test"


@dataclass
class Cluster:
    address: str
    group: int


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as error:
        pytest.skip(f"Ray Serve is not installed ({error}): make test installs the '.[ray]' extra")
    # A token left in ~/.ray by an earlier `ray.init()` would turn token authentication
    # on for this cluster: the cluster, the nodes and this process all run without it.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    temp = Path(f"/tmp/poc-ray-{os.getpid()}")  # Ray's socket paths must stay short
    env = dict(
        os.environ,
        # Ray's workers (the replicas) import this checkout's code.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        RAY_USAGE_STATS_ENABLED="0",
    )
    started = subprocess.run(
        [
            str(RAY),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--num-cpus",
            "2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--temp-dir",
            str(temp),
            # Free ports rather than Ray's fixed defaults (10001, 52365, ...).
            "--ray-client-server-port",
            str(free_port()),
            "--dashboard-agent-listen-port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        # Its own process group: the head's daemons and every worker they start are
        # in it, and only they are killed at the end.
        start_new_session=True,
    )
    group = _group_of_port(port)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield Cluster(f"127.0.0.1:{port}", group)
    finally:
        if group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp)], check=False)
        if saved is None:
            del os.environ["RAY_AUTH_MODE"]
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _group_of_port(port: int) -> int:
    """The process group of the GCS server listening on ``port`` (0: none found)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            args
            and args[0].endswith(b"gcs_server")
            and f"--gcs_server_port={port}".encode() in args
        ):
            return os.getpgid(int(entry.name))
    return 0


def replica_pids(app: str = APP) -> list[int]:
    """This app's replica processes (Ray titles them ``ray::ServeReplica:<app>:<deployment>``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{app}:".encode()):
            pids.append(int(entry.name))
    return pids


def _encoder_ticks(pid: int) -> int:
    """CPU ticks of the replica's encoding thread (named ``poc-encoder``)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        if stat.split("(", 1)[1].startswith("poc-encoder)"):
            fields = stat.rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime
    return 0


def _encoding(pid: int, window_s: float = 0.03) -> bool:
    """Whether the replica is encoding a batch (its one torch thread runs)."""
    before = _encoder_ticks(pid)
    time.sleep(window_s)
    return _encoder_ticks(pid) > before


def readiness(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@dataclass
class Setup:
    address: str
    key: Path
    genesis_ms: int
    broker: Broker
    node: NodeProcess


@pytest.fixture(scope="module")
def pooled(ray_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A node whose encoders are two replicas on the cluster."""
    directory = tmp_path_factory.mktemp("pooled")
    key = directory / "validator.key"
    write_key(SigningKey.generate(), key)
    genesis_ms = time.time_ns() // 10**6 - 60_000
    broker = start_mosquitto(directory)
    config = write_node_config(
        directory / "node.yaml",
        node={"key": str(key)},
        # One epoch for the whole module: an item's embedding depends on its epoch's
        # beacon, and the local node compared with this one runs later.
        rounds={"genesis_ms": genesis_ms, "round_seconds": 2, "epoch_rounds": 100_000},
        encoders={
            "threads": 1,  # torch threads per replica (what the local node compared uses)
            "backend": "ray",
            "ray": {
                "address": ray_cluster.address,
                "app_name": APP,
                "num_replicas": 2,
                "num_cpus": 0.5,
                "health_interval_s": 1,
            },
        },
    )
    started = time.monotonic()
    node = start_node(directory / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    print(f"pooled node ready in {time.monotonic() - started:.1f} s")
    try:
        yield Setup(ray_cluster.address, key, genesis_ms, broker, node)
    finally:
        code = node.stop()
        broker.stop()
        assert code == 0, node.log_text()


def test_the_pool_is_ready_and_counted(pooled: Setup) -> None:
    status, body = readiness(pooled.node.metrics_port)
    assert status == 200 and body["encoder_pool"] is True, body
    assert pooled.node.metric("poc_encoder_pool_replicas") == 2
    assert pooled.node.metric("poc_encoder_workers") == 0
    assert "poc_encoder_pool_queued " in pooled.node.metrics()
    assert len(replica_pids()) == 2


def test_a_replica_gives_the_shard_s_own_embeddings_bit_for_bit(pooled: Setup) -> None:
    """The same batch through a replica and through the shard in this process, with the
    replica's one torch thread (an image's last bits depend on torch's thread count)."""
    import ray
    import torch
    from ray import serve

    from node.pipeline.ray_engine import NAMESPACE

    weights = session_weights()
    shard = Shard.load(Path(weights["manifest"]), weights["manifest_sha256"])
    rng = np.random.default_rng(7)
    texts = [f"a red circle moves left, number {index}" for index in range(5)]
    batch = [
        EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()) for text in texts
    ]
    image = rng.random((3, 64, 64), dtype=np.float32)
    images = [EncodeRequest(Modality.IMAGE, image, hashlib.sha256(image.tobytes()).digest())]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(address=pooled.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        handle = serve.get_app_handle(APP)
        for requests in (batch, images):
            answer = handle.embed.remote(requests, b"beacon").result(timeout_s=60)
            assert answer.weights_id == shard.weights_id
            mine = shard.embed(requests, b"beacon")
            for theirs, own in zip(answer.embeddings, mine, strict=True):
                assert theirs.vector.tobytes() == own.vector.tobytes(), requests[0].modality
                assert theirs.encoder_losses == own.encoder_losses
    finally:
        ray.shutdown()
        torch.set_num_threads(threads)


def _submissions(peer: Peer, tag: str, count: int) -> list[bytes]:
    raws = []
    for index in range(count):
        if index % 3 == 0:
            items = [
                ("text", "text/plain", f"{tag}: a red circle, picture {index}".encode()),
                ("image", "image/png", noise_png(48, seed=index)),
            ]
        else:
            items = [("text", "text/plain", f"{tag}: caption number {index}".encode())]
        raws.append(peer.submission(items))
    return raws


def test_submissions_finalize_with_the_local_backend_s_embeddings(
    pooled: Setup, tmp_path: Path
) -> None:
    """One validator key and genesis, two brokers: the pool's Results are the local node's.

    Each submission is sent once the previous one is accepted, so every batch holds one
    item on both nodes, and both encode with one torch thread: the batches and the
    arithmetic are the same, and so are the bytes.
    """
    peer = Peer()
    raws = _submissions(peer, "same", 4)
    broker = start_mosquitto(tmp_path)
    config = write_node_config(
        tmp_path / "node.yaml",
        node={"key": str(pooled.key)},
        rounds={"genesis_ms": pooled.genesis_ms, "round_seconds": 2, "epoch_rounds": 100_000},
        encoders={"threads": 1},  # as the replicas (encoders.threads)
    )
    local = start_node(tmp_path / "node", f"mqtt://127.0.0.1:{broker.port}", config)
    finals: dict[str, list[dict]] = {}
    try:
        for name, port in (("local", broker.port), ("ray", pooled.broker.port)):

            async def scenario(port: int = port) -> list[dict]:
                async with ResultListener(port) as listener:
                    for raw in raws:
                        await listener.publish(raw)
                        await listener.wait_for(
                            submission_id(raw), {"accepted", "final", "rejected"}, 120
                        )
                    return [await listener.final(submission_id(raw), 120) for raw in raws]

            finals[name] = asyncio.run(scenario())
    finally:
        assert local.stop() == 0, local.log_text()
        broker.stop()
    for mine, pooled_result in zip(finals["local"], finals["ray"], strict=True):
        assert mine["status"] == pooled_result["status"] == "final", (mine, pooled_result)
        assert mine["embeddings"] == pooled_result["embeddings"]
        assert mine["pair_distance_ppm"] == pooled_result["pair_distance_ppm"]


def test_a_replica_killed_mid_stream_loses_nothing(pooled: Setup) -> None:
    """Kill a replica's process while batches are at the pool: every submission still
    finalizes, each Result published once; Serve starts a new replica."""
    peer = Peer()
    raws = _submissions(peer, "killed", 30)
    node = pooled.node
    victims = replica_pids()
    assert len(victims) == 2

    async def scenario() -> list[dict]:
        async with ResultListener(pooled.broker.port) as listener:
            for raw in raws:
                await listener.publish(raw)
            # Kill a replica while it encodes: both are busy once the stream is on.
            deadline = time.monotonic() + 30
            while not _encoding(victims[0]):
                assert time.monotonic() < deadline, "the replica never got work"
            os.kill(victims[0], signal.SIGKILL)
            finals = [await listener.final(submission_id(raw), 180) for raw in raws]
            await asyncio.sleep(3)  # a second Result would have come by now
            for raw in raws:
                statuses = [r["status"] for r in listener.about(submission_id(raw))]
                assert statuses == ["accepted", "final"], statuses
            return finals

    finals = asyncio.run(scenario())
    assert all(result["status"] == "final" for result in finals)
    # Serve's router sends some calls of a dead replica again by itself; the others
    # fail at the node, which sends them again (poc_encoder_pool_retries_total counts
    # those; tests/unit/node/test_ray_engine.py tests that path).
    assert "poc_encoder_pool_retries_total " in node.metrics()
    deadline = time.monotonic() + 60
    while node.metric("poc_encoder_pool_replicas") < 2 or len(replica_pids()) < 2:
        assert time.monotonic() < deadline, "Serve did not replace the replica"
        time.sleep(0.5)
    assert victims[0] not in replica_pids()
    status, body = readiness(node.metrics_port)
    assert status == 200 and body["encoder_pool"] is True


def test_a_stop_slower_than_ray_s_abort_timer_still_exits_cleanly(pooled: Setup) -> None:
    """Ray's native SIGTERM handler arms a 3-s SIGALRM that aborts the process
    (ray-project/ray#64830); a drain on a busy machine takes longer. The node is held
    stopped for 4 s once it has begun to drain: it must still finish and exit 0.

    Last in this module (files run in order, whole, on one worker): it stops the
    module's node, whose fixture then finds it exited with 0."""
    node = pooled.node
    node.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while "event=draining" not in node.log_text():  # both handlers have run
        assert time.monotonic() < deadline, "the node did not begin to drain"
        time.sleep(0.005)
    node.process.send_signal(signal.SIGSTOP)
    time.sleep(4)
    node.process.send_signal(signal.SIGCONT)
    # Wait, never signal again: a second SIGTERM during interpreter exit kills.
    assert node.process.wait(60) == 0, node.log_text()[-3000:]
    assert "event=stopped" in node.log_text()
