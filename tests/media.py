"""Builds real test media in memory, so tests need no fixture files."""

from __future__ import annotations

import io
import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import soundfile
from PIL import Image


def noise_png(side: int, seed: int = 0) -> bytes:
    """A ``side`` x ``side`` PNG of random RGB pixels: about 3 * side**2 bytes (noise does
    not compress)."""
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def image_bytes(mode: str, fmt: str = "PNG", size: tuple[int, int] = (40, 30)) -> bytes:
    """A gradient image in ``mode`` saved as ``fmt``."""
    width, height = size
    ramp = np.linspace(0, 255, width * height).reshape(height, width).astype(np.uint8)
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], axis=-1))
    if mode == "I;16":
        image = Image.frombytes("I;16", size, (ramp.astype("<u2") * 257).tobytes())
    elif mode == "LA":
        image = rgb.convert("LA")
    else:
        image = rgb.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def square_on_white(width: int, height: int, fmt: str = "PNG") -> bytes:
    """A blue square, its side half the shorter side, centred on a white canvas of any shape."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    side = max(1, min(width, height) // 2)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste((30, 60, 220), (left, top, left + side, top + side))
    out = io.BytesIO()
    image.save(out, format=fmt, quality=95)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` but which carries no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def tone(seconds: float, rate: int, channels: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def wav_bytes(subtype: str, rate: int = 16_000, channels: int = 1, seconds: float = 0.5) -> bytes:
    """A WAV tone written by libsndfile; subtype e.g. PCM_U8, PCM_16, PCM_24, PCM_32, FLOAT."""
    out = io.BytesIO()
    soundfile.write(out, tone(seconds, rate, channels), rate, subtype=subtype, format="WAV")
    return out.getvalue()


def wav_header_claiming(data_bytes: int, rate: int = 8000) -> bytes:
    """A 16-bit mono WAV header whose data chunk claims ``data_bytes``, with 64 real bytes."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<I", 16) + fmt
    return header + b"data" + struct.pack("<I", data_bytes) + bytes(64)


def mp4_bytes(
    codec: str = "libx264",
    frames: int = 12,
    fps: int = 10,
    size: int = 48,
    sound_seconds: float | None = None,
) -> bytes:
    """A small moving-gradient MP4 encoded with ``codec`` (libx264 or mpeg4), with an
    AAC sound track of ``sound_seconds`` (8 kHz) if given."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        sound = None if sound_seconds is None else container.add_stream("aac", rate=8000)
        for i in range(frames):
            pixels = np.zeros((size, size, 3), dtype=np.uint8)
            pixels[:, :, 0] = (np.arange(size)[None, :] * 4 + i * 10) % 256
            pixels[:, :, 1] = i * 255 // max(1, frames - 1)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if sound is not None and sound_seconds is not None:
            assert isinstance(sound, av.AudioStream)
            total = int(8000 * sound_seconds)
            for start in range(0, total, 1024):
                count = min(1024, total - start)
                wave = 0.3 * np.sin(np.arange(start, start + count) * (2 * np.pi * 440 / 8000))
                chunk = av.AudioFrame.from_ndarray(
                    wave.astype(np.float32)[None, :], format="fltp", layout="mono"
                )
                chunk.sample_rate = 8000
                chunk.pts = start
                chunk.time_base = Fraction(1, 8000)
                for packet in sound.encode(chunk):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return out.getvalue()
