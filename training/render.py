"""Drawing shapes with varied renderings: the pixels change, the concept does not.

Each drawing varies colour tone, background (flat, gradient or noisy; grey
from black to white, or of any colour), canvas size and shape (a third of the
canvases are not square), size, position, rotation, aspect of the diamond,
outline, blur and noise.
Rotations stay within ±30° so that a square never turns into a diamond nor
a cross into an X: those are different concepts in this world.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

from training.world import COLOURS

RGB = tuple[int, int, int]
_SUPERSAMPLE = 4
_MIN_CONTRAST = 110.0
_COLOURED_SHARE = 1 / 3
_OBLONG_SHARE = 1 / 3
"""Share of canvases that are not square: the node keeps a picture's aspect ratio
(``encoders.canvas``), so training must see the padded pictures it makes."""
_MAX_ASPECT = 2.5


@dataclass(frozen=True)
class Placement:
    """Where a shape sits on its canvas, in canvas pixels."""

    cx: float
    cy: float
    radius: float
    rotation: float
    aspect: float


def shape_polygon(shape: str, p: Placement, steps: int = 48) -> list[tuple[float, float]]:
    """The outline of ``shape`` as polygon vertices (a circle is a 48-gon)."""
    if shape == "circle":
        unit = [
            (math.cos(2 * math.pi * i / steps), math.sin(2 * math.pi * i / steps))
            for i in range(steps)
        ]
    elif shape == "square":
        unit = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        unit = [(0.0, -1.0), (0.92, 0.65), (-0.92, 0.65)]
    elif shape == "star":
        unit = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            angle = -math.pi / 2 + i * math.pi / 5
            unit.append((r * math.cos(angle), r * math.sin(angle)))
    elif shape == "diamond":
        unit = [(0.0, -1.0), (p.aspect, 0.0), (0.0, 1.0), (-p.aspect, 0.0)]
    elif shape == "cross":
        a, b = 0.3, 0.95
        unit = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(p.rotation), math.sin(p.rotation)
    return [
        (p.cx + p.radius * (x * cos - y * sin), p.cy + p.radius * (x * sin + y * cos))
        for x, y in unit
    ]


def shape_colour(colour: str, rng: random.Random) -> RGB:
    """The named colour with a small random change of tone."""
    base = COLOURS[colour]
    scale = rng.uniform(0.88, 1.08)
    return tuple(  # type: ignore[return-value]
        int(min(255, max(0, round(v * scale + rng.uniform(-16, 16))))) for v in base
    )


def _distance(a: RGB, b: RGB) -> float:
    return math.dist(a, b)


def canvas_shape(size: int, rng: random.Random) -> tuple[int, int]:
    """``(width, height)``: ``size`` square, or, one time in three, oblong up to 2.5:1."""
    if rng.random() >= _OBLONG_SHARE:
        return size, size
    ratio = math.exp(rng.uniform(math.log(1.25), math.log(_MAX_ASPECT)))
    longer, shorter = size, max(16, 2 * round(size / ratio / 2))  # even: yuv420p video
    return (longer, shorter) if rng.random() < 0.5 else (shorter, longer)


def background(shape: tuple[int, int], fill: RGB, rng: random.Random) -> Image.Image:
    """A background far from ``fill``: flat, gradient or noisy.

    Mostly a grey from black to white with a slight tint; one in three is a
    colour of any hue, so that the shape's colour is the one that names it,
    not merely the one that is not grey (another renderer may well draw a red
    star on blue).
    """
    coloured = rng.random() < _COLOURED_SHARE
    while True:
        if coloured:
            first: RGB = tuple(rng.randint(0, 255) for _ in range(3))  # type: ignore[assignment]
        else:
            level = rng.uniform(0, 255)
            tint = [rng.uniform(-25, 25) for _ in range(3)]
            first = tuple(int(min(255, max(0, level + t))) for t in tint)  # type: ignore[assignment]
        if _distance(first, fill) >= _MIN_CONTRAST:
            break
    kind = rng.random()
    width, height = shape
    base = np.empty((height, width, 3), dtype=np.float64)
    base[:] = first
    if kind < 0.35:
        second = np.array(first) + rng.uniform(-30, 30)
        grad = (
            np.linspace(0.0, 1.0, height)[:, None]
            if rng.random() < 0.5
            else np.linspace(0.0, 1.0, width)[None, :]
        )
        base = base * (1 - grad[..., None]) + second * grad[..., None]
    elif kind < 0.6:
        base += np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(4, 14), base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def random_placement(shape: tuple[int, int], rng: random.Random, lo: float, hi: float) -> Placement:
    width, height = shape
    radius = min(width, height) * rng.uniform(lo, hi) / 2
    margin = radius * 0.9
    return Placement(
        cx=rng.uniform(margin, width - margin),
        cy=rng.uniform(margin, height - margin),
        radius=radius,
        rotation=math.radians(rng.uniform(-30, 30)),
        aspect=rng.uniform(0.5, 0.68),
    )


def draw_shape(
    canvas: Image.Image, shape: str, fill: RGB, p: Placement, outline: RGB | None
) -> Image.Image:
    """Draw ``shape`` anti-aliased (by supersampling) onto a copy of ``canvas``."""
    width, height = canvas.size
    big = canvas.resize((width * _SUPERSAMPLE, height * _SUPERSAMPLE), Image.Resampling.NEAREST)
    scaled = Placement(
        p.cx * _SUPERSAMPLE, p.cy * _SUPERSAMPLE, p.radius * _SUPERSAMPLE, p.rotation, p.aspect
    )
    line = max(1, round(scaled.radius * 0.08)) if outline else 0
    ImageDraw.Draw(big).polygon(
        shape_polygon(shape, scaled), fill=fill, outline=outline, width=line
    )
    return big.resize((width, height), Image.Resampling.LANCZOS)


def _finish(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.4:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.6) * max(image.size) / 96))
    if rng.random() < 0.3:
        noisy = np.asarray(image, dtype=np.float64)
        noisy = noisy + np.random.default_rng(rng.getrandbits(32)).normal(
            0, rng.uniform(2, 10), noisy.shape
        )
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
    return image


def _outline(fill: RGB, rng: random.Random) -> RGB | None:
    if rng.random() >= 0.25:
        return None
    shade = rng.uniform(0.5, 0.8)
    return tuple(int(v * shade) for v in fill)  # type: ignore[return-value]


def render_image(colour: str, shape: str, rng: random.Random) -> tuple[str, bytes]:
    """One still picture as ``(media type, file bytes)``: PNG or JPEG of varied size and shape."""
    shape_of_canvas = canvas_shape(rng.choice((64, 80, 96, 128, 160, 200)), rng)
    fill = shape_colour(colour, rng)
    canvas = background(shape_of_canvas, fill, rng)
    placement = random_placement(shape_of_canvas, rng, 0.35, 0.85)
    image = _finish(draw_shape(canvas, shape, fill, placement, _outline(fill, rng)), rng)
    out = io.BytesIO()
    if rng.random() < 0.5:
        image.save(out, format="PNG")
        return "image/png", out.getvalue()
    image.save(out, format="JPEG", quality=rng.randint(40, 95))
    return "image/jpeg", out.getvalue()


_MOTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def render_frames(
    colour: str, shape: str, motion: str, rng: random.Random, size: int, frames: int
) -> list[npt.NDArray[np.uint8]]:
    """RGB frames of a shape crossing a still background in ``motion``'s direction.

    The frames are ``size`` square or, one clip in three, oblong (``canvas_shape``)."""
    width, height = canvas_shape(size, rng)
    fill = shape_colour(colour, rng)
    canvas = background((width, height), fill, rng)
    outline = _outline(fill, rng)
    radius = min(width, height) * rng.uniform(0.22, 0.4) / 2
    dx, dy = _MOTION_VECTORS[motion]
    length, side = (width, height) if dx else (height, width)
    travel = rng.uniform(0.4, 0.65) * length
    across = rng.uniform(radius, side - radius)
    start = (length - travel) / 2 + rng.uniform(-0.08, 0.08) * length
    rotation = math.radians(rng.uniform(-30, 30))
    aspect = rng.uniform(0.5, 0.68)
    out = []
    for i in range(frames):
        along = start + travel * i / (frames - 1)
        pos = along if (dx > 0 or dy > 0) else length - along
        cx, cy = (pos, across) if dx else (across, pos)
        placement = Placement(cx, cy, radius, rotation, aspect)
        out.append(np.asarray(draw_shape(canvas, shape, fill, placement, outline), dtype=np.uint8))
    return out
