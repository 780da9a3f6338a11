"""Hostile bytes against every media decoder (issue 5, item 3).

Real media from ``tests.media``, mutated, and random bytes behind the right
magic number: ``decode_media`` either returns its array or raises
``UndecodableError`` or ``MediaTooLargeError``; any other exception (or a
numpy warning, which ``-W error`` would turn into one) is a decoder bug. The
inputs are small, so a hang would show as a test running for minutes.
"""

from __future__ import annotations

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from tests.media import image_bytes, mp4_bytes, wav_bytes

LIMITS = MediaLimits()

SEEDS: dict[str, tuple[Modality, list[bytes]]] = {
    "image/png": (
        Modality.IMAGE,
        [image_bytes("RGB"), image_bytes("P"), image_bytes("I;16"), image_bytes("LA")],
    ),
    "image/jpeg": (
        Modality.IMAGE,
        [image_bytes("RGB", "JPEG"), image_bytes("L", "JPEG"), image_bytes("CMYK", "JPEG")],
    ),
    "audio/wav": (
        Modality.AUDIO,
        [
            wav_bytes("PCM_16", 16_000, 1, 0.1),
            wav_bytes("PCM_24", 8000, 2, 0.1),
            wav_bytes("FLOAT", 8000, 1, 0.1),
            wav_bytes("DOUBLE", 11_025, 1, 0.05),
            wav_bytes("PCM_U8", 44_100, 2, 0.05),
        ],
    ),
    "video/mp4": (
        Modality.VIDEO,
        [mp4_bytes("libx264", frames=4, size=32), mp4_bytes("mpeg4", frames=4, size=32)],
    ),
    "text/plain": (Modality.TEXT, ["a red circle, é ✓".encode()]),
}
MAGIC = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff",
    "audio/wav": b"RIFF\x00\x10\x00\x00WAVE",
    "video/mp4": b"\x00\x00\x00\x18ftypisom",
    "text/plain": b"",
}
EXAMPLES = {
    "image/png": 600,
    "image/jpeg": 500,
    "audio/wav": 300,
    "video/mp4": 500,
    "text/plain": 200,
}
MIMES = sorted(SEEDS)


def check(mime: str, data: bytes) -> None:
    modality = SEEDS[mime][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            out = decode_media(modality, mime, data, LIMITS, DEFAULT_PREPROCESS)
        except (UndecodableError, MediaTooLargeError):
            return
    if isinstance(out, np.ndarray):
        assert out.dtype == np.float32
        assert np.isfinite(out).all()
    else:
        assert isinstance(out, str)


@st.composite
def mutations(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """Bit flips, boundary bytes and 32-bit words, truncations, insertions, copies."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "set", "word", "truncate", "insert", "copy"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF]))
        elif op == "word" and len(data) >= 4:
            at = min(at, len(data) - 4)
            word = draw(st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
            data[at : at + 4] = word.to_bytes(4, draw(st.sampled_from(["big", "little"])))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        elif op == "copy":
            start = draw(st.integers(0, max(0, len(data) - 1)))
            data[at:at] = data[start : start + draw(st.integers(1, 256))]
    return bytes(data)


def _fuzz_mutated(mime: str) -> None:
    @settings(
        max_examples=EXAMPLES[mime],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations(SEEDS[mime][1]))
    def run(data: bytes) -> None:
        check(mime, data)

    run()


def _fuzz_random(mime: str) -> None:
    @settings(max_examples=EXAMPLES[mime], deadline=None)
    @given(st.binary(max_size=2048))
    def run(tail: bytes) -> None:
        check(mime, MAGIC[mime] + tail)

    run()


def test_the_seeds_decode() -> None:
    for mime, (modality, seeds) in SEEDS.items():
        for data in seeds:
            assert decode_media(modality, mime, data, LIMITS, DEFAULT_PREPROCESS) is not None


def test_mutated_png() -> None:
    _fuzz_mutated("image/png")


def test_mutated_jpeg() -> None:
    _fuzz_mutated("image/jpeg")


def test_mutated_wav() -> None:
    _fuzz_mutated("audio/wav")


def test_mutated_mp4() -> None:
    _fuzz_mutated("video/mp4")


def test_mutated_text() -> None:
    _fuzz_mutated("text/plain")


def test_random_bytes_behind_each_magic_number() -> None:
    for mime in MIMES:
        _fuzz_random(mime)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MIMES), st.sampled_from(MIMES), st.integers(0, 4))
def test_media_under_another_media_type(declared: str, actual: str, index: int) -> None:
    """Bytes of one type declared as another are refused like any other bad bytes."""
    seeds = SEEDS[actual][1]
    check(declared, seeds[index % len(seeds)])


def test_signalling_nan_float_wav_is_undecodable_without_a_warning() -> None:
    """Regression: casting float32 signalling NaNs warned (RuntimeWarning) before refusing."""
    data = bytearray(wav_bytes("FLOAT", 8000, 1, 0.1))
    data[-4:] = b"\x01\x00\x80\x7f"  # float32 sNaN, little-endian
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            decode_media(Modality.AUDIO, "audio/wav", bytes(data), LIMITS, DEFAULT_PREPROCESS)
        except UndecodableError as error:
            assert "not finite" in str(error)
        else:
            raise AssertionError("a WAV holding a NaN sample was accepted")
