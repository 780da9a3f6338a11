"""Submissions of the closed world, labelled by what a scorer should make of them.

Calibration of the gap cutoff and of the near-duplicate radius, ``poc-node
eval``'s scoring report and ``bench/bench_rewards.py`` all need the same
thing: real submission bytes (PNG/JPEG, WAV from espeak-ng, MP4) of the
kinds an open network receives, each labelled with what it is:

- ``seen``: a new rendering of a concept the history already holds;
- ``novel``: a colour-shape combination the history has never held;
- ``noise``: random pixels, tones, tokens, frames (off the manifold;
  ``NOISE_FAMILIES``);
- ``reencoding``: an accepted datum saved again (JPEG/PNG re-save, resized,
  a few pixels changed, trimmed or re-sampled audio, re-encoded video,
  re-cased or re-spaced text): new bytes, same datum.

Everything is drawn from one ``random.Random`` per stream, so a seed always
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import random
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import av
import numpy as np
import numpy.typing as npt
import soundfile
from PIL import Image

from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.fusion import fuse_pair
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard
from training import render, speech, video
from training.corpus import VIDEO_FPS, VIDEO_FRAMES, VIDEO_SIZE
from training.world import MOTIONS, Concept, caption, still_concepts

NOISE_FAMILIES: dict[Modality, tuple[str, ...]] = {
    Modality.TEXT: ("letters", "symbols"),
    Modality.IMAGE: ("uniform", "gaussian"),
    Modality.AUDIO: ("tones", "white"),
    Modality.VIDEO: ("flicker", "static"),
}
"""Random tokens or characters; uniform or Gaussian pixels; tones or white noise;
flickering or frozen noise frames."""
MEDIA = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
_LIMITS = MediaLimits()


@dataclass(frozen=True)
class WorldItem:
    """One item's file bytes and the concept it shows (None for noise)."""

    modality: Modality
    mime: str
    data: bytes
    concept: Concept | None

    @property
    def sha256(self) -> bytes:
        return hashlib.sha256(self.data).digest()


@dataclass(frozen=True)
class WorldSubmission:
    """The items of one submission (one, or a cross-modal pair) and its kind."""

    kind: str
    items: tuple[WorldItem, ...]


def concepts(*, novel: bool) -> list[Concept]:
    """Still concepts of the history (``novel=False``) or never in it (``novel=True``).

    The novel ones are the colour-shape combinations the encoders never saw
    in training either: the new data Proof of Curiosity is meant to pay for.
    """
    return still_concepts(held_out=novel)


