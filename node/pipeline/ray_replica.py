"""The Ray Serve deployment of the shard: what runs in each replica.

Imported only by ``node.pipeline.ray_engine`` (and by Ray in the replicas),
never by a node whose ``encoders.backend`` is ``local``: it imports Ray.

A replica loads the pinned shard from the manifest path and its sha256
(``Shard.load`` checks every file's hash) and refuses to start when the
weights it loaded are not the ones the node runs. It receives items already
decoded by the node's sandbox. ``@serve.batch`` gathers the calls waiting at
the replica (each one micro-batch of the node's ``EncoderService``) and
encodes those of one epoch beacon together, in one ``Shard.embed`` call.
Every answer names the replica and the weights that made it, so the node can
refuse a replica with other weights.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ray import serve

from encoders.shard import EncodeRequest, ItemEmbedding, Shard
from node.errors import NodeError
from node.ops.threads import name_thread, reuse_heap, trim_heap


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica needs to load the node's pinned shard by itself."""

    manifest: Path
    manifest_sha256: str
    weights_id: str
    device: str
    tau: float
    mask_count: int
    threads: int
    max_batch_size: int
    batch_wait_timeout_s: float


@dataclass(frozen=True)
class ReplicaAnswer:
    """One call's embeddings, and who made them."""

    embeddings: list[ItemEmbedding]
    cpu_seconds: float
    weights_id: str
    replica: str
    pid: int


@dataclass(frozen=True)
class Identity:
    weights_id: str
    replica: str
    pid: int


_TRIM_EVERY = 16


class ShardReplica:
    """Holds the pinned shard; encodes decoded items in dynamic batches."""

    def __init__(self, spec: ReplicaSpec) -> None:
        import torch

        reuse_heap()

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self._shard = Shard.load(
            spec.manifest,
            spec.manifest_sha256,
            device=spec.device,
            tau=spec.tau,
            mask_count=spec.mask_count,
        )
        if self._shard.weights_id != spec.weights_id:
            raise NodeError(
                f"this replica loaded weights {self._shard.weights_id}, "
                f"the node runs {spec.weights_id}"
            )
        self._shard.warm_up()  # its first batches then cost what the rest do
        try:
            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (a unit test): the process names it
            self._replica = f"pid-{os.getpid()}"
        # One thread encodes: the replica's event loop stays free to answer.
        self._thread = ThreadPoolExecutor(
            max_workers=1, initializer=name_thread, initargs=("poc-encoder",)
        )
        self._batches = 0
        # The decorator's defaults give way to the node's config.
        self._gathered.set_max_batch_size(spec.max_batch_size)
        self._gathered.set_batch_wait_timeout_s(spec.batch_wait_timeout_s)

    def identity(self) -> Identity:
        return Identity(self._shard.weights_id, self._replica, os.getpid())

    async def embed(self, requests: Sequence[EncodeRequest], beacon: bytes) -> ReplicaAnswer:
        answer: ReplicaAnswer = await self._gathered((list(requests), beacon))
        return answer

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)  # type: ignore[untyped-decorator]
    async def _gathered(
        self, calls: list[tuple[list[EncodeRequest], bytes]]
    ) -> list[ReplicaAnswer]:
        """Calls waiting together: those of one beacon share ``Shard.embed``."""
        loop = asyncio.get_running_loop()
        by_beacon: dict[bytes, list[int]] = {}
        for index, (_, beacon) in enumerate(calls):
            by_beacon.setdefault(beacon, []).append(index)
        answers: dict[int, ReplicaAnswer] = {}
        for beacon, indices in by_beacon.items():
            merged = [request for index in indices for request in calls[index][0]]
            embeddings, cpu = await loop.run_in_executor(self._thread, self._embed, merged, beacon)
            start = 0
            for index in indices:
                count = len(calls[index][0])
                answers[index] = ReplicaAnswer(
                    embeddings[start : start + count],
                    cpu * count / max(1, len(merged)),
                    self._shard.weights_id,
                    self._replica,
                    os.getpid(),
                )
                start += count
        return [answers[index] for index in range(len(calls))]

    def _embed(
        self, requests: list[EncodeRequest], beacon: bytes
    ) -> tuple[list[ItemEmbedding], float]:
        before = resource.getrusage(resource.RUSAGE_SELF)
        embeddings = self._shard.embed(requests, beacon)
        self._batches += 1
        if self._batches % _TRIM_EVERY == 0:
            trim_heap()
        after = resource.getrusage(resource.RUSAGE_SELF)
        return embeddings, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def deployment(name: str, options: dict[str, object]) -> serve.Deployment:
    """``ShardReplica`` as a Serve deployment with the node's resources and replicas."""
    return serve.deployment(ShardReplica, name=name, **options)
