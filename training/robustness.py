"""Two figures of ``poc-node eval`` beyond the held-out split: continuity and any shape.

**Continuity.** Members whose arithmetic differs in the last bits (another CPU, a
GPU, another BLAS) must embed an item alike, within ``consensus.embedding_tolerance``,
or they disagree on a round. ``movement`` embeds crafted inputs that could sit on
an edge of a channel (equal colour variances, two colours along (1, -1, 0), flat
pictures, gradients, near-silent audio, static video), each with random ±1e-6
perturbations and the same masks, and reports the largest cosine distance an
embedding moved. The first encoders, whose contrast channel chose an axis's sign by
rounding, moved a red/green picture by 0.022.

**Pictures of any shape.** ``oblong_pairs`` draws each held-out combination on
300x200, 200x300 and 1000x100 canvases, as a new user would, and measures how
many of those pictures the pair check accepts with their caption.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from encoders.embedding import EncodeRequest
from encoders.fusion import cosine_distance
from encoders.media import MediaLimits, decode_media
from encoders.melspec import log_mel
from encoders.modality import Modality
from encoders.shard import Shard
from training import render
from training.world import HELD_OUT, Concept, unseen_captions

EPSILON = 1e-6
EMBEDDING_TOLERANCE = 0.02
"""``consensus.embedding_tolerance`` of the default configuration: a perturbation may
move an embedding by a tenth of it (``tests/unit/encoders/test_continuity.py`` checks
the configuration still says so)."""
PERTURBATIONS = 12
OBLONG_CANVASES = ((300, 200), (200, 300), (1000, 100))

Array = npt.NDArray[np.float32]
Grid = npt.NDArray[np.float64]


def _image(fill: Callable[[Grid, Grid], npt.NDArray[np.float64]]) -> Array:
    y, x = np.mgrid[0:64, 0:64] / 63.0
    return np.ascontiguousarray(fill(y, x).astype(np.float32))


def _figure(ground: tuple[float, ...], ink: tuple[float, ...]) -> Array:
    picture = np.empty((3, 64, 64), dtype=np.float32)
    picture[:] = np.asarray(ground, dtype=np.float32)[:, None, None]
    picture[:, 20:44, 16:40] = np.asarray(ink, dtype=np.float32)[:, None, None]
    return picture


def _cube_stripes(y: Grid, x: Grid) -> npt.NDArray[np.float64]:
    """Eight stripes, the corners of a cube: every colour direction varies equally."""
    corner = np.minimum((x * 8).astype(int), 7)
    return np.stack([((corner >> k) & 1) - 0.5 for k in range(3)]).astype(np.float64)


def _halves(y: Grid, x: Grid) -> npt.NDArray[np.float64]:
    """Red and green halves of equal area: no side is the background."""
    return np.stack([np.where(x < 0.5, 0.5, -0.5), np.where(x < 0.5, -0.5, 0.5), 0 * x])


def crafted_images() -> dict[str, Array]:
    return {
        "equal colour variances": _image(_cube_stripes),
        "red and green along (1, -1, 0)": _figure((0.1, 0.1, 0.0), (0.6, -0.4, 0.0)),
        "red/green halves of equal area": _image(_halves),
        "flat grey": np.full((3, 64, 64), 0.3, dtype=np.float32),
        "flat black": np.full((3, 64, 64), -1.0, dtype=np.float32),
        "grey gradient": _image(lambda y, x: np.stack([x - 0.5] * 3)),
        "colour gradient": _image(lambda y, x: np.stack([x - 0.5, 0.5 - x, y - 0.5])),
        "faint figure at the figure scale": _figure((0.0, 0.0, 0.0), (0.26, 0.26, 0.26)),
    }


def _clip(frame: Callable[[int], Array]) -> Array:
    return np.ascontiguousarray(np.stack([frame(f) for f in range(8)]).astype(np.float32))


def _moving(f: int) -> Array:
    picture = np.full((3, 64, 64), 0.1, dtype=np.float32)
    picture[0, 24:40, 8 + 4 * f : 24 + 4 * f] = 0.6
    picture[1, 24:40, 8 + 4 * f : 24 + 4 * f] = -0.4
    return picture


def crafted_clips() -> dict[str, Array]:
    images = crafted_images()
    return {
        "static figure": _clip(lambda f: images["red and green along (1, -1, 0)"]),
        "static flat": _clip(lambda f: images["flat grey"]),
        "red/green figure moving": _clip(_moving),
        "equal colour variances, still": _clip(lambda f: images["equal colour variances"]),
    }


def _tone(amplitude: float) -> npt.NDArray[np.float64]:
    t = np.arange(16_000) / 16_000
    return amplitude * np.sin(2 * np.pi * 300 * t)


def crafted_waves() -> dict[str, npt.NDArray[np.float64]]:
    """Waveforms (16 kHz): the perturbation goes through the log-mel's floors and peak."""
    return {
        "near silence": _tone(3e-4),  # ten steps of 16-bit PCM
        "digital silence": np.zeros(16_000),
        "a quiet tone": _tone(1e-2),
    }


