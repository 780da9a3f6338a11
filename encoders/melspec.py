"""Resampling and log-mel spectrograms in numpy.

torchaudio is unusable beside the CPU torch build (ENVIRONMENT.md) and the
decode workers must not import torch anyway, so both are written here: a
windowed-sinc band-limited resampler and an STFT through ``numpy.fft``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

_HALF_TAPS = 16
_CHUNK = 1 << 15
WINDOW_SECONDS = 0.025
"""STFT window (25 ms) and hop (10 ms): the usual speech/audio-event front end."""
HOP_SECONDS = 0.010
_DYNAMIC_RANGE = 8.0
"""Log10 units kept below the clip's peak (80 dB), as Whisper does."""


def resample(signal: FloatArray, source_rate: int, target_rate: int) -> FloatArray:
    """Band-limited interpolation with a Hann-windowed sinc of 32 taps.

    When downsampling the sinc's cutoff drops to the target's Nyquist
    frequency so that the result is not aliased. Work is chunked to keep the
    tap matrix small.
    """
    if source_rate == target_rate:
        return signal.copy()
    ratio = source_rate / target_rate
    cutoff = min(1.0, 1.0 / ratio)
    n_out = max(1, int(np.floor(len(signal) / ratio)))
    padded = np.concatenate([np.zeros(_HALF_TAPS), signal, np.zeros(_HALF_TAPS + 1)])
    taps = np.arange(-_HALF_TAPS + 1, _HALF_TAPS + 1)
    out = np.empty(n_out)
    for start in range(0, n_out, _CHUNK):
        positions = np.arange(start, min(n_out, start + _CHUNK)) * ratio
        base = np.floor(positions).astype(np.int64)
        offsets = (positions - base)[:, None] - taps[None, :]
        window = 0.5 + 0.5 * np.cos(np.pi * offsets / (_HALF_TAPS + 1))
        kernel = cutoff * np.sinc(cutoff * offsets) * window
        out[start : start + len(positions)] = np.sum(
            padded[base[:, None] + taps[None, :] + _HALF_TAPS] * kernel, axis=1
        )
    return out


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> FloatArray:
    """Triangular HTK-scale filters from 0 Hz to Nyquist, ``[n_mels, n_fft//2+1]``."""

    def to_mel(hz: FloatArray) -> FloatArray:
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    def to_hz(mel: FloatArray) -> FloatArray:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)

    edges = to_hz(np.linspace(0.0, to_mel(np.array(sample_rate / 2.0)), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - bins[None, :]) / np.maximum(upper - centre, 1e-9)
    return np.maximum(0.0, np.minimum(rising, falling))


def log_mel(signal: FloatArray, sample_rate: int, n_mels: int, n_frames: int) -> FloatArray:
    """Log-mel spectrogram scaled to about [-1, 1], exactly ``n_frames`` long.

    Longer clips are average-pooled over equal time segments so the whole
    clip is seen; shorter ones are padded with the clip's floor (silence).
    """
    n_fft = round(WINDOW_SECONDS * sample_rate)
    hop = round(HOP_SECONDS * sample_rate)
    if len(signal) < n_fft:
        signal = np.concatenate([signal, np.zeros(n_fft - len(signal))])
    count = 1 + (len(signal) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    frames = signal[index] * np.hanning(n_fft + 2)[1:-1][None, :]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = mel_filterbank(sample_rate, n_fft, n_mels) @ power.T
    logs = np.log10(np.maximum(mel, 1e-10))
    logs = np.maximum(logs, logs.max() - _DYNAMIC_RANGE)
    scaled = (logs + 4.0) / 4.0
    return _fit_frames(scaled, n_frames)


def _fit_frames(spectrogram: FloatArray, n_frames: int) -> FloatArray:
    count = spectrogram.shape[1]
    if count == n_frames:
        return spectrogram
    if count < n_frames:
        pad = np.full((spectrogram.shape[0], n_frames - count), spectrogram.min())
        return np.concatenate([spectrogram, pad], axis=1)
    bounds = np.linspace(0, count, n_frames + 1).astype(np.int64)
    sums = np.concatenate(
        [np.zeros((spectrogram.shape[0], 1)), np.cumsum(spectrogram, axis=1)], axis=1
    )
    pooled: FloatArray = (sums[:, bounds[1:]] - sums[:, bounds[:-1]]) / (bounds[1:] - bounds[:-1])
    return pooled
