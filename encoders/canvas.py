"""Fitting a picture of any shape into the square the encoders read, without distorting it.

A picture (or a video frame) is scaled so that its longer side is the square's
side, keeping its aspect ratio, and the shorter side is then padded to the
square with the mean colour of the picture's outermost pixels. Padding, not
cropping: a crop of a wide picture could cut off the figure, which is what the
encoders must see whole. The edge's mean colour, not a fixed grey: the pad
continues the background, which is what reaches a picture's edges, so no frame
of another colour appears for the figure channels to take for a shape; and not
the edge rows repeated, which would smear a figure that touches the edge into
a bar. Both steps are continuous in the pixel values.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def fitted_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is ``size``, each side at least 1."""
    longer = max(width, height)
    return max(1, round(size * width / longer)), max(1, round(size * height / longer))


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
