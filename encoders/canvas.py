"""Fitting a picture of any shape into the square the encoders read, without distorting it.

A picture (or a video frame) keeps its aspect ratio. Up to ``MAX_ASPECT`` (2.5:1,
the most oblong canvas training draws), its longer side is scaled to the square's
side and the shorter side is padded. A more oblong picture is scaled so that a
window of ``MAX_ASPECT`` fills the square, the window is cut where the picture has
the most edges (the figure), and the rest of the square is padded.

**Why pad, and crop only beyond 2.5:1.** Padding keeps everything: a crop of a
wide picture could cut off the figure, which the encoders must see whole. But
padding alone shrinks the figure with the aspect: on a 1000x100 canvas a figure
half the height fills 3 of the square's 64 pixels, too small to name. The window
keeps such a figure at the scale training drew it, and whole as long as it is no
wider than 2.5 times the picture's short side. (Past ``LONGEST`` times the
square, 40:1, the picture is scaled down further instead: a strip, not a picture.)

**Which window.** The one holding the most edges: the sum of absolute
differences between neighbouring pixels inside it, both ways, over the three
colours (and over every frame of a clip, so a clip gets one window). A figure
is edges; a smooth background gradient adds little, uniform noise adds the
same to every window. Ties go to the window nearest the centre,
so a flat picture keeps its middle. It is integer arithmetic on the decoded
8-bit pixels, so every member cuts the same window on any machine; the choice is
not continuous in the pixels, but it is exact, and the pixels are exact too.

**The pad** is the mean colour of the picture's outermost pixels: it continues
the background, which is what reaches a picture's edges, so no frame of another
colour appears for the figure channels to take for a shape; not the edge rows
repeated, which would smear a figure that touches the edge into a bar.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import numpy.typing as npt

MAX_ASPECT = Fraction(5, 2)
"""The most oblong window the square shows: training's most oblong canvas."""
LONGEST = 16
"""A fitted picture's long side is at most this many squares (a 40:1 strip)."""


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` a picture is scaled to before ``fit_square``, each side at least 1.

    The longer side becomes ``size`` up to ``MAX_ASPECT``; past it, ``MAX_ASPECT``
    times the shorter side does (at most ``LONGEST * size`` long). Exact rational
    arithmetic: the same sizes on every machine.
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
    """Frames of one shape cut to at most ``size`` along their long side, where the edges are."""
    height, width = frames[0].shape[:2]
    if height <= size and width <= size:
        return frames
    axis = 1 if width >= height else 0  # the long side's axis in [h, w]
    between = sum(_differences(frame, axis, along=True) for frame in frames)
    within = sum(_differences(frame, axis, along=False) for frame in frames)
    start = _richest_window(np.asarray(between), np.asarray(within), size)
    if axis == 1:
        return [frame[:, start : start + size] for frame in frames]
    return [frame[start : start + size] for frame in frames]


def _differences(frame: npt.NDArray[np.uint8], axis: int, along: bool) -> npt.NDArray[np.int64]:
    """Absolute differences of neighbouring pixels, summed per position on the long axis.

    ``along``: between positions ``i`` and ``i + 1`` of the long axis (one fewer
    than positions); otherwise: across the short axis, within each position.
    """
    pixels = frame.astype(np.int32)
    step = np.abs(np.diff(pixels, axis=axis if along else 1 - axis))
    short = 1 - axis
    sums: npt.NDArray[np.int64] = step.sum(axis=(short, 2), dtype=np.int64)
    return sums


def _richest_window(
    between: npt.NDArray[np.int64], within: npt.NDArray[np.int64], size: int
) -> int:
    """Start of the ``size``-long window holding the most edges; ties nearest the centre.

    A window counts the differences inside it only, so one that starts right at
    a figure's border does not see that border: the figure gets a margin.
    """
    inside = np.concatenate([[0], np.cumsum(within)])
    steps = np.concatenate([[0], np.cumsum(between)])
    windows = inside[size:] - inside[:-size] + steps[size - 1 :] - steps[: -(size - 1) or None]
    best = np.flatnonzero(windows == windows.max())
    middle = (len(within) - size) / 2
    return int(min(best, key=lambda start: (abs(start - middle), start)))


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
