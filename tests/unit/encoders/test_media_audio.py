from __future__ import annotations

import numpy as np
import pytest

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.melspec import log_mel, resample
from encoders.modality import Modality
from encoders.wav import read_wav
from encoders.weights import DEFAULT_PREPROCESS
from tests.media import tone, wav_bytes, wav_header_claiming

LIMITS = MediaLimits()
SHAPE = (DEFAULT_PREPROCESS.n_mels, DEFAULT_PREPROCESS.audio_frames)


def decode(data: bytes, limits: MediaLimits = LIMITS) -> np.ndarray:
    out = decode_media(Modality.AUDIO, "audio/wav", data, limits, DEFAULT_PREPROCESS)
    assert isinstance(out, np.ndarray)
    return out


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 2), (44100, 2), (48000, 1)])
def test_wav_encodings_rates_and_channels_decode(subtype: str, rate: int, channels: int) -> None:
    out = decode(wav_bytes(subtype, rate, channels))
    assert out.shape == SHAPE
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_sample_values_match_the_written_tone(subtype: str) -> None:
    samples, rate = read_wav(wav_bytes(subtype, 8000, 2), 30.0)
    assert rate == 8000
    expected = tone(0.5, 8000, 1)
    assert np.max(np.abs(samples - expected)) < 0.01


@pytest.mark.parametrize("placeholder", [0x7FFFF000, 0xFFFFFFFF, 0, 0x7FFFFFF0])
def test_a_data_size_past_the_end_reads_what_the_file_holds(placeholder: int) -> None:
    """Writers that cannot seek back (``espeak-ng --stdout``: 0x7FFFF000; others
    0xFFFFFFFF or 0) leave a placeholder size; found from the outside: the README's
    own speech tool was refused ``too_large`` ("48695.7 s")."""
    data = bytearray(wav_bytes("PCM_16", 16_000, 1, seconds=1.0))
    data[40:44] = placeholder.to_bytes(4, "little")  # the data chunk's size
    assert decode(bytes(data)).shape == SHAPE
    long = bytearray(wav_bytes("PCM_16", 8000, 1, seconds=31.0))
    long[40:44] = placeholder.to_bytes(4, "little")
    with pytest.raises(MediaTooLargeError, match=r"31\.000 s of audio \(248000 sample frames"):
        decode(bytes(long))  # the limit judges what the bytes hold


def test_a_header_alone_holds_no_audio() -> None:
    with pytest.raises(UndecodableError, match="no complete sample frame"):
        decode(wav_header_claiming(0x7FFFFFF0)[:44])  # its 64 bytes of samples cut off


def test_duration_limit_from_header() -> None:
    with pytest.raises(MediaTooLargeError):
        decode(wav_bytes("PCM_16", 8000, 1, seconds=1.0), MediaLimits(audio_seconds=0.5))


def test_a_cut_wav_decodes_what_it_holds() -> None:
    data = wav_bytes("PCM_16", 8000, 1)
    samples, _ = read_wav(data[: len(data) // 2], 30.0)
    whole, _ = read_wav(data, 30.0)
    assert len(samples) == (len(data) // 2 - 44) // 2
    np.testing.assert_array_equal(samples, whole[: len(samples)])


@pytest.mark.parametrize(
    "data",
    [b"RIFF\x00\x00\x00\x00WAVE", b"RIFF" + bytes(100), b"not a wav at all", bytes(44)],
)
def test_garbage_wav_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableError):
        decode(data)


def test_mu_law_is_undecodable() -> None:
    data = bytearray(wav_bytes("PCM_16", 8000, 1))
    data[20:22] = (7).to_bytes(2, "little")
    with pytest.raises(UndecodableError, match="neither PCM"):
        decode(bytes(data))


def test_resampler_keeps_the_pitch() -> None:
    signal = tone(1.0, 44_100, 1, hz=1000.0)
    out = resample(signal, 44_100, 16_000)
    assert abs(len(out) - 16_000) <= 1
    peak = np.argmax(np.abs(np.fft.rfft(out))) * 16_000 / len(out)
    assert abs(peak - 1000.0) < 2.0


def _resample_by_definition(signal: np.ndarray, source: int, target: int) -> np.ndarray:
    """Output i at input position i * source / target: a 32-tap Hann-windowed sinc, one by one."""
    cutoff = min(1.0, target / source)
    out = []
    for i in range(len(signal) * target // source):
        position = i * source / target
        base = int(np.floor(position))
        taps = np.arange(base - 15, base + 17)
        offsets = position - taps
        window = 0.5 + 0.5 * np.cos(np.pi * offsets / 17)
        inside = (taps >= 0) & (taps < len(signal))
        kernel = cutoff * np.sinc(cutoff * offsets) * window
        out.append(np.sum(signal[taps[inside]] * kernel[inside]))
    return np.array(out)


@pytest.mark.parametrize(
    "source", [8000, 11025, 22050, 32000, 37800, 44100, 48000, 44101, 96001, 1000, 384000]
)
def test_resampler_equals_its_definition_on_every_path(source: int) -> None:
    """Small periods go through matrix products by bands of outputs (37.8 kHz ends on a
    part band), odd rates per output: same sums."""
    signal = np.random.default_rng(source).standard_normal(source // 20 + 7)
    expected = _resample_by_definition(signal, source, 16_000)
    out = resample(signal, source, 16_000)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_resampler_removes_content_above_the_new_nyquist() -> None:
    out = resample(tone(1.0, 48_000, 1, hz=12_000.0), 48_000, 16_000)
    assert np.sqrt(np.mean(out[100:-100] ** 2)) < 0.02


def test_long_audio_is_pooled_to_fixed_frames() -> None:
    spec = log_mel(tone(20.0, 16_000, 1), 16_000, 64, 256)
    assert spec.shape == (64, 256)
    short = log_mel(tone(0.01, 16_000, 1), 16_000, 64, 256)
    assert short.shape == (64, 256)


@pytest.mark.parametrize("amplitude", [0.0, 3e-4])
def test_a_change_below_one_pcm_step_leaves_silent_bands_silent(amplitude: float) -> None:
    """Members whose arithmetic differs in the last bits must see one spectrogram.

    Silence and a faint tone, changed by ±1e-6 per sample (a thirtieth of a
    16-bit step): every band the change alone would fill stays at the floor.
    Under a floor of 1e-10 the change painted every silent band with noise.
    """
    wave = 2 * amplitude * tone(1.0, 16_000, 1, hz=300.0)
    changed = wave + np.random.default_rng(0).choice([-1e-6, 1e-6], size=wave.shape)
    before = log_mel(wave, 16_000, 64, 256)
    after = log_mel(changed, 16_000, 64, 256)
    silent = before == before.min()
    assert silent.mean() > 0.5
    assert np.array_equal(after[silent], before[silent])
    loud = before > before.min() + 0.5  # 100 times the floor's power, or more
    assert np.abs(after[loud] - before[loud]).max(initial=0.0) < 1e-3


def test_empty_data_chunk_is_undecodable() -> None:
    with pytest.raises(UndecodableError, match="no complete sample"):
        decode(wav_header_claiming(0)[:-64])
