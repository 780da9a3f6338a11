"""PNG and JPEG decoding with the pixel limit checked before any pixel is read."""

from __future__ import annotations

import io
import warnings

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from encoders.canvas import fit_square, fitted_size
from encoders.errors import EncoderError, MediaTooLargeError, UndecodableError

_SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG"}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I": 65535.0, "F": 1.0}


def decode_image(
    mime: str, data: bytes, max_bytes: int, max_pixels: int, size: int
) -> npt.NDArray[np.float32]:
    """Decode to float32 ``[3, size, size]`` in [-1, 1]: the whole image, its aspect kept.

    The longer side is scaled to ``size`` and the shorter padded with the colour
    of its edges; a picture more oblong than 2.5:1 is cut to a 2.5:1 window
    around its figure first (``encoders.canvas``). A figure keeps its shape and
    stays whole.

    Pillow's ``open`` reads only the header, so the pixel limit is enforced
    before decoding; Pillow's own decompression-bomb guard is mapped to
    ``too_large`` as well.
    """
    if len(data) > max_bytes:
        raise MediaTooLargeError(f"image is {len(data)} bytes, limit {max_bytes}")
    if not data.startswith(_SIGNATURES[mime]):
        raise UndecodableError(f"bytes do not start with the {mime} signature")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[_FORMATS[mime]])
            width, height = image.size
            if width * height > max_pixels:
                raise MediaTooLargeError(
                    f"image is {width}x{height} pixels, limit {max_pixels} pixels"
                )
            if width == 0 or height == 0:
                raise UndecodableError(f"image has an empty size {width}x{height}")
            if mime == "image/jpeg":
                image.draft("RGB", (size, size))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # a phone's photo stands upright
            picture = _to_rgb(image)
            resized = picture.resize(
                fitted_size(image.width, image.height, size), Image.Resampling.BILINEAR
            )
            if resized.mode == "RGBA":  # resized with its alpha premultiplied, then laid on white
                resized = Image.alpha_composite(
                    Image.new("RGBA", resized.size, (255, 255, 255, 255)), resized
                ).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise MediaTooLargeError(f"image rejected as a decompression bomb: {exc}") from exc
    except EncoderError:
        raise
    except UnidentifiedImageError as exc:
        # Pillow's own message names the BytesIO object by its address: no use to an
        # operator reading the log (a Result carries the reason code alone, §3), and a
        # pointer written where anyone's bytes can put it.
        raise UndecodableError(f"cannot decode {mime}: not a {_FORMATS[mime]} image") from exc
    except Exception as exc:
        raise UndecodableError(f"cannot decode {mime}: {exc}") from exc
    square = fit_square(np.asarray(resized, dtype=np.uint8), size)
    pixels = square.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Bring any mode to 8-bit RGB, or RGBA where the picture has transparency (it is
    laid on white once small); Pillow clips 16-bit grey instead of scaling it.

    Transparent pixels are white, not the colour stored under them: a copy of a
    picture with noise hidden where it is transparent looks the same to anyone and
    must read the same (and a logo on a transparent ground is drawn for a light page).
    """
    if image.mode == "RGBA":
        return image  # (no copy: a 16-Mpixel picture is 64 MB)
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        grey = values.astype(np.float64) / _WIDE_MODES[image.mode]
        grey8 = np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(grey8).convert("RGB")
        key = image.info.get("transparency")
        if isinstance(key, int):  # a PNG's tRNS: this grey value is transparent
            rgb.putalpha(Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8)))
        return rgb
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return image.convert("RGBA")
    return image.convert("RGB")
