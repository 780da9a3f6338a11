"""Fitting a picture of any shape into the square the encoders read, without distorting it.

A picture (or a video frame) keeps its aspect ratio. Up to ``MAX_ASPECT`` (2.5:1,
the most oblong canvas training draws), its longer side is scaled to the square's
side and the shorter side is padded. A more oblong picture is scaled so that a
window of ``MAX_ASPECT`` fills the square, the window is cut around the picture's
edges (the figure), and the rest of the square is padded.

**Why pad, and crop only beyond 2.5:1.** Padding keeps everything: a crop of a
wide picture could cut off the figure, which the encoders must see whole. But
padding alone shrinks the figure with the aspect: on a 1000x100 canvas a figure
half the height fills 3 of the square's 64 pixels, too small to name. The window
keeps such a figure at the scale training drew it, and whole as long as it is no
wider than 2.5 times the picture's short side. (Past ``LONGEST`` times the
square, 40:1, the picture is scaled down further instead: a strip, not a picture.)

**Which window.** The one centred on the picture's edges: per position of the
long side, the absolute differences between neighbouring pixels, over the
three colours (and over every frame of a clip, so a clip gets one window); the
window's centre is the mean position weighted by the square of that energy
above its median, with a small prior weight at the middle (``window_start``).
A figure is edges; a background's texture, noise or gradient sits at the
median. The window is cut at a fractional start, interpolating between whole
pixels. Every step is continuous in the pixels, as the encoders' channels are:
an argmax over windows would be exact on one machine, but a decoder that
rounds one pixel differently on another (swscale's SIMD paths do) could flip
a near tie and move the figure; here it moves the cut by a fraction of a
pixel. Two figures far apart get a window between them: cut, but the same on
every member.

**The pad** is the mean colour of the picture's outermost pixels: it continues
the background, which is what reaches a picture's edges, so no frame of another
colour appears for the figure channels to take for a shape; not the edge rows
repeated, which would smear a figure that touches the edge into a bar.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import numpy.typing as npt

MAX_ASPECT = Fraction(5, 2)
"""The most oblong window the square shows: training's most oblong canvas."""
LONGEST = 16
"""A fitted picture's long side is at most this many squares (a 40:1 strip)."""
_PRIOR = 24.0
"""The window's prior weight at the middle, as a weak edge: 8 levels in each colour
along every short-side pixel (``window_start``)."""


@functools.lru_cache(maxsize=256)
def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` a picture is scaled to before ``fit_square``, each side at least 1.

    The longer side becomes ``size`` up to ``MAX_ASPECT``; past it, ``MAX_ASPECT``
    times the shorter side does (at most ``LONGEST * size`` long). Exact rational
    arithmetic: the same sizes on every machine. Remembered per shape: a clip asks
    for every frame.
    """
    longer, shorter = max(width, height), min(width, height)
    window = max(min(Fraction(longer), MAX_ASPECT * shorter), Fraction(longer, LONGEST))
    return max(1, round(size * width / window)), max(1, round(size * height / window))


def fit_square(pixels: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """``[h, w, 3]`` from ``fitted_size`` → ``[size, size, 3]``: cut to the window, padded."""
    return fit_squares([pixels], size)[0]


def fit_squares(frames: list[npt.NDArray[np.uint8]], size: int) -> list[npt.NDArray[np.uint8]]:
    """Each ``[h, w, 3]`` frame → ``[size, size, 3]``; frames of one shape share one window."""
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:  # a stream that changed resolution mid-way: each frame alone
        return [fit_squares([frame], size)[0] for frame in frames]
    return [pad_to_square(frame, size) for frame in cut_window(frames, size)]


def cut_window(frames: list[npt.NDArray[np.uint8]], size: int) -> list[npt.NDArray[np.uint8]]:
    """Frames of one shape cut to at most ``size`` along their long side, around the edges."""
    height, width = frames[0].shape[:2]
    if height <= size and width <= size:
        return frames
    axis = 1 if width >= height else 0  # the long side's axis in [h, w]
    energy = sum(_edge_energy(frame, axis) for frame in frames)
    start = window_start(np.asarray(energy, dtype=np.float64), size, min(height, width))
    return [_cut(frame, axis, start, size) for frame in frames]


def _edge_energy(frame: npt.NDArray[np.uint8], axis: int) -> npt.NDArray[np.float64]:
    """Per position on the long axis: the absolute differences of neighbouring pixels at
    it, across the short side, plus half of those to each neighbour along the long side."""
    pixels = frame.astype(np.int32)
    short = 1 - axis
    across = np.abs(np.diff(pixels, axis=short)).sum(axis=(short, 2), dtype=np.int64)
    along = np.abs(np.diff(pixels, axis=axis)).sum(axis=(short, 2), dtype=np.int64)
    energy: npt.NDArray[np.float64] = across.astype(np.float64)
    energy[:-1] += along / 2
    energy[1:] += along / 2
    return energy


def window_start(energy: npt.NDArray[np.float64], size: int, short: int) -> float:
    """Where a ``size``-long window starts: centred on the figure, a continuous function
    of ``energy`` (per position of the long axis).

    Each position weighs the square of its energy above the median (the
    background's texture, noise or gradient, sits at the median); the weighted
    mean position, with a prior weight ``_PRIOR`` per short-side pixel at the
    middle (so a nearly flat picture keeps its middle and no division comes
    near zero), is the window's centre, clamped into the picture.
    """
    length = len(energy)
    excess = np.maximum(energy - np.median(energy), 0.0) ** 2
    prior = (_PRIOR * short) ** 2
    centres = np.arange(length, dtype=np.float64) + 0.5
    centre = (float(excess @ centres) + prior * length / 2) / (float(excess.sum()) + prior)
    return min(max(centre - size / 2, 0.0), float(length - size))


def _cut(frame: npt.NDArray[np.uint8], axis: int, start: float, size: int) -> npt.NDArray[np.uint8]:
    """``size`` positions from ``start`` along ``axis``, linearly interpolated between
    whole positions, so the cut moves continuously with ``start``."""
    whole = int(np.floor(start))
    part = start - whole
    first = np.take(frame, np.arange(whole, whole + size), axis=axis).astype(np.float64)
    if part > 0:
        second = np.take(frame, np.arange(whole + 1, whole + 1 + size), axis=axis)
        first = first * (1.0 - part) + second * part
    return np.rint(first).astype(np.uint8)


def pad_to_square(pixels: npt.NDArray[np.uint8], size: int) -> npt.NDArray[np.uint8]:
    """``[h, w, 3]`` with ``max(h, w) <= size`` → ``[size, size, 3]`` on its edge colour."""
    height, width = pixels.shape[:2]
    if height > size or width > size:
        raise ValueError(f"{width}x{height} does not fit in {size}x{size}")
    if height == width == size:
        return pixels
    edge = np.concatenate(
        [pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]], axis=0, dtype=np.float64
    )
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = np.rint(edge.mean(axis=0)).astype(np.uint8)
    top, left = (size - height) // 2, (size - width) // 2
    out[top : top + height, left : left + width] = pixels
    return out