class WorldMaker:
    """Renders labelled submissions from one seeded random stream."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def item(self, modality: Modality, concept: Concept) -> WorldItem:
        """A fresh rendering of ``concept`` in ``modality``."""
        rng = self.rng
        if modality is Modality.TEXT:
            return WorldItem(modality, "text/plain", caption(concept, rng).encode(), concept)
        if modality is Modality.IMAGE:
            mime, data = render.render_image(concept.colour, concept.shape, rng)
            return WorldItem(modality, mime, data, concept)
        if modality is Modality.AUDIO:
            voice = speech.random_voice(rng, held_out=rng.random() < 0.5)
            spoken = caption(concept, rng, spoken=True)
            wav = speech.roughen(speech.speak(spoken, voice), rng)
            return WorldItem(modality, "audio/wav", wav, concept)
        moving = concept if concept.motion else replace(concept, motion=rng.choice(MOTIONS))
        frames = render.render_frames(
            moving.colour, moving.shape, moving.motion, rng, VIDEO_SIZE, VIDEO_FRAMES
        )
        return WorldItem(modality, "video/mp4", video.encode_mp4(frames, VIDEO_FPS, rng), moving)

    def pair(self, kind: str, concept: Concept, media: Modality) -> WorldSubmission:
        """A caption and a ``media`` item of one concept (video captions name the motion)."""
        other = self.item(media, concept)
        assert other.concept is not None
        text = self.item(Modality.TEXT, other.concept)
        return WorldSubmission(kind, (text, other))

    def single(self, kind: str, concept: Concept, modality: Modality) -> WorldSubmission:
        return WorldSubmission(kind, (self.item(modality, concept),))

    def noise(self, modality: Modality) -> WorldSubmission:
        """One off-manifold item of a random family (``NOISE_FAMILIES``)."""
        rng = self.rng
        family = rng.choice(NOISE_FAMILIES[modality])
        np_rng = np.random.default_rng(rng.getrandbits(32))
        if modality is Modality.TEXT:
            if family == "letters":
                words = [
                    "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
                    for _ in range(rng.randint(2, 8))
                ]
                text = " ".join(words)
            else:
                alphabet = string.ascii_letters + string.digits + string.punctuation
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 60)))
            item = WorldItem(modality, "text/plain", text.encode(), None)
        elif modality is Modality.IMAGE:
            size = (rng.choice((64, 96, 128, 200)), rng.choice((64, 96, 128, 200)))
            if family == "uniform":
                pixels = np_rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            else:
                grey = rng.uniform(40, 215)
                values = np_rng.normal(grey, rng.uniform(20, 80), (size[1], size[0], 3))
                pixels = np.clip(values, 0, 255).astype(np.uint8)
            item = WorldItem(modality, "image/png", _png(Image.fromarray(pixels)), None)
        elif modality is Modality.AUDIO:
            rate = 16_000
            length = int(rate * rng.uniform(1.0, 3.0))
            if family == "tones":
                t = np.arange(length) / rate
                signal = np.asarray(
                    sum(
                        np.sin(2 * np.pi * rng.uniform(80, 4000) * t + rng.uniform(0, 6.3))
                        for _ in range(rng.randint(1, 4))
                    )
                )
            else:
                signal = np_rng.normal(0.0, 1.0, length)
            signal = 0.8 * signal / max(1.0, float(np.max(np.abs(signal))))
            item = WorldItem(modality, "audio/wav", _wav(signal, rate), None)
        else:
            shape = (VIDEO_SIZE, VIDEO_SIZE, 3)
            if family == "flicker":
                frames = [np_rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(12)]
            else:
                still = np_rng.integers(0, 256, shape, dtype=np.uint8)
                frames = [still] * VIDEO_FRAMES
            item = WorldItem(modality, "video/mp4", video.encode_mp4(frames, VIDEO_FPS, rng), None)
        return WorldSubmission("noise", (item,))

    def reencode(self, item: WorldItem) -> WorldItem:
        """The same datum in new bytes, the way a copier would make them."""
        rng = self.rng
        if item.modality is Modality.TEXT:
            text = item.data.decode()
            variants = (text.capitalize(), text + ".", text + " ", text.replace(" ", "  ", 1))
            fresh = [v for v in variants if v != text]
            return replace(item, data=rng.choice(fresh).encode())
        if item.modality is Modality.IMAGE:
            mime, data = _reencode_image(item.data, rng)
            return replace(item, mime=mime, data=data)
        if item.modality is Modality.AUDIO:
            return replace(item, data=_reencode_audio(item.data, rng))
        return replace(item, data=_reencode_video(item.data, rng))


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _wav(signal: npt.NDArray[np.float64], rate: int) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, signal, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _reencode_image(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    how = rng.choice(("jpeg", "png", "resize", "pixels"))
    if how == "resize":
        scale = rng.uniform(0.8, 1.25)
        image = image.resize((max(16, round(image.width * scale)),) * 2, Image.Resampling.BICUBIC)
    elif how == "pixels":
        pixels = np.asarray(image).copy()
        for _ in range(rng.randint(1, 8)):
            y, x = rng.randrange(pixels.shape[0]), rng.randrange(pixels.shape[1])
            pixels[y, x] = [rng.randrange(256) for _ in range(3)]
        image = Image.fromarray(pixels)
    if how == "jpeg":
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=rng.randint(60, 95))
        return "image/jpeg", out.getvalue()
    return "image/png", _png(image)


def _reencode_audio(data: bytes, rng: random.Random) -> bytes:
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float64")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    if rng.random() < 0.5:
        cut = int(rate * rng.uniform(0.02, 0.1))
        return _wav(samples[cut:], rate)
    new_rate = rng.choice((22_050, 24_000, 44_100))
    positions = np.linspace(0, len(samples) - 1, int(len(samples) * new_rate / rate))
    return _wav(np.interp(positions, np.arange(len(samples)), samples), new_rate)


def _reencode_video(data: bytes, rng: random.Random) -> bytes:
    container = av.open(io.BytesIO(data), mode="r")
    try:
        frames: list[npt.NDArray[np.uint8]] = [
            np.asarray(frame.to_ndarray(format="rgb24"), dtype=np.uint8)
            for frame in container.decode(video=0)
        ]
    finally:
        container.close()
    return video.encode_mp4(frames, VIDEO_FPS, rng)


@dataclass(frozen=True)
class Embedded:
    """A submission as the node prepares it: final vectors (fused for a valid pair)."""

    submission: WorldSubmission
    vectors: tuple[npt.NDArray[np.float64], ...]
    pair_distance: float | None
    too_far: bool


def embed_submissions(
    shard: Shard,
    submissions: Sequence[WorldSubmission],
    alpha: Mapping[Modality, float],
    beacon: bytes,
    batch: int = 32,
) -> list[Embedded]:
    """Decode, encode and fuse as the node does (``node.pipeline.prepare``)."""
    requests = []
    for submission in submissions:
        for item in submission.items:
            media = decode_media(item.modality, item.mime, item.data, _LIMITS, shard.preprocess)
            requests.append(EncodeRequest(item.modality, media, item.sha256))
    embeddings: list[ItemEmbedding] = []
    for start in range(0, len(requests), batch):
        embeddings.extend(shard.embed(requests[start : start + batch], beacon))
    out = []
    position = 0
    for submission in submissions:
        own = embeddings[position : position + len(submission.items)]
        position += len(submission.items)
        if len(own) == 1:
            out.append(Embedded(submission, (own[0].vector.astype(np.float64),), None, False))
            continue
        a, b = (item.modality for item in submission.items)
        pair = fuse_pair(own[0], own[1], a, b, alpha, shard.delta(a, b))
        vectors = pair.fused if pair.fused is not None else (own[0].vector, own[1].vector)
        out.append(
            Embedded(
                submission,
                tuple(np.asarray(v, dtype=np.float64) for v in vectors),
                pair.distance,
                pair.too_far,
            )
        )
    return out
