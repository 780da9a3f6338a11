from __future__ import annotations

import math
import random

import numpy as np

from training import render
from training.world import COLOURS


def test_backgrounds_stay_far_from_the_shape_and_span_greys_and_hues() -> None:
    rng = random.Random(0)
    corners = []
    for i in range(600):
        colour = list(COLOURS)[i % len(COLOURS)]
        fill = render.shape_colour(colour, rng)
        canvas = np.asarray(render.background((16, 16), fill, rng), dtype=np.float64)
        corner = canvas[0, 0]  # a gradient starts at the first colour, noise aside
        corners.append(corner)
        if canvas.std() == 0:  # flat: every pixel is the first colour
            assert math.dist(corner, fill) >= 110
    corners_array = np.array(corners)
    spread = corners_array.max(axis=1) - corners_array.min(axis=1)
    level = corners_array.mean(axis=1)
    assert 0.25 < np.mean(spread > 80) < 0.45  # about a third coloured
    assert np.mean(level < 40) > 0.05 and np.mean(level > 215) > 0.05  # near black, near white
