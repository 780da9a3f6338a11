from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from tests.media import image_bytes, png_header_only, square_on_white

LIMITS = MediaLimits()
SIZE = DEFAULT_PREPROCESS.image_size


def decode(mime: str, data: bytes, limits: MediaLimits = LIMITS) -> np.ndarray:
    out = decode_media(Modality.IMAGE, mime, data, limits, DEFAULT_PREPROCESS)
    assert isinstance(out, np.ndarray)
    return out


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "LA", "I;16", "1"])
def test_png_modes_decode_to_rgb_square(mode: str) -> None:
    out = decode("image/png", image_bytes(mode))
    assert out.shape == (3, SIZE, SIZE)
    assert out.dtype == np.float32
    assert -1.0 <= out.min() <= out.max() <= 1.0
    assert out.std() > 0.05


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpeg_modes_decode_to_rgb_square(mode: str) -> None:
    out = decode("image/jpeg", image_bytes(mode, "JPEG", size=(300, 200)))
    assert out.shape == (3, SIZE, SIZE)
    assert out.std() > 0.05


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    out = decode("image/png", image_bytes("I;16"))
    assert out.min() < -0.5
    assert out.max() > 0.5


def test_header_claiming_huge_png_is_too_large_without_decoding() -> None:
    with pytest.raises(MediaTooLargeError):
        decode("image/png", png_header_only(100_000, 100_000))


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(MediaTooLargeError, match="5000x4000"):
        decode("image/png", png_header_only(5000, 4000))


def test_image_over_byte_limit_is_too_large() -> None:
    data = image_bytes("RGB")
    with pytest.raises(MediaTooLargeError):
        decode("image/png", data, MediaLimits(image_bytes=len(data) - 1))


