"""The fit of any picture into the encoders' square: exact sizes, and a window around the figure."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from encoders.canvas import (
    MAX_ASPECT,
    cut_window,
    fit_square,
    fit_squares,
    fitted_size,
    window_start,
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


def _figure_box(square: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns the blue figure reaches, partly covered edge pixels included."""
    figure = (square[:, :, 2].astype(int) - square[:, :, 0]) > 40
    return np.flatnonzero(figure.any(axis=1)), np.flatnonzero(figure.any(axis=0))


def _assert_whole(square: np.ndarray, at_an_end: bool = False) -> None:
    """The 16-pixel figure is in the square, whole: 16 rows, 16 or 17 columns (a cut
    between whole pixels blends its two edge columns), not touching a side."""
    assert ((square[:, :, 2].astype(int) - square[:, :, 0]) > 100).sum() >= 15 * 16
    rows, cols = _figure_box(square)
    assert len(rows) == 16 and len(cols) in (16, 17)
    assert at_an_end or (cols[0] > 0 and cols[-1] < SIZE - 1)


@pytest.mark.parametrize("figure_at", [0, 3, 100, 170, 240])
def test_the_window_holds_the_figure_wherever_it_sits(figure_at: int) -> None:
    """At either end of a 10:1 strip, on a gradient with noise, the figure is cut whole."""
    strip = _strip(figure_at, np.random.default_rng(figure_at))
    square = fit_square(strip, SIZE)
    assert square.shape == (SIZE, SIZE, 3)
    _assert_whole(square, at_an_end=figure_at in (0, 240))


def test_a_tall_strip_is_cut_along_its_rows() -> None:
    strip = _strip(200, np.random.default_rng(1)).transpose(1, 0, 2).copy()
    _assert_whole(fit_square(strip, SIZE).transpose(1, 0, 2))


def test_a_flat_strip_keeps_its_middle() -> None:
    """No edges above the background anywhere: the window stays in the middle."""
    assert window_start(np.zeros(256), SIZE, 26) == 96
    assert window_start(np.full(257, 7.0), SIZE, 26) == 96.5
    strip = np.full((26, 256, 3), 128, dtype=np.uint8)
    strip[:, 200] = 129  # a faint mark far from the middle barely moves it
    (cut,) = cut_window([strip], SIZE)
    assert cut.shape == (26, SIZE, 3)
    assert abs(window_start(_energy(strip)[0], SIZE, 26) - 96) < 2


def test_a_clip_gets_one_window_that_follows_its_figure() -> None:
    """A figure moving along a strip: the window covers its path, the same for every frame."""
    rng = np.random.default_rng(7)
    frames = [_strip(150 + 8 * f, rng) for f in range(4)]
    squares = fit_squares(frames, SIZE)
    for square in squares:
        _assert_whole(square)
    lefts = [_figure_box(square)[1][0] for square in squares]
    assert np.diff(lefts).tolist() == [8, 8, 8]  # one window: the motion is kept


def test_frames_of_different_shapes_are_fitted_alone() -> None:
    rng = np.random.default_rng(3)
    frames = [_strip(20, rng), _strip(20, rng, length=200)]
    squares = fit_squares(frames, SIZE)
    assert [s.shape for s in squares] == [(SIZE, SIZE, 3)] * 2


def test_the_cut_moves_continuously_with_the_pixels() -> None:
    """Members whose decoders round a pixel differently (swscale's SIMD paths) must cut
    alike: one level of difference anywhere moves the window by a fraction of a pixel,
    where an argmax over windows could jump to another near tie."""
    rng = np.random.default_rng(11)
    strip = _strip(120, rng)
    strip[5:21, 40:56] = (200, 40, 40)  # a second, weaker-edged figure: near ties
    base = window_start(sum(_energy(strip)), SIZE, 26)
    for _ in range(20):
        other = np.clip(strip.astype(int) + rng.integers(-1, 2, strip.shape), 0, 255)
        moved = window_start(sum(_energy(other.astype(np.uint8))), SIZE, 26)
        assert abs(moved - base) < 0.5
    squares = [fit_square(strip, SIZE)]
    for shift in (1e-9, 1e-6):  # the start itself: the cut is continuous in it
        energy = _energy(strip)[0]
        nudged = window_start(energy + shift * rng.random(len(energy)), SIZE, 26)
        assert abs(nudged - window_start(energy, SIZE, 26)) < 1e-3
    assert squares[0].shape == (SIZE, SIZE, 3)


def _energy(strip: np.ndarray) -> list[np.ndarray]:
    from encoders.canvas import _edge_energy

    return [_edge_energy(strip, 1)]


def test_a_fractional_start_interpolates_between_whole_pixels() -> None:
    from encoders.canvas import _cut

    ramp = np.repeat(np.arange(0, 200, 2, dtype=np.uint8)[None, :, None], 3, axis=2)  # 0, 2, ...
    assert (_cut(ramp, 1, 10.0, 8)[0, :, 0] == np.arange(20, 36, 2)).all()
    assert (_cut(ramp, 1, 10.5, 8)[0, :, 0] == np.arange(21, 37, 2)).all()
    near = _cut(ramp, 1, 10.999999, 8)[0, :, 0]
    assert (near == _cut(ramp, 1, 11.0, 8)[0, :, 0]).all()
