"""MP4 encoding of rendered frames through PyAV (H.264 or MPEG-4 Part 2)."""

from __future__ import annotations

import io
import random
from fractions import Fraction

import av
import numpy as np
import numpy.typing as npt


def encode_mp4(frames: list[npt.NDArray[np.uint8]], fps: int, rng: random.Random) -> bytes:
    """Encode RGB frames ``[H, W, 3]`` as an MP4 with a randomly chosen codec and quality."""
    out = io.BytesIO()
    height, width = frames[0].shape[:2]
    with av.open(out, mode="w", format="mp4") as container:
        if rng.random() < 0.7:
            stream = container.add_stream("libx264", rate=fps)
            stream.options = {"crf": str(rng.randint(18, 32)), "preset": "ultrafast"}
        else:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = rng.choice((150_000, 300_000, 600_000))
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()
