"""The Ray Serve engine without a cluster: its config, the weights check, the retries.

A fake Serve handle stands in for the deployment; the real one runs in
tests/integration/test_ray_pool.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.modality import Modality
from node.errors import ConfigError, EncoderUnavailable, NodeError
from node.ops.config import load_config
from node.ops.metrics import Metrics
from node.pipeline.ray_engine import RayServe, check_weights

MINE = "a" * 64
OTHER = "b" * 64


@dataclass
class Answer:
    embeddings: list[ItemEmbedding]
    cpu_seconds: float
    weights_id: str
    replica: str
    pid: int


@dataclass
class Identity:
    weights_id: str
    replica: str
    pid: int


class Method:
    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call

    def remote(self, *args: Any) -> Any:
        async def answer() -> Any:
            return self._call(*args)

        return answer()


class FakeHandle:
    """Replicas ``r0``, ``r1``, ... answering in turn; ``failures`` calls fail first."""

    def __init__(self, weights: list[str], failures: int = 0) -> None:
        self.weights = weights
        self.failures = failures
        self.calls = 0
        self._turn = 0
        self.identity = Method(self._identity)
        self.embed = Method(self._embed)

    def _next(self) -> int:
        self._turn = (self._turn + 1) % len(self.weights)
        return self._turn

    def _identity(self) -> Identity:
        index = self._next()
        return Identity(self.weights[index], f"r{index}", 100 + index)

    def _embed(self, requests: list[EncodeRequest], beacon: bytes) -> Answer:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("replica went away")
        index = self._next()
        embeddings = [
            ItemEmbedding(np.full(4, len(r.data_sha256), np.float32), 0.0, 1.0, (0.0,), (True,))
            for r in requests
        ]
        return Answer(embeddings, 0.5, self.weights[index], f"r{index}", 100 + index)


def engine(tmp_path: Path, handle: FakeHandle | None = None, **ray: object) -> RayServe:
    config = load_config(overrides={"encoders.backend": "ray", "encoders.ray": ray})
    pool = RayServe(config.encoders, MINE, Metrics(CollectorRegistry()))
    pool._handle = handle  # a test stands in for the deployment
    return pool


def requests(count: int) -> list[EncodeRequest]:
    return [
        EncodeRequest(Modality.TEXT, f"item {i}", hashlib.sha256(str(i).encode()).digest())
        for i in range(count)
    ]


def test_the_backend_is_local_unless_asked() -> None:
    config = load_config()
    assert config.encoders.backend == "local"
    assert config.encoders.ray.num_replicas == 2 and config.encoders.ray.autoscaling is None


@pytest.mark.parametrize(
    ("ray", "fragment"),
    [
        ({"autoscaling": {"min_replicas": 1, "max_replicas": 3}}, "set num_replicas: null"),
        ({"num_replicas": None}, "give num_replicas or autoscaling"),
        (
            {"num_replicas": None, "autoscaling": {"min_replicas": 3, "max_replicas": 1}},
            "max_replicas (1) is below min_replicas (3)",
        ),
        ({"address": "ray://10.0.0.1:10001"}, "Ray Client (ray://) is not supported"),
        ({"address": "10.0.0.1"}, "must be HOST:PORT"),
        ({"num_cpus": 0}, "encoders.ray.num_cpus"),
        ({"app_name": "a b"}, "encoders.ray.app_name"),
        ({"bogus": 1}, "encoders.ray.bogus"),
    ],
)
def test_bad_pool_settings_are_named(ray: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(overrides={"encoders.backend": "ray", "encoders.ray": ray})
    assert fragment in str(caught.value)
    assert "encoders.ray" in str(caught.value)


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"encoders\.backend"):
        load_config(overrides={"encoders.backend": "spark"})


def test_slots_follow_the_replicas(tmp_path: Path) -> None:
    assert engine(tmp_path, num_replicas=3).slots == 6
    scaled = engine(tmp_path, num_replicas=None, autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert scaled.slots == 8 and scaled.replicas_at_start == 1


def test_a_local_node_never_imports_ray() -> None:
    """The extra is optional: nothing the node imports at start pulls Ray in."""
    import subprocess
    import sys

    code = (
        "import sys, node.daemon, node.pipeline.ray_engine; "
        "sys.exit(1 if 'ray' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_daemon_builds_the_pool_for_backend_ray(tmp_path: Path) -> None:
    from node.daemon import encoder_engine, encoder_workers

    config = load_config(overrides={"encoders.backend": "ray"})

    class Weights:
        weights_id = MINE

    assert isinstance(encoder_engine(config, Weights()), RayServe)  # type: ignore[arg-type]
    assert encoder_workers(config) == 0


def test_other_weights_are_refused_naming_both() -> None:
    with pytest.raises(NodeError) as caught:
        check_weights(MINE, OTHER, "r7")
    assert MINE in str(caught.value) and OTHER in str(caught.value) and "r7" in str(caught.value)
    check_weights(MINE, MINE, "r7")


async def test_a_replica_with_other_weights_stops_the_start(tmp_path: Path) -> None:
    pool = engine(tmp_path, FakeHandle([MINE, OTHER]))
    with pytest.raises(NodeError, match=f"runs weights {OTHER}, this node runs {MINE}"):
        await pool._check_replicas()
    assert not pool.ready


async def test_every_replica_is_heard_at_start(tmp_path: Path) -> None:
    pool = engine(tmp_path, FakeHandle([MINE, MINE]))
    await pool._check_replicas()
    assert pool.ready and pool.replicas_running == 2


async def test_an_answer_from_other_weights_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pool = engine(tmp_path, FakeHandle([OTHER]))
    with pytest.raises(NodeError, match="refused"):
        await pool.embed(0, requests(2), b"beacon")


async def test_a_lost_call_is_sent_again(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    handle = FakeHandle([MINE], failures=2)
    pool = engine(tmp_path, handle, retries=2)
    embeddings, cpu = await pool.embed(0, requests(3), b"beacon")
    assert len(embeddings) == 3 and cpu == 0.5 and handle.calls == 3
    registry = pool._metrics.registry
    assert registry.get_sample_value("poc_encoder_pool_retries_total") == 2
    assert registry.get_sample_value("poc_encoder_pool_queued") == 0


async def test_retries_are_bounded(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    handle = FakeHandle([MINE], failures=10)
    pool = engine(tmp_path, handle, retries=1)
    with pytest.raises(EncoderUnavailable, match="failed 2 times") as caught:
        await pool.embed(0, requests(1), b"beacon")
    assert isinstance(caught.value.__cause__, ConnectionError)
    assert handle.calls == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
def test_a_replica_refuses_to_start_on_other_weights() -> None:
    """The replica's own check, before Serve would count it as running."""
    pytest.importorskip("ray")
    from node.pipeline.ray_replica import ReplicaSpec, ShardReplica
    from tests.conftest import session_weights

    weights = session_weights()
    spec = ReplicaSpec(
        # threads 0: this process's torch threads stay as they are
        Path(weights["manifest"]),
        weights["manifest_sha256"],
        OTHER,
        "cpu",
        1.0,
        4,
        0,
        4,
        0.0,
    )
    with pytest.raises(NodeError, match=f"loaded weights .* the node runs {OTHER}"):
        ShardReplica(spec)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")
@pytest.mark.parametrize(
    "ray",
    [
        {"num_replicas": 2, "num_cpus": 0.5},
        {
            "num_replicas": None,
            "autoscaling": {"min_replicas": 1, "max_replicas": 3},
            "num_gpus": 1,
        },
    ],
)
def test_serve_accepts_the_deployment_options(tmp_path: Path, ray: dict[str, object]) -> None:
    """Serve validates a deployment's options when it is declared: no cluster needed."""
    pytest.importorskip("ray")
    from node.pipeline.ray_replica import deployment

    pool = engine(tmp_path, **ray)
    declared = deployment("ShardReplica", pool._options())
    if pool._settings.autoscaling is None:
        assert declared.num_replicas == 2
    else:
        assert declared._deployment_config.autoscaling_config.max_replicas == 3