def test_truncated_png_is_undecodable() -> None:
    data = image_bytes("RGB", size=(200, 200))
    with pytest.raises(UndecodableError):
        decode("image/png", data[: len(data) // 2])


def test_header_without_pixels_is_undecodable() -> None:
    with pytest.raises(UndecodableError):
        decode("image/png", png_header_only(10, 10))


@pytest.mark.parametrize(
    ("mime", "data"),
    [
        ("image/png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        ("image/jpeg", b"\xff\xd8\xff" + bytes(500)),
        ("image/png", image_bytes("RGB", "JPEG")),
        ("image/jpeg", b"GIF89a" + bytes(40)),
    ],
)
def test_garbage_or_wrong_type_is_undecodable(mime: str, data: bytes) -> None:
    with pytest.raises(UndecodableError) as caught:
        decode(mime, data)
    # The message reaches the submitter in its Result: it names the problem, never
    # a Python object (Pillow's own names the BytesIO by its address).
    assert "object at 0x" not in str(caught.value) and "BytesIO" not in str(caught.value)


@pytest.mark.parametrize(
    ("width", "height"), [(300, 200), (200, 300), (250, 100), (1000, 100), (100, 1000), (64, 64)]
)
@pytest.mark.parametrize("mime", ["image/png", "image/jpeg"])
def test_a_picture_of_any_shape_keeps_its_aspect_and_the_figure_stays_whole(
    width: int, height: int, mime: str
) -> None:
    """Scaled to fit, padded with its edge colour: a square stays a square, nothing cut.
    Past 2.5:1 the square shows a 2.5:1 window around the figure, so the figure is as
    large as on a 2.5:1 canvas, not 3 pixels."""
    out = decode(mime, square_on_white(width, height, "PNG" if mime == "image/png" else "JPEG"))
    blue = out[2] - out[0] > 0.6  # the figure's pixels
    rows, cols = np.flatnonzero(blue.any(axis=1)), np.flatnonzero(blue.any(axis=0))
    tall, wide = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    shorter, longer = min(width, height), max(width, height)
    expected = SIZE * shorter / min(longer, 2.5 * shorter) / 2
    assert abs(tall - wide) <= 2, f"the square became {wide}x{tall}"  # edge pixels blend
    assert abs(tall - expected) <= 1.5
    assert abs((rows[0] + rows[-1]) / 2 - (SIZE - 1) / 2) <= 1.5  # centred, whole
    assert abs((cols[0] + cols[-1]) / 2 - (SIZE - 1) / 2) <= 1.5
    from encoders.canvas import fitted_size

    shown = [min(side, SIZE) for side in fitted_size(width, height, SIZE)]
    top, left = (SIZE - shown[1]) // 2, (SIZE - shown[0]) // 2
    pad = np.ones((SIZE, SIZE), dtype=bool)
    pad[top : top + shown[1], left : left + shown[0]] = False
    if pad.any():  # the pad is the picture's own white, not a frame of grey
        assert out[:, pad].min() > 0.95


def test_pad_to_square_fills_with_the_mean_edge_colour() -> None:
    from encoders.canvas import pad_to_square

    strip = np.zeros((6, 64, 3), dtype=np.uint8)
    strip[0] = 200  # the top row
    strip[1:5, 30:34] = 90  # an inner figure, not part of the edge
    square = pad_to_square(strip, 64)
    assert square.shape == (64, 64, 3)
    edge = np.concatenate([strip[0], strip[-1], strip[1:-1, 0], strip[1:-1, -1]]).mean(axis=0)
    assert (square[:29] == np.rint(edge)).all() and (square[35:] == np.rint(edge)).all()
    assert (square[29:35] == strip).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_square(np.zeros((65, 10, 3), dtype=np.uint8), 64)


@pytest.mark.parametrize(("width", "height"), [(4000, 1), (1, 4000), (5000, 3)])
def test_a_picture_one_pixel_thin_still_decodes_to_the_square(width: int, height: int) -> None:
    """The thinnest pictures a submitter can send: the short side rounds to one pixel
    (never zero) and the rest is its edge colour, white."""
    out = decode("image/png", square_on_white(width, height))
    assert out.shape == (3, SIZE, SIZE) and np.isfinite(out).all()
    assert (out > 0.95).mean() > 0.95


def _png(image: Image.Image, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **params)
    return out.getvalue()


def _figure_on_transparent_ground(seed: int | None = None) -> Image.Image:
    """A red disc on a transparent ground; with ``seed``, noise hidden under the ground."""
    y, x = np.mgrid[0:96, 0:128]
    inside = (x - 64) ** 2 + (y - 48) ** 2 < 30**2
    pixels = np.zeros((96, 128, 4), dtype=np.uint8)
    if seed is not None:
        pixels[..., :3] = np.random.default_rng(seed).integers(0, 256, (96, 128, 3))
    pixels[inside] = (220, 30, 30, 255)
    pixels[~inside, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def test_what_is_hidden_under_transparent_pixels_is_not_read() -> None:
    """Found from the outside: transparent pixels were read as the colour stored under
    them, so a copy with noise where nobody can see it read as another picture."""
    plain = decode("image/png", _png(_figure_on_transparent_ground()))
    for seed in (1, 2):
        assert np.array_equal(decode("image/png", _png(_figure_on_transparent_ground(seed))), plain)
    # The ground reads white (a transparent picture is drawn for a light page), in every
    # mode that carries transparency.
    assert np.all(plain[:, 0, 0] == 1.0) and plain[0, SIZE // 2, SIZE // 2] > 0.5
    grey = _figure_on_transparent_ground(3).convert("LA")
    assert np.all(decode("image/png", _png(grey))[:, 0, 0] == 1.0)
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (10, 10, 30, 20))
    assert np.all(decode("image/png", _png(palette, transparency=0))[:, 0, 0] == 1.0)
    assert np.all(decode("image/png", _png(palette))[:, 0, 0] == -1.0)  # opaque black
    wide = Image.fromarray(np.full((30, 40), 1000, dtype=np.uint16))  # 16-bit grey
    wide.paste(40000, (10, 10, 30, 20))
    assert np.all(decode("image/png", _png(wide, transparency=1000))[:, 0, 0] == 1.0)
    assert np.all(decode("image/png", _png(wide))[:, 0, 0] < -0.9)


@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_a_photo_reads_upright_as_its_exif_orientation_says(
    orientation: int, turn: Image.Transpose
) -> None:
    """A phone stores a portrait photo sideways, with an EXIF orientation to show it by."""
    picture = _figure_on_transparent_ground(4).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged = decode("image/png", _png(picture, exif=exif))
    assert np.array_equal(tagged, decode("image/png", _png(picture.transpose(turn))))
    assert not np.array_equal(tagged, decode("image/png", _png(picture)))
