"""The pure, expensive path of a submission: decode, encode, fuse.

Shared by intake (a node's own submissions), by the check of a leader's
records, and by ``poc-node audit``: each recomputes a submission the same
way, from its signed bytes and the beacon of its epoch.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

from encoders.embedding import EncodeRequest
from encoders.errors import UnsupportedModalityError
from encoders.fusion import fuse_pair
from encoders.media import MediaLimits
from encoders.modality import Modality
from node.intake.wire import Submission
from node.ops.config import Config
from node.ops.metrics import Metrics
from node.pipeline.encoding import EncoderService
from node.pipeline.sandbox import DecoderPool
from node.rounds.records import Prepared, prepare


class EpochBeacons(Protocol):
    """Where the beacon of an epoch comes from (the live chain, or a store under audit)."""

    async def epoch_beacon(self, epoch: int) -> tuple[int, bytes]: ...


def media_limits(config: Config) -> MediaLimits:
    limits = config.limits
    return MediaLimits(
        text_bytes=limits.text_bytes,
        image_bytes=limits.image_bytes,
        image_pixels=limits.image_pixels,
        audio_seconds=limits.audio_seconds,
        video_seconds=limits.video_seconds,
        video_frames=limits.video_frames,
    )


def fusion_alpha(config: Config) -> dict[Modality, float]:
    return {Modality(name): value for name, value in config.fusion.alpha.items()}


class Preparer:
    """Decodes in the sandbox, encodes in micro-batches, fuses pairs."""

    def __init__(
        self,
        decoders: DecoderPool,
        encoder: EncoderService,
        beacons: EpochBeacons,
        limits: MediaLimits,
        alpha: Mapping[Modality, float],
        metrics: Metrics,
    ) -> None:
        self._decoders = decoders
        self._encoder = encoder
        self._beacons = beacons
        self._limits = limits
        self._alpha = dict(alpha)
        self._metrics = metrics

    async def prepare(self, submission: Submission, epoch: int) -> Prepared:
        """Raises :class:`encoders.errors.EncoderError` for an item that cannot be decoded."""
        shard = self._encoder.shard
        for item in submission.items:
            if item.modality not in shard.modalities:
                raise UnsupportedModalityError(
                    f"these weights read {', '.join(sorted(shard.modalities))}, not {item.modality}"
                )
        epoch, beacon = await self._beacons.epoch_beacon(epoch)
        started = time.perf_counter()
        decodings = [
            self._decoders.decode(
                item.modality, item.mime, item.data, self._limits, shard.preprocess
            )
            for item in submission.items
        ]
        together = sum(item.modality is not Modality.TEXT for item in submission.items) > 1
        try:
            if together:  # two sandboxed decodings at once
                media = list(await asyncio.gather(*decodings))
            else:  # text decodes in place: no task for it
                media = [await decoding for decoding in decodings]
        finally:
            if not together:  # (gather's tasks own theirs)
                for decoding in decodings:
                    decoding.close()  # one never awaited, after the other failed
            self._metrics.stage_seconds.labels(stage="decode").observe(
                time.perf_counter() - started
            )
        requests = [
            EncodeRequest(item.modality, decoded, item.sha256)
            for item, decoded in zip(submission.items, media, strict=True)
        ]
        embeddings = await self._encoder.embed(requests, beacon)
        started = time.perf_counter()
        cpu_started = time.thread_time()
        modalities = [item.modality for item in submission.items]
        pair = None
        if len(modalities) == 2:
            pair = fuse_pair(
                embeddings[0],
                embeddings[1],
                modalities[0],
                modalities[1],
                self._alpha,
                shard.delta(modalities[0], modalities[1]),
            )
        prepared = prepare(
            epoch, modalities, embeddings, pair, [item.sha256 for item in submission.items]
        )
        self._metrics.stage_seconds.labels(stage="fuse").observe(time.perf_counter() - started)
        self._metrics.stage_cpu.labels(stage="fuse").inc(time.thread_time() - cpu_started)
        return prepared
