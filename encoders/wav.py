"""A strict RIFF/WAVE reader that learns the duration from the header first.

Reading the chunks ourselves (rather than through libsndfile) lets a header
claiming hours be refused before a single sample is converted, and keeps the
decode worker free of native audio libraries.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from encoders.errors import MediaTooLargeError, UndecodableError

_PCM = 1
_IEEE_FLOAT = 3
_EXTENSIBLE = 0xFFFE
_MAX_CHANNELS = 16
_RATE_RANGE = (1000, 384_000)


@dataclass(frozen=True)
class WavHeader:
    """What the fmt and data chunks declare."""

    encoding: int
    channels: int
    sample_rate: int
    bits: int
    data_offset: int
    data_bytes: int

    @property
    def frames(self) -> int:
        return self.data_bytes // (self.channels * self.bits // 8)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def read_wav(data: bytes, max_seconds: float) -> tuple[npt.NDArray[np.float64], int]:
    """Return mono samples in [-1, 1] and their sample rate.

    Channels are averaged. Audio longer than ``max_seconds`` is ``too_large``,
    judged from the header before any sample is converted.
    """
    header = parse_header(data)
    if header.seconds > max_seconds:
        raise MediaTooLargeError(
            f"WAV holds {header.seconds:.3f} s of audio ({header.frames} sample frames at "
            f"{header.sample_rate} Hz), limit {max_seconds:g} s"
        )
    payload = data[header.data_offset : header.data_offset + header.data_bytes]
    frame_bytes = header.channels * header.bits // 8
    usable = len(payload) - len(payload) % frame_bytes
    if usable == 0:
        raise UndecodableError("WAV data chunk holds no complete sample frame")
    samples = _samples(payload[:usable], header.encoding, header.bits)
    if header.channels == 1:  # the mean of one channel is that channel, bit for bit
        return samples, header.sample_rate
    return samples.reshape(-1, header.channels).mean(axis=1), header.sample_rate


def parse_header(data: bytes) -> WavHeader:
    """Walk the RIFF chunks up to ``data``; nothing after its header is read.

    The data chunk's size is the declared one, unless it runs past the end of
    the bytes: then the data is what the bytes hold. Writers that cannot seek
    back leave a placeholder there (``espeak-ng --stdout`` writes 0x7FFFF000,
    others 0xFFFFFFFF or 0), and a cut file holds what it holds: every player
    reads such a file to its end, and the duration limit judges that.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise UndecodableError("not a RIFF/WAVE file")
    offset = 12
    fmt: tuple[int, int, int, int] | None = None
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = _parse_fmt(data[body : body + size])
        elif chunk_id == b"data":
            if fmt is None:
                raise UndecodableError("WAV data chunk comes before its fmt chunk")
            if size == 0 or body + size > len(data):  # a placeholder, or a cut file
                size = len(data) - body
            return _header(fmt, body, size)
        offset = body + size + (size & 1)
    raise UndecodableError("WAV has no data chunk" if fmt else "WAV has no fmt chunk")


def _header(fmt: tuple[int, int, int, int], body: int, size: int) -> WavHeader:
    encoding, channels, rate, bits = fmt
    return WavHeader(encoding, channels, rate, bits, body, size)


def _parse_fmt(chunk: bytes) -> tuple[int, int, int, int]:
    if len(chunk) < 16:
        raise UndecodableError("WAV fmt chunk is truncated")
    encoding, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", chunk)
    if encoding == _EXTENSIBLE:
        if len(chunk) < 26:
            raise UndecodableError("WAV extensible fmt chunk is truncated")
        (encoding,) = struct.unpack_from("<H", chunk, 24)
    if encoding not in (_PCM, _IEEE_FLOAT):
        raise UndecodableError(f"WAV encoding {encoding:#x} is neither PCM nor IEEE float")
    allowed_bits = (8, 16, 24, 32) if encoding == _PCM else (32, 64)
    if bits not in allowed_bits:
        raise UndecodableError(f"WAV sample width {bits} bits is not supported")
    if not 1 <= channels <= _MAX_CHANNELS:
        raise UndecodableError(f"WAV declares {channels} channels")
    if not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
        raise UndecodableError(f"WAV sample rate {rate} Hz is out of range")
    if block_align != channels * bits // 8:
        raise UndecodableError(f"WAV block align {block_align} does not match its format")
    return encoding, channels, rate, bits


def _samples(payload: bytes, encoding: int, bits: int) -> npt.NDArray[np.float64]:
    if encoding == _IEEE_FLOAT:
        with np.errstate(invalid="ignore"):  # a signalling NaN warns on the cast; refused below
            values = np.frombuffer(payload, dtype="<f4" if bits == 32 else "<f8").astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise UndecodableError("WAV float samples are not finite")
        return np.clip(values, -1.0, 1.0)
    if bits == 8:
        return (np.frombuffer(payload, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    if bits == 24:
        raw = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        return ints.astype(np.float64) / float(1 << 23)
    dtype = "<i2" if bits == 16 else "<i4"
    return np.frombuffer(payload, dtype=dtype).astype(np.float64) / float(1 << (bits - 1))
