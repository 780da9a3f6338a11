"""Resampling and log-mel spectrograms in numpy.

torchaudio is unusable beside the CPU torch build (ENVIRONMENT.md) and the
decode workers must not import torch anyway, so both are written here: a
windowed-sinc band-limited resampler and an STFT through ``numpy.fft``.
"""

from __future__ import annotations

import functools
from fractions import Fraction

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
FLOOR_POWER = 1e-8
"""Mel-band power below which a band is silence (log-mel -1.0 after scaling).

About the quantisation noise of 16-bit PCM in one band (half-LSB dither gives
2.5e-8 in the median band): nothing quieter can be carried by the common WAV,
and a waveform changed by 1e-6 per sample (3e-9 in its loudest band) stays
under it, so last-bit differences between members never reach the model. A
floor of 1e-10 let that change repaint every silent band with noise."""


def resample(signal: FloatArray, source_rate: int, target_rate: int) -> FloatArray:
    """Band-limited interpolation with a Hann-windowed sinc of 32 taps.

    When downsampling the sinc's cutoff drops to the target's Nyquist
    frequency so that the result is not aliased. Output sample ``i`` sits at
    ``i * p / q`` input samples (``p / q`` the reduced ratio of the rates), so
    its kernel depends only on the phase ``i * p mod q``: the kernels are
    computed once per phase (polyphase) and every output is a 32-tap dot
    product.

    Every ``q`` outputs read the same pattern of inputs shifted by ``p``, so
    for the usual rates (a small ``p`` and ``q``) one period's kernels form a
    ``[q, p + 32]`` matrix and the whole signal is a matrix product over
    windows that overlap by 32 samples; for odd rates whose period would
    make that matrix large, the taps are gathered per output instead. Both
    compute the same sums.
    """
    if source_rate == target_rate:
        return signal.copy()
    step = Fraction(source_rate, target_rate)
    p, q = step.numerator, step.denominator
    n_out = max(1, (len(signal) * q) // p)
    if q * (p + _TAPS) <= _PERIOD_MATRIX_MAX:
        return _resample_by_period(signal, p, q, n_out)
    return _resample_by_output(signal, p, q, n_out, _kernels(p, q))


_TAPS = 2 * _HALF_TAPS
_PERIOD_MATRIX_MAX = 1 << 20
"""Entries of one period's kernel matrix (8 MiB) beyond which outputs are gathered one by one."""


@functools.lru_cache(maxsize=16)
def _kernels(p: int, q: int) -> FloatArray:
    """The windowed-sinc kernel of each of the ``q`` phases, ``[q, 32]``."""
    cutoff = min(1.0, q / p)
    taps = np.arange(-_HALF_TAPS + 1, _HALF_TAPS + 1)
    offsets = (np.arange(q) / q)[:, None] - taps[None, :]
    window = 0.5 + 0.5 * np.cos(np.pi * offsets / (_HALF_TAPS + 1))
    kernels: FloatArray = cutoff * np.sinc(cutoff * offsets) * window
    kernels.flags.writeable = False
    return kernels


_BAND_ROWS = 32
"""Outputs of one period computed by one product (see :func:`_period_bands`)."""


@functools.lru_cache(maxsize=16)
def _period_bands(p: int, q: int) -> tuple[tuple[int, int, int, FloatArray], ...]:
    """One period's kernel matrix, cut into bands of rows with their nonzero columns.

    Row ``r`` of the ``[q, p + 32]`` matrix is output ``m * q + r``'s kernel
    over inputs ``m * p .. m * p + p + 31``; only its 32 taps, which start at
    column ``r * p // q + 1``, are nonzero. A band of 32 consecutive rows
    spans about ``32 * p / q + 32`` columns, so multiplying by the bands
    instead of the whole matrix skips the zeros: 22.05 kHz to 16 kHz reads
    76 columns per band instead of 473, six times less work for the same
    sums. Each band is ``(first row, end row, first column, [columns, rows])``.
    """
    phases = np.arange(q)
    first = (phases * p) // q + 1  # where output r's taps start within its period's window
    matrix = np.zeros((q, p + _TAPS))
    matrix[phases[:, None], first[:, None] + np.arange(_TAPS)[None, :]] = _kernels(p, q)[
        (phases * p) % q
    ]
    bands = []
    for start in range(0, q, _BAND_ROWS):
        end = min(q, start + _BAND_ROWS)
        column = int(first[start])
        band = np.ascontiguousarray(matrix[start:end, column : int(first[end - 1]) + _TAPS].T)
        band.flags.writeable = False
        bands.append((start, end, column, band))
    return tuple(bands)


def _resample_by_period(signal: FloatArray, p: int, q: int, n_out: int) -> FloatArray:
    periods = -(-n_out // q)
    padded = np.zeros(periods * p + p + _TAPS)
    padded[_HALF_TAPS : _HALF_TAPS + len(signal)] = signal[: len(padded) - _HALF_TAPS]
    windows = np.lib.stride_tricks.sliding_window_view(padded, p + _TAPS)[::p][:periods]
    out = np.empty((periods, q))
    for start, end, column, band in _period_bands(p, q):
        out[:, start:end] = windows[:, column : column + band.shape[0]] @ band
    flat: FloatArray = out.reshape(-1)[:n_out]
    return flat


def _resample_by_output(
    signal: FloatArray, p: int, q: int, n_out: int, kernels: FloatArray
) -> FloatArray:
    padded = np.concatenate([np.zeros(_HALF_TAPS), signal, np.zeros(_HALF_TAPS + 1)])
    # windows[j] = padded[j : j + 32]: the taps of an output whose base sample is j + 15.
    windows = np.lib.stride_tricks.sliding_window_view(padded, _TAPS)
    out = np.empty(n_out)
    for start in range(0, n_out, _CHUNK):
        numerators = np.arange(start, min(n_out, start + _CHUNK), dtype=np.int64) * p
        base, phase = np.divmod(numerators, q)
        out[start : start + len(numerators)] = np.einsum(
            "ij,ij->i", windows[base + 1], kernels[phase]
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
    frames = np.lib.stride_tricks.sliding_window_view(signal, n_fft)[::hop] * _window(n_fft)
    spectrum = np.fft.rfft(frames, axis=1)
    power = spectrum.real**2 + spectrum.imag**2  # |X|^2 without a square root
    mel = _filterbank(sample_rate, n_fft, n_mels) @ power.T
    logs = np.log10(np.maximum(mel, FLOOR_POWER))
    logs = np.maximum(logs, logs.max() - _DYNAMIC_RANGE)
    scaled = (logs + 4.0) / 4.0
    return _fit_frames(scaled, n_frames)


@functools.lru_cache(maxsize=8)
def _window(n_fft: int) -> FloatArray:
    window: FloatArray = np.hanning(n_fft + 2)[1:-1]
    window.flags.writeable = False
    return window


@functools.lru_cache(maxsize=8)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int) -> FloatArray:
    filters = mel_filterbank(sample_rate, n_fft, n_mels)
    filters.flags.writeable = False
    return filters


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
