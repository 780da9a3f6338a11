"""WAV items to fixed-size log-mel spectrograms."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from encoders.melspec import log_mel, resample
from encoders.wav import read_wav


def decode_wav(
    data: bytes, *, max_seconds: float, sample_rate: int, n_mels: int, n_frames: int
) -> npt.NDArray[np.float32]:
    """Decode, mix to mono, resample, and return float32 ``[n_mels, n_frames]``."""
    samples, rate = read_wav(data, max_seconds)
    mono = resample(samples, rate, sample_rate)
    return log_mel(mono, sample_rate, n_mels, n_frames).astype(np.float32)