def _largest_move(
    shard: Shard, modality: Modality, original: object, copies: list[object]
) -> float:
    digest = hashlib.sha256(b"same bytes, same masks").digest()
    requests = [EncodeRequest(modality, m, digest) for m in [original, *copies]]  # type: ignore[arg-type]
    first, *others = shard.embed(requests, b"poc-continuity")
    return max(cosine_distance(first.vector, other.vector) for other in others)


def _flips(shape: tuple[int, ...], rng: np.random.Generator) -> npt.NDArray[np.float64]:
    return rng.choice([-EPSILON, EPSILON], size=shape)


def movement(shard: Shard, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per modality and crafted input, the largest cosine distance a ±1e-6 perturbation moved it."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {"image": {}, "video": {}, "audio": {}}
    for modality, inputs in ((Modality.IMAGE, crafted_images()), (Modality.VIDEO, crafted_clips())):
        for name, array in inputs.items():
            copies: list[object] = [
                (array + _flips(array.shape, rng)).astype(np.float32) for _ in range(PERTURBATIONS)
            ]
            out[str(modality)][name] = _largest_move(shard, modality, array, copies)
    spec = shard.preprocess

    def spectrogram(wave: npt.NDArray[np.float64]) -> Array:
        mel = log_mel(wave, spec.audio_sample_rate, spec.n_mels, spec.audio_frames)
        return mel.astype(np.float32)

    for name, wave in crafted_waves().items():
        copies = [spectrogram(wave + _flips(wave.shape, rng)) for _ in range(PERTURBATIONS)]
        out["audio"][name] = _largest_move(shard, Modality.AUDIO, spectrogram(wave), copies)
    return out


def oblong_pairs(
    shard: Shard, delta: float, seed: int = 0, per_canvas: int = 2
) -> dict[str, float]:
    """Share of held-out pictures on each oblong canvas accepted with a caption within ``delta``.

    Each of the 8 held-out combinations is drawn ``per_canvas`` times per canvas, on
    the renderer's backgrounds, and paired with a phrasing training never saw.
    """
    rng = random.Random(seed)
    out = {}
    for width, height in OBLONG_CANVASES:
        requests: list[EncodeRequest] = []
        for colour, shape in sorted(HELD_OUT):
            for _ in range(per_canvas):
                fill = render.shape_colour(colour, rng)
                canvas = render.background((width, height), fill, rng)
                placement = render.random_placement((width, height), rng, 0.4, 0.8)
                picture = render.draw_shape(canvas, shape, fill, placement, None)
                data = io.BytesIO()
                picture.save(data, format="PNG")
                media = decode_media(
                    Modality.IMAGE, "image/png", data.getvalue(), MediaLimits(), shard.preprocess
                )
                text = rng.choice(unseen_captions(Concept(colour, shape)))
                requests.append(
                    EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data.getvalue()).digest())
                )
                requests.append(
                    EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest())
                )
        embedded = shard.embed(requests, b"poc-oblong")
        accepted = [
            cosine_distance(embedded[i].vector, embedded[i + 1].vector) <= delta
            for i in range(0, len(embedded), 2)
        ]
        out[f"{width}x{height}"] = float(np.mean(accepted))
    return out


def figures(shard: Shard, delta: float) -> dict[str, object]:
    """Both figures, as ``poc-node eval`` and the manifest's ``eval`` hold them."""
    return {"continuity": movement(shard), "oblong_pairs": oblong_pairs(shard, delta)}


def format_report(
    moved: dict[str, dict[str, float]], oblong: dict[str, float], tolerance: float
) -> str:
    lines = [
        f"continuity: largest cosine move under ±{EPSILON:g} perturbations "
        f"(limit {tolerance / 10:g}, a tenth of embedding_tolerance)",
    ]
    for modality, rows in moved.items():
        for name, value in rows.items():
            lines.append(f"  {modality:<6}{name:<36}{value:>12.2e}")
    lines.append("pictures of any shape: held-out pictures accepted with their caption")
    for canvas, share in oblong.items():
        lines.append(f"  {canvas:<10}{share:>8.3f}")
    return "\n".join(lines)
