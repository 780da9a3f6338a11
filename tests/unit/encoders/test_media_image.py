from __future__ import annotations

import numpy as np
import pytest

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from tests.media import image_bytes, png_header_only

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
    with pytest.raises(UndecodableError):
        decode(mime, data)
