"""MP4 (H.264 or MPEG-4 Part 2) decoding through PyAV with header-first limits."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt
from av.buffer import Buffer
from av.video.reformatter import VideoReformatter

from encoders.canvas import fit_squares, fitted_size
from encoders.errors import EncoderError, MediaTooLargeError, UndecodableError

_CODECS = frozenset({"h264", "mpeg4"})


def decode_mp4(
    data: bytes,
    *,
    max_seconds: float,
    max_frames: int,
    max_pixels: int,
    n_frames: int,
    size: int,
) -> npt.NDArray[np.float32]:
    """Decode to float32 ``[n_frames, 3, size, size]`` in [-1, 1], each frame's aspect kept.

    The container's and stream's declared duration, frame count and
    resolution are checked before the first packet is decoded; the same limits
    are enforced again while decoding, so a lying header only costs the
    decoding up to the limit. ``n_frames`` are sampled uniformly, scaled down
    as for images (``encoders.canvas``) and fitted into the square, with one
    window for the clip where a frame is more oblong than 2.5:1. Only the
    sampled frames are converted to RGB while the clip's decoded frames fit in
    ``HELD_PIXELS``; past it, every frame is scaled down as it is decoded (only
    small RGB frames are kept): the same pixels either way. A clip whose display
    matrix turns it a quarter (a phone's portrait clip) is turned upright.
    """
    if data[4:8] != b"ftyp":
        raise UndecodableError("bytes are not an ISO BMFF (MP4) file")
    try:
        with av.open(io.BytesIO(data), mode="r", format="mp4") as container:
            if not container.streams.video:
                raise UndecodableError("MP4 has no video stream")
            stream = container.streams.video[0]
            # One thread: a decoder process is one core's worth of work, and FFmpeg's
            # default (slice threads for every core, made anew for each clip) costs
            # more CPU than it saves on the short clips a submission carries.
            stream.thread_type = "NONE"
            stream.codec_context.thread_count = 1
            _check_header(container, stream, max_seconds, max_frames, max_pixels)
            frames = _decode_frames(container, stream, max_seconds, max_frames, max_pixels, size)
            if not frames:
                raise UndecodableError("MP4 video stream holds no decodable frame")
            picks = np.linspace(0, len(frames) - 1, n_frames).round().astype(np.int64)
            small = frames.small(picks)
            if frames.turns:  # a phone's portrait clip, stored sideways
                small = [np.ascontiguousarray(np.rot90(f, frames.turns)) for f in small]
    except EncoderError:
        raise
    except Exception as exc:
        raise UndecodableError(f"cannot decode video/mp4: {exc}") from exc
    squares = np.stack(fit_squares(small, size)).transpose(0, 3, 1, 2)
    clip = np.empty(squares.shape, dtype=np.float32)
    np.divide(squares, np.float32(127.5), out=clip, dtype=np.float32)  # = astype, / 127.5, - 1
    return np.subtract(clip, np.float32(1.0), out=clip)


def _check_header(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    max_seconds: float,
    max_frames: int,
    max_pixels: int,
) -> None:
    codec = stream.codec_context.codec.canonical_name  # the format, not the decoder (libdav1d)
    if codec not in _CODECS:
        raise UndecodableError(f"MP4 video codec {codec!r} is not H.264 nor MPEG-4 Part 2")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise MediaTooLargeError(f"video is {width}x{height} pixels, limit {max_pixels} pixels")
    # The video stream's own duration: the container's is that of its longest track,
    # and a phone's sound track often outlasts its pictures by a few milliseconds
    # (found from the outside: a 10.0 s clip with 10.05 s of sound was refused). A
    # header that lies about it is caught while decoding, by the frames' timestamps.
    seconds = 0.0
    if stream.duration and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds > max_seconds:
        raise MediaTooLargeError(f"video lasts {seconds:.2f} s, limit {max_seconds} s")
    declared = stream.frames
    rate = stream.average_rate
    if not declared and rate:
        declared = round(seconds * float(rate))
    if declared > max_frames:
        raise MediaTooLargeError(f"video has {declared} frames, limit {max_frames}")


_TURNS = {
    (0x10000, 0, 0, 0x10000): 0,
    (0, 0x10000, -0x10000, 0): 3,
    (0, -0x10000, 0x10000, 0): 1,
    (-0x10000, 0, 0, -0x10000): 2,
}
"""A display matrix's rotation part (a, b, c, d in 16.16 fixed point) and the quarter
turns counterclockwise (``numpy.rot90``'s k) a player gives the frame: a phone writes
(0, 1, -1, 0) for a portrait clip, shown turned a quarter clockwise."""


def _quarter_turns(frame: av.VideoFrame) -> int:
    """How the clip's display matrix stands it upright. Only the four exact matrices of
    a quarter turn count, read as integers: an angle from floating point would put a
    knife edge between members (a crafted 45 degrees rounds either way)."""
    data: object = frame.side_data.get("DISPLAYMATRIX")
    raw = bytes(data) if isinstance(data, Buffer) else b""
    if len(raw) < 36:
        return 0
    matrix = struct.unpack("=9i", raw[:36])
    return _TURNS.get((matrix[0], matrix[1], matrix[3], matrix[4]), 0)


HELD_PIXELS = 4_000_000
"""Decoded pixels a clip may hold unconverted (about 6 MB of 4:2:0 frames)."""


class _Frames:
    """A clip's decoded frames: held as decoded while they fit in ``HELD_PIXELS``,
    then each scaled down to small RGB at once."""

    def __init__(self, size: int) -> None:
        self._size = size
        # One reformatter for the clip: it keeps its scaling context between frames
        # (a frame's own ``reformat`` builds a new one each time: 3x the cost).
        self._reformatter = VideoReformatter()
        self._held: list[av.VideoFrame] = []
        self._held_pixels = 0
        self._small: list[npt.NDArray[np.uint8]] | None = None
        self.turns = 0  # quarter turns counterclockwise that stand the clip upright

    def __len__(self) -> int:
        return len(self._held) if self._small is None else len(self._small)

    def add(self, frame: av.VideoFrame) -> None:
        if not len(self):
            self.turns = _quarter_turns(frame)
        if self._small is not None:
            self._small.append(self._scaled(frame))
            return
        self._held.append(frame)
        self._held_pixels += frame.width * frame.height
        if self._held_pixels > HELD_PIXELS:  # converted now, and every later frame too
            self._small = [self._scaled(held) for held in self._held]
            self._held = []

    def small(self, picks: npt.NDArray[np.int64]) -> list[npt.NDArray[np.uint8]]:
        """The picked frames, scaled down (each distinct frame converted once)."""
        if self._small is not None:
            return [self._small[i] for i in picks]
        converted = {int(i): self._scaled(self._held[i]) for i in dict.fromkeys(picks.tolist())}
        return [converted[int(i)] for i in picks]

    def _scaled(self, frame: av.VideoFrame) -> npt.NDArray[np.uint8]:
        width, height = fitted_size(frame.width, frame.height, self._size)
        small = self._reformatter.reformat(
            frame, width=width, height=height, format="rgb24", threads=1
        )
        return np.asarray(small.to_ndarray(), dtype=np.uint8)


def _decode_frames(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    max_seconds: float,
    max_frames: int,
    max_pixels: int,
    size: int,
) -> _Frames:
    frames = _Frames(size)
    start: Fraction | None = None
    for frame in container.decode(stream):
        if len(frames) >= max_frames:
            raise MediaTooLargeError(f"video decodes to more than {max_frames} frames")
        if frame.width * frame.height > max_pixels:
            # An in-band parameter set can change the resolution the header declared.
            raise MediaTooLargeError(
                f"video frame is {frame.width}x{frame.height} pixels, limit {max_pixels} pixels"
            )
        if frame.pts is not None and frame.time_base is not None:
            stamp = Fraction(frame.pts) * frame.time_base
            start = stamp if start is None else min(start, stamp)
            if float(stamp - start) > max_seconds:
                raise MediaTooLargeError(f"video runs past {max_seconds} s")
        frames.add(frame)
    return frames
