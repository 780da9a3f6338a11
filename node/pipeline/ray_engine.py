"""The encoder pool on Ray Serve (``encoders.backend: ray``).

The node connects to a Ray cluster (``encoders.ray.address``), deploys the
shard as a Serve application (``node.pipeline.ray_replica``) and sends it the
micro-batches of its ``EncoderService``. Items are decoded before, in the
node's own sandbox (``node.pipeline.sandbox``: its caps apply there); replicas
receive decoded arrays and text.

- **Weights.** Each replica loads the pinned manifest itself (every file's
  hash checked) and refuses to start with other weights. At start the node
  asks the replicas who they are until it has heard from as many as the
  pool should have; any answer, then or later, from a replica with other
  weights is refused (``NodeError`` naming both ids).
- **Loss of a replica.** A call that fails because its replica died (or the
  connection to it broke) is sent again, at most ``encoders.ray.retries``
  times: the embeddings are a pure function of the bytes, the beacon and the
  weights, so a retry gives what the lost call would have, and the items'
  futures are resolved once, by ``EncoderService``.
- **Health.** A background task reads the application's replica states from
  Serve every ``encoders.ray.health_interval_s``; ``/readyz`` reports the
  pool (``encoder_pool``: a replica running, weights checked) and
  ``poc_encoder_pool_replicas`` the running replicas.

Ray is imported here only when the engine starts, so a node with the
``local`` backend runs without it installed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from encoders.shard import EncodeRequest
from node.errors import EncoderUnavailable, NodeError
from node.ops.metrics import Metrics
from node.pipeline.engines import Embedded

if TYPE_CHECKING:
    from node.ops.config import EncodersSection

log = logging.getLogger("poc.encoding")

DEPLOYMENT = "ShardReplica"
NAMESPACE = "poc"
SLOTS_PER_REPLICA = 2
"""Node batches in flight per replica: one being encoded, one waiting (and gathered with
any other waiting there by ``@serve.batch``), so a replica never idles between two."""
LOST = (ConnectionError, TimeoutError)
"""Besides Ray's actor errors: what a call whose replica went away raises."""
RETRY_PAUSE_S = 0.2
"""Pause before a call is sent again (Serve routes around the dead replica at once)."""


def ray_missing() -> str | None:
    """Why the ``ray`` backend cannot run here, or None."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as error:
        return (
            f"encoders.backend is ray but Ray Serve is not installed ({error}): "
            "pip install -c constraints.txt '.[ray]'"
        )
    return None


def check_weights(expected: str, found: str, replica: str) -> None:
    """Refuse a replica whose weights are not the node's."""
    if found != expected:
        raise NodeError(
            f"encoder replica {replica} runs weights {found}, this node runs {expected}: refused"
        )


