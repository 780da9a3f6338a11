from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from tests.media import mp4_bytes

LIMITS = MediaLimits()
SPEC = DEFAULT_PREPROCESS


def decode(data: bytes, limits: MediaLimits = LIMITS) -> np.ndarray:
    out = decode_media(Modality.VIDEO, "video/mp4", data, limits, SPEC)
    assert isinstance(out, np.ndarray)
    return out


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_mp4_decodes_to_sampled_frames(codec: str) -> None:
    out = decode(mp4_bytes(codec, frames=20))
    assert out.shape == (SPEC.video_frames, 3, SPEC.video_size, SPEC.video_size)
    assert out.dtype == np.float32
    green = out[:, 1].mean(axis=(1, 2))
    assert np.all(np.diff(green) > 0), "uniform samples follow the clip in order"


def test_clip_shorter_than_the_sample_count_repeats_frames() -> None:
    out = decode(mp4_bytes(frames=3))
    assert out.shape[0] == SPEC.video_frames


def test_too_many_frames_is_too_large() -> None:
    with pytest.raises(MediaTooLargeError, match="frames"):
        decode(mp4_bytes(frames=30, fps=30), MediaLimits(video_frames=20))


def test_too_long_is_too_large() -> None:
    with pytest.raises(MediaTooLargeError, match="lasts"):
        decode(mp4_bytes(frames=30, fps=10), MediaLimits(video_seconds=2.0))


def test_the_limit_is_the_pictures_length_not_the_sound_tracks() -> None:
    """The container's duration is its longest track's; found from the outside: a
    10.0 s clip whose sound ran 10.05 s was refused ``too_large``."""
    limits = MediaLimits(video_seconds=2.0)
    clip = mp4_bytes(frames=20, fps=10, sound_seconds=2.4)  # 2.0 s of pictures
    assert decode(clip, limits).shape[0] == SPEC.video_frames
    with pytest.raises(MediaTooLargeError, match=r"lasts 2\.10 s"):
        decode(mp4_bytes(frames=21, fps=10, sound_seconds=1.0), limits)


def _with_display_matrix(clip: bytes, a: int, b: int, c: int, d: int) -> bytes:
    """``clip`` with its track header's matrix set (16.16 fixed point), as a phone writes."""
    at = clip.find(b"tkhd")
    start = at + 8 + (20 if clip[at + 4] == 0 else 32) + 16  # past the times, to the matrix
    matrix = struct.pack(">9i", a, b, 0, c, d, 0, 0, 0, 0x40000000)
    return clip[:start] + matrix + clip[start + 36 :]


def _left_half_bright(frames: int = 4) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[:, :32] = 255
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    ("matrix", "bright"),
    [
        ((0x10000, 0, 0, 0x10000), "left"),  # as stored
        ((0, 0x10000, -0x10000, 0), "top"),  # a phone's portrait clip: a quarter clockwise
        ((0, -0x10000, 0x10000, 0), "bottom"),  # a quarter counterclockwise
        ((-0x10000, 0, 0, -0x10000), "right"),  # upside down
        ((0xB505, 0xB505, -0xB505, 0xB505), "left"),  # 45 degrees: not a quarter, ignored
    ],
)
def test_a_clip_reads_upright_as_its_display_matrix_says(
    matrix: tuple[int, int, int, int], bright: str
) -> None:
    """A phone stores a portrait clip sideways, with a matrix to show it by."""
    frame = decode(_with_display_matrix(_left_half_bright(), *matrix))[0].mean(axis=0)
    inner = frame[16:48, 16:48]  # the picture, inside the pad of a 4:3 frame
    halves = {
        "left": inner[:, :16].mean() - inner[:, 16:].mean(),
        "right": inner[:, 16:].mean() - inner[:, :16].mean(),
        "top": inner[:16].mean() - inner[16:].mean(),
        "bottom": inner[16:].mean() - inner[:16].mean(),
    }
    assert max(halves, key=halves.__getitem__) == bright, halves


def test_resolution_over_pixel_limit_is_too_large() -> None:
    with pytest.raises(MediaTooLargeError, match="pixels"):
        decode(mp4_bytes(frames=2, size=64), MediaLimits(image_pixels=64 * 64 - 1))


