"""The fit of any picture into the encoders' square: exact sizes, and a window around the figure."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encoders.canvas import (
    MAX_ASPECT,
    _richest_window,
    cut_window,
    fit_square,
    fit_squares,
    fitted_size,
)

SIZE = 64


@pytest.mark.parametrize(
    ("width", "height", "fitted"),
    [
        ((300, 200), None, (64, 43)),
        ((1000, 100), None, (256, 26)),  # a 2.5:1 window of it fills the square
        ((100, 1000), None, (26, 256)),
        ((10_000, 1), None, (1024, 1)),  # past 40:1 a strip: at most 16 squares long
        ((50_000, 320), None, (1024, 7)),
    ],
)
def test_fitted_sizes(width: tuple[int, int], height: None, fitted: tuple[int, int]) -> None:
    assert fitted_size(*width, SIZE) == fitted


@given(st.integers(1, 5000), st.integers(1, 5000))
def test_up_to_the_window_aspect_the_longer_side_fills_the_square(width: int, height: int) -> None:
    """The rule pictures of 2.5:1 or less were fitted by before the window existed."""
    longer, shorter = max(width, height), min(width, height)
    out = fitted_size(width, height, SIZE)
    if longer <= MAX_ASPECT * shorter:
        assert out == (max(1, round(SIZE * width / longer)), max(1, round(SIZE * height / longer)))
    else:
        assert max(out) >= SIZE and min(out) <= SIZE * 2 / 5 + 1
    assert max(out) <= 16 * SIZE


def _strip(figure_at: int, rng: np.random.Generator, length: int = 256) -> np.ndarray:
    """A ``[26, length, 3]`` strip: a light gradient with noise, a dark 16-pixel square."""
    ramp = np.linspace(150, 240, length)[None, :, None]
    pixels = ramp + rng.integers(-6, 7, size=(26, length, 3))
    pixels[5:21, figure_at : figure_at + 16] = (30, 60, 200)
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("figure_at", [0, 3, 100, 170, 240])
def test_the_window_holds_the_figure_wherever_it_sits(figure_at: int) -> None:
    """At either end of a 10:1 strip, on a gradient with noise, the figure is cut whole."""
    strip = _strip(figure_at, np.random.default_rng(figure_at))
    square = fit_square(strip, SIZE)
    assert square.shape == (SIZE, SIZE, 3)
    figure = (square[:, :, 2].astype(int) - square[:, :, 0]) > 100
    assert figure.sum() == 16 * 16  # every pixel of it, none cut
    cols = np.flatnonzero(figure.any(axis=0))
    assert (cols[0] > 0 and cols[-1] < SIZE - 1) or figure_at in (0, 240)


def test_a_tall_strip_is_cut_along_its_rows() -> None:
    strip = _strip(200, np.random.default_rng(1)).transpose(1, 0, 2).copy()
    square = fit_square(strip, SIZE)
    assert ((square[:, :, 2].astype(int) - square[:, :, 0]) > 100).sum() == 16 * 16


def test_a_flat_strip_keeps_its_middle() -> None:
    """No edges anywhere: every window ties, and the one nearest the centre wins."""
    strip = np.full((26, 257, 3), 128, dtype=np.uint8)
    strip[:, 128] = 129  # a faint mark in the middle column
    (cut,) = cut_window([strip], SIZE)
    assert cut.shape == (26, SIZE, 3) and (cut == 129).any()
    assert _richest_window(np.zeros(255, np.int64), np.zeros(256, np.int64), SIZE) == 96
    assert _richest_window(np.zeros(256, np.int64), np.zeros(257, np.int64), SIZE) == 96  # 96.5


def test_a_clip_gets_one_window_that_follows_its_figure() -> None:
    """A figure moving along a strip: the window covers its path, the same for every frame."""
    rng = np.random.default_rng(7)
    frames = [_strip(150 + 8 * f, rng) for f in range(4)]
    frames[0][0, 0] = 0  # a mark on the background: where each frame was cut
    squares = fit_squares(frames, SIZE)
    for f, square in enumerate(squares):
        figure = (square[:, :, 2].astype(int) - square[:, :, 0]) > 100
        assert figure.sum() == 16 * 16, f"frame {f} lost part of its figure"
    lefts = [
        np.flatnonzero(((s[:, :, 2].astype(int) - s[:, :, 0]) > 100).any(axis=0))[0]
        for s in squares
    ]
    assert np.diff(lefts).tolist() == [8, 8, 8]  # one window: the motion is kept


def test_frames_of_different_shapes_are_fitted_alone() -> None:
    rng = np.random.default_rng(3)
    frames = [_strip(20, rng), _strip(20, rng, length=200)]
    squares = fit_squares(frames, SIZE)
    assert [s.shape for s in squares] == [(SIZE, SIZE, 3)] * 2


def test_the_window_is_exact_integer_arithmetic() -> None:
    """Members on any machine cut the same window: the energy is an integer sum."""
    rng = np.random.default_rng(11)
    strip = rng.integers(0, 256, size=(26, 300, 3), dtype=np.uint8)
    first = cut_window([strip], SIZE)[0]
    again = cut_window([strip.copy()], SIZE)[0]
    assert np.array_equal(first, again)
    assert Fraction(fitted_size(1000, 100, SIZE)[0]) == 256