class RayServe:
    """A Ray Serve deployment of the pinned shard, ``SLOTS_PER_REPLICA`` batches per replica."""

    def __init__(self, encoders: EncodersSection, weights_id: str, metrics: Metrics) -> None:
        self._encoders = encoders
        self._settings = encoders.ray
        self._weights_id = weights_id
        self._metrics = metrics
        self._handle: Any = None
        self._monitor: asyncio.Task[None] | None = None
        self._in_flight = 0
        self.replicas_running = 0
        self.weights_checked = False

    def _replica_bounds(self) -> tuple[int, int]:
        """(at start, at full size): ``num_replicas`` twice, or the autoscaling bounds."""
        settings = self._settings
        if settings.autoscaling is not None:
            return settings.autoscaling.min_replicas, settings.autoscaling.max_replicas
        assert settings.num_replicas is not None
        return settings.num_replicas, settings.num_replicas

    @property
    def replicas_wanted(self) -> int:
        """Replicas at full size: ``num_replicas``, or the autoscaling maximum."""
        return self._replica_bounds()[1]

    @property
    def replicas_at_start(self) -> int:
        return self._replica_bounds()[0]

    @property
    def slots(self) -> int:
        return SLOTS_PER_REPLICA * self.replicas_wanted

    @property
    def depth(self) -> int:
        return 1  # a replica's second batch already waits there (SLOTS_PER_REPLICA)

    @property
    def ready(self) -> bool:
        """A replica running, and the weights of those that answered checked."""
        return self.weights_checked and self.replicas_running >= 1

    def _options(self) -> dict[str, object]:
        settings = self._settings
        options: dict[str, object] = {
            "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
            # A call waiting at the replica can join the batch being gathered there.
            "max_ongoing_requests": max(SLOTS_PER_REPLICA, settings.max_batch_size) + 1,
            "health_check_period_s": settings.health_interval_s,
        }
        if settings.autoscaling is not None:
            options["autoscaling_config"] = {
                "min_replicas": settings.autoscaling.min_replicas,
                "max_replicas": settings.autoscaling.max_replicas,
                "target_ongoing_requests": SLOTS_PER_REPLICA,
            }
        else:
            options["num_replicas"] = settings.num_replicas
        return options

    def _threads(self) -> int:
        if self._encoders.threads:
            return self._encoders.threads
        return max(1, int(self._settings.num_cpus))

    def _deploy(self) -> Any:
        """Connect to the cluster and (re)deploy the shard; blocking (run off the loop)."""
        import ray
        from ray import serve

        from node.pipeline.ray_replica import ReplicaSpec, deployment

        settings = self._settings
        encoders = self._encoders
        if not ray.is_initialized():
            ray.init(
                address=settings.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        serve.start(proxy_location="Disabled")
        spec = ReplicaSpec(
            encoders.manifest,
            encoders.manifest_sha256,
            self._weights_id,
            encoders.device,
            encoders.tau,
            encoders.mask_count,
            self._threads(),
            settings.max_batch_size,
            settings.batch_wait_timeout_s,
        )
        app = deployment(DEPLOYMENT, self._options()).bind(spec)
        return serve.run(app, name=settings.app_name, route_prefix=None, blocking=False)

    async def start(self) -> None:
        missing = ray_missing()
        if missing is not None:
            raise NodeError(missing)
        settings = self._settings
        started = time.monotonic()
        try:
            async with asyncio.timeout(settings.start_timeout_s):
                self._handle = await asyncio.to_thread(self._deploy)
                await self._check_replicas()
        except TimeoutError:
            raise NodeError(
                f"the encoder pool on Ray ({settings.address}) was not ready within "
                f"{settings.start_timeout_s} s (encoders.ray.start_timeout_s)"
            ) from None
        except NodeError:
            raise
        except Exception as error:
            raise NodeError(
                f"the encoder pool on Ray ({settings.address}) did not start: {error}"
            ) from None
        self._metrics.encoder_pool_replicas.set(self.replicas_running)
        self._monitor = asyncio.create_task(self._watch(), name="encoder-pool")
        log.info(
            "event=encoder_pool_ready address=%s app=%s replicas=%d weights=%s seconds=%.1f",
            settings.address,
            settings.app_name,
            self.replicas_running,
            self._weights_id[:16],
            time.monotonic() - started,
        )

    async def _check_replicas(self) -> None:
        """Hear from every replica of the pool at start; refuse other weights."""
        wanted = self.replicas_at_start
        seen: set[str] = set()
        attempt = 0
        while len(seen) < wanted:
            attempt += 1
            answers = await asyncio.gather(
                *(self._handle.identity.remote() for _ in range(2 * wanted))
            )
            for answer in answers:
                check_weights(self._weights_id, answer.weights_id, answer.replica)
                seen.add(answer.replica)
            if attempt >= 20:  # routing is random: 20 rounds miss a replica practically never
                break
        self.weights_checked = True
        self.replicas_running = len(seen)
        log.info("event=encoder_pool_weights_checked replicas=%s", ",".join(sorted(seen)))

    async def _watch(self) -> None:
        from ray import serve

        settings = self._settings
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployment = status.applications[settings.app_name].deployments[DEPLOYMENT]
                self.replicas_running = int(deployment.replica_states.get("RUNNING", 0))
            except Exception as error:  # the controller is unreachable: no replica known
                log.warning("event=encoder_pool_status_failed error=%r", str(error))
                self.replicas_running = 0
            self._metrics.encoder_pool_replicas.set(self.replicas_running)
            await asyncio.sleep(settings.health_interval_s)

    async def embed(self, slot: int, requests: Sequence[EncodeRequest], beacon: bytes) -> Embedded:
        from ray.exceptions import ActorUnavailableError, RayActorError

        settings = self._settings
        batch = list(requests)
        self._in_flight += len(batch)
        self._metrics.encoder_pool_queued.set(self._in_flight)
        try:
            for attempt in range(settings.retries + 1):
                try:
                    async with asyncio.timeout(settings.call_timeout_s):
                        answer = await self._handle.embed.remote(batch, beacon)
                except (*LOST, RayActorError, ActorUnavailableError) as error:
                    if attempt == settings.retries:
                        raise EncoderUnavailable(
                            f"encoder replicas failed {attempt + 1} times on this batch: "
                            f"{type(error).__name__}"
                        ) from error
                    self._metrics.encoder_pool_retries.inc()
                    log.warning(
                        "event=encoder_replica_lost items=%d attempt=%d error=%s",
                        len(batch),
                        attempt + 1,
                        type(error).__name__,
                    )
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                check_weights(self._weights_id, answer.weights_id, answer.replica)
                embeddings = list(answer.embeddings)
                if len(embeddings) != len(batch):
                    raise NodeError(
                        f"encoder replica {answer.replica} answered {len(embeddings)} "
                        f"embeddings for {len(batch)} items"
                    )
                return embeddings, float(answer.cpu_seconds)
        finally:
            self._in_flight -= len(batch)
            self._metrics.encoder_pool_queued.set(self._in_flight)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        if self._handle is None:
            return
        from ray import serve

        # The node deployed the pool: its replicas go with it (their CPUs back to the cluster).
        try:
            serve.delete(self._settings.app_name, _blocking=False)
        except Exception as error:  # the cluster is gone: nothing to clean up
            log.warning("event=encoder_pool_delete_failed error=%r", str(error))
        # Disconnect now, not in Ray's exit hooks while the interpreter tears down.
        import ray

        ray.shutdown()