def test_truncated_mp4_is_undecodable() -> None:
    data = mp4_bytes(frames=20)
    with pytest.raises(UndecodableError):
        decode(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"\x00\x00\x00\x18ftypisom" + bytes(range(256)), b"garbage" * 20])
def test_garbage_mp4_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableError):
        decode(data)


@pytest.mark.parametrize(("width", "height"), [(96, 48), (48, 96)])
def test_oblong_frames_keep_their_aspect(width: int, height: int) -> None:
    """A frame is fitted like a picture: scaled to the longer side, padded with its edge."""
    import io

    import av

    out_bytes = io.BytesIO()
    with av.open(out_bytes, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(4):
            pixels = np.full((height, width, 3), 235, dtype=np.uint8)
            side = min(width, height) // 2
            top, left = (height - side) // 2, (width - side) // 2
            pixels[top : top + side, left : left + side] = (20, 20, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = decode(out_bytes.getvalue())
    dark = clip[0].mean(axis=0) < -0.5
    rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
    assert abs(len(rows) - len(cols)) <= 2, "the square stays square"
    assert abs(len(rows) - SPEC.video_size / 4) <= 2
    assert clip[0][:, ~dark].min() > 0.6  # padded with the frame's own light edge


def test_a_strip_clip_is_cut_to_one_window_around_its_moving_figure() -> None:
    """A 10:1 clip whose figure moves near its right end: every sampled frame shows
    the whole figure at the scale of a 2.5:1 canvas, and the motion stays."""
    import io

    import av

    width, height, side = 400, 40, 20
    out_bytes = io.BytesIO()
    with av.open(out_bytes, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for f in range(SPEC.video_frames):
            pixels = np.full((height, width, 3), 235, dtype=np.uint8)
            left = 300 + 6 * f
            pixels[10 : 10 + side, left : left + side] = (20, 20, 20)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    clip = decode(out_bytes.getvalue())
    expected = SPEC.video_size * side / (2.5 * height)  # the square shows 100 of 400 columns
    lefts = []
    for frame in clip:
        dark = frame.mean(axis=0) < -0.5
        rows, cols = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
        assert abs(len(cols) - expected) <= 2 and abs(len(rows) - expected) <= 2
        assert cols[0] > 0 and cols[-1] < SPEC.video_size - 1, "the figure is whole"
        lefts.append(cols[0])
    assert lefts == sorted(lefts) and lefts[-1] > lefts[0], "one window: the motion shows"


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_a_clip_decodes_on_the_calling_thread_alone(codec: str) -> None:
    """FFmpeg's default makes helper threads for every clip (decoding) and every frame
    (scaling), and the caller waits on them: more CPU than the clip itself costs. A
    decoder process is one core's worth of work, so a clip never waits on a thread."""
    import resource

    clip = mp4_bytes(codec, frames=12, size=96)
    decode(clip)  # the first call loads what it needs
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    for _ in range(10):
        decode(clip)
    waits = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    # FFmpeg's threads cost dozens of waits a clip; a few stray ones (the GIL taken by
    # another thread of a busy test process) are not that.
    assert waits < 30, f"{waits} waits for 10 clips of 12 frames"


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_only_the_sampled_frames_are_converted_and_the_clip_is_the_same(
    codec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 40-frame clip converts its 8 sampled frames, not 40; a clip past ``HELD_PIXELS``
    converts every frame as it comes (memory stays bounded). Both give the same pixels."""
    from encoders import media_video

    converted: list[int] = []
    scaled = media_video._Frames._scaled

    def counting(self: media_video._Frames, frame: object) -> np.ndarray:
        converted.append(1)
        return scaled(self, frame)  # type: ignore[arg-type]

    monkeypatch.setattr(media_video._Frames, "_scaled", counting)
    clip = mp4_bytes(codec, frames=40, size=64)
    sampled = decode(clip)
    assert len(converted) == SPEC.video_frames
    converted.clear()
    monkeypatch.setattr(media_video, "HELD_PIXELS", 5 * 64 * 64)  # overflows at the 6th frame
    every = decode(clip)
    assert len(converted) == 40
    assert np.array_equal(sampled, every)
    assert sampled.flags.c_contiguous and sampled.dtype == np.float32
