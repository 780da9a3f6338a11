"""Decompression bombs and truncated files (issue 5, item 3).

Each bomb claims an absurd size in a header (or hides one past the header)
and must be refused with its reason code, both in this process and through
``node.sandbox.DecoderPool``, whose workers run under a 512 MiB address-space
cap: a decoder that tried to honour the claim would fail there with a memory
error or a timeout (``undecodable``) instead of ``too_large``.

The plain header bombs already tested one by one (a PNG header claiming
100000x100000, a WAV header claiming hours) are reused here for the sandboxed
runs only.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections.abc import Callable, Iterator
from fractions import Fraction
from functools import cache

import av
import numpy as np
import pytest

from encoders.errors import EncoderError, MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from node.pipeline.sandbox import DecoderPool
from tests.media import image_bytes, mp4_bytes, png_header_only, wav_bytes

LIMITS = MediaLimits()
BIG = 4160  # 4160 x 4160 = 17.3 Mpx, over the 16 Mpx limit
MODALITY = {
    "image/png": Modality.IMAGE,
    "image/jpeg": Modality.IMAGE,
    "audio/wav": Modality.AUDIO,
    "video/mp4": Modality.VIDEO,
}


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame header is patched to claim ``width x height``."""
    data = bytearray(image_bytes("RGB", "JPEG", size=(64, 48)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _boxes(
    data: bytes, start: int = 0, end: int | None = None, path: str = ""
) -> Iterator[tuple[str, int]]:
    """(path, offset) of every ISO BMFF box, descending into the track containers."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        name = f"{path}/{kind.decode('latin-1')}"
        yield name, offset
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"):
            yield from _boxes(data, offset + 8, offset + size, name)
        offset += max(size, 8)


def _patch_mp4(patches: Callable[[dict[str, int], bytearray], None]) -> bytes:
    data = bytearray(mp4_bytes(frames=12))
    patches(dict(_boxes(bytes(data))), data)
    return bytes(data)


def mp4_claiming_frames(count: int) -> bytes:
    """The time-to-sample table claims ``count`` frames (its first entry's sample count)."""

    def patch(box: dict[str, int], data: bytearray) -> None:
        stts = box["/moov/trak/mdia/minf/stbl/stts"]
        data[stts + 16 : stts + 20] = struct.pack(">I", count)

    return _patch_mp4(patch)


def mp4_claiming_forever() -> bytes:
    """Every duration field (movie, media, edit list, sample deltas) claims 2^31-1 ticks."""

    def patch(box: dict[str, int], data: bytearray) -> None:
        forever = struct.pack(">I", 2**31 - 1)
        for name, at in (
            ("/moov/mvhd", 24),
            ("/moov/trak/mdia/mdhd", 24),
            ("/moov/trak/edts/elst", 16),
            ("/moov/trak/mdia/minf/stbl/stts", 20),
        ):
            data[box[name] + at : box[name] + at + 4] = forever

    return _patch_mp4(patch)


def _h264_packets(size: int, frames: int) -> tuple[bytes, list[av.Packet]]:
    """Flat frames encoded with SPS/PPS repeated in band; returns (extradata, packets)."""
    context = av.CodecContext.create("libx264", "w")
    context.width = context.height = size
    context.pix_fmt = "yuv420p"
    context.time_base = Fraction(1, 10)
    context.options = {"preset": "ultrafast", "x264-params": "repeat-headers=1"}
    packets: list[av.Packet] = []
    for index in range(frames):
        frame = av.VideoFrame.from_ndarray(
            np.full((size, size, 3), 40 * index, dtype=np.uint8), format="rgb24"
        )
        frame.pts = index
        packets += context.encode(frame)
    packets += context.encode(None)
    return bytes(context.extradata or b""), packets


def _mux(size: int, extradata: bytes, packets: list[av.Packet]) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        assert isinstance(stream, av.VideoStream)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.extradata = extradata
        for index, packet in enumerate(packets):
            packet.stream = stream
            packet.pts = packet.dts = index
            packet.time_base = Fraction(1, 10)
            container.mux(packet)
    return out.getvalue()


@cache
def _big_packets() -> tuple[bytes, list[av.Packet]]:
    return _h264_packets(BIG, 2)


@cache
def mp4_huge_resolution() -> bytes:
    """A real 4160x4160 H.264 MP4 (a few KiB of flat frames)."""
    return _mux(BIG, *_big_packets())


@cache
def mp4_resolution_changing_in_band() -> bytes:
    """Declares 48x48 in its header; in-band SPS switch the stream to 4160x4160."""
    small_extradata, small_packets = _h264_packets(48, 2)
    return _mux(48, small_extradata, small_packets + _big_packets()[1])


BOMBS: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "png-100000x100000": ("image/png", lambda: png_header_only(100_000, 100_000), "bomb"),
    "jpeg-60000x60000": ("image/jpeg", lambda: jpeg_claiming(60_000, 60_000), "bomb"),
    "jpeg-5000x4000": ("image/jpeg", lambda: jpeg_claiming(5000, 4000), "5000x4000"),
    # A header claiming hours holds only its bytes (read to their end, as players do:
    # test_media_audio); what is refused is audio that runs past the limit.
    "wav-40s": ("audio/wav", lambda: wav_bytes("PCM_16", 8000, 1, seconds=40.0), "40.000 s"),
    "mp4-billion-frames": ("video/mp4", lambda: mp4_claiming_frames(10**9), "frames"),
    "mp4-forever": ("video/mp4", mp4_claiming_forever, "lasts"),
    "mp4-4160x4160": ("video/mp4", mp4_huge_resolution, "4160x4160"),
    "mp4-4160x4160-in-band": ("video/mp4", mp4_resolution_changing_in_band, "frame is 4160x4160"),
}
SANDBOXED_BOMBS = [name for name in BOMBS if name != "jpeg-5000x4000"]


def decode(mime: str, data: bytes) -> object:
    return decode_media(MODALITY[mime], mime, data, LIMITS, DEFAULT_PREPROCESS)


@pytest.mark.parametrize("name", [n for n in BOMBS if n != "png-100000x100000"])
def test_bomb_is_too_large(name: str) -> None:
    mime, build, detail = BOMBS[name]
    with pytest.raises(MediaTooLargeError, match=detail):
        decode(mime, build())


def test_resolution_changed_in_band_is_too_large_not_decoded() -> None:
    """Regression: only the header's resolution was checked, not each decoded frame's."""
    header = av.open(io.BytesIO(mp4_resolution_changing_in_band()))
    with header:
        assert header.streams.video[0].codec_context.width == 48
    with pytest.raises(MediaTooLargeError, match="frame is 4160x4160"):
        decode("video/mp4", mp4_resolution_changing_in_band())
    small = decode_media(
        Modality.VIDEO,
        "video/mp4",
        mp4_bytes(frames=2, size=48),
        MediaLimits(image_pixels=48 * 48),
        DEFAULT_PREPROCESS,
    )
    assert isinstance(small, np.ndarray)


# A cut WAV is not here: it holds its first samples, and is read to its end
# (test_media_audio.test_a_cut_wav_decodes_what_it_holds).
TRUNCATABLE: dict[str, Callable[[], bytes]] = {
    "image/png": lambda: image_bytes("RGB", size=(200, 150)),
    "image/jpeg": lambda: image_bytes("RGB", "JPEG", size=(300, 200)),
    "video/mp4": lambda: mp4_bytes(frames=12),
}


@pytest.mark.parametrize("mime", sorted(TRUNCATABLE))
@pytest.mark.parametrize("keep", [0.01, 0.25, 0.75, 0.9])
def test_truncated_file_is_undecodable(mime: str, keep: float) -> None:
    data = TRUNCATABLE[mime]()
    assert decode(mime, data) is not None
    with pytest.raises(UndecodableError):
        decode(mime, data[: max(1, int(len(data) * keep))])


# --- the same bombs in the capped decoder processes ---------------------------


@pytest.fixture(scope="module")
def pool() -> Iterator[DecoderPool]:
    decoders = DecoderPool(workers=1, timeout_s=60, memory_mb=512)
    yield decoders
    decoders.close()


def sandboxed(pool: DecoderPool, mime: str, data: bytes) -> EncoderError | None:
    async def run() -> None:
        await pool.decode(MODALITY[mime], mime, data, LIMITS, DEFAULT_PREPROCESS)

    try:
        asyncio.run(run())
    except EncoderError as error:
        return error
    return None


@pytest.mark.parametrize("name", SANDBOXED_BOMBS)
def test_bomb_is_too_large_in_the_capped_decoder(pool: DecoderPool, name: str) -> None:
    mime, build, detail = BOMBS[name]
    error = sandboxed(pool, mime, build())
    assert isinstance(error, MediaTooLargeError), error
    assert detail in str(error)
    assert error.reason == "too_large"


@pytest.mark.parametrize("mime", sorted(TRUNCATABLE))
def test_truncated_file_is_undecodable_in_the_capped_decoder(pool: DecoderPool, mime: str) -> None:
    data = TRUNCATABLE[mime]()
    error = sandboxed(pool, mime, data[: len(data) * 3 // 4])
    assert isinstance(error, UndecodableError), error
    assert error.reason == "undecodable"
    assert not any(word in str(error) for word in ("longer than", "died", "memory")), error
    assert sandboxed(pool, mime, data) is None, "the slot still decodes good media"
