"""Spoken descriptions through espeak-ng, with varied voices, speeds and pitches.

Each clip may also get leading silence, a gain change and background noise,
so the audio tower learns the words rather than one synthesiser's exact
waveform.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import soundfile

LANGUAGES = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan")
VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "croak",
    "whisper",
    "adam",
    "Alex",
    "Andy",
    "aunty",
    "boris",
    "david",
    "edward",
    "iven",
    "john",
    "linda",
    "max",
    "Michael",
    "paul",
    "quincy",
    "robert",
    "steph",
    "travis",
    "victor",
    "zac",
    "grandma",
    "grandpa",
    "norbert",
)
HELD_OUT_VARIANTS = frozenset({"m4", "f4", "klatt2", "linda", "john", "travis"})
"""Voice variants used only in the test split, so the evaluation hears new voices."""


class SpeechError(RuntimeError):
    """espeak-ng is missing or failed."""


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice and its delivery."""

    language: str
    variant: str
    speed: int
    pitch: int

    @property
    def name(self) -> str:
        return f"{self.language}+{self.variant}" if self.variant else self.language


def random_voice(rng: random.Random, *, held_out: bool) -> Voice:
    pool = [v for v in VARIANTS if (v in HELD_OUT_VARIANTS) == held_out]
    if not held_out:
        pool.append("")
    return Voice(
        rng.choice(LANGUAGES), rng.choice(pool), rng.randint(110, 230), rng.randint(20, 80)
    )


def espeak_binary() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise SpeechError("espeak-ng is not installed (apt-get install espeak-ng)")
    return found


def speak(text: str, voice: Voice) -> bytes:
    """WAV bytes of ``text`` in ``voice`` (espeak-ng writes them to stdout)."""
    done = subprocess.run(
        [
            espeak_binary(),
            "--stdout",
            "-v",
            voice.name,
            "-s",
            str(voice.speed),
            "-p",
            str(voice.pitch),
            text,
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 or len(done.stdout) < 64:
        raise SpeechError(
            f"espeak-ng failed for voice {voice.name}: "
            f"{done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout


def roughen(wav: bytes, rng: random.Random) -> bytes:
    """Leading silence, gain and optional noise; returns 16-bit PCM WAV bytes."""
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float64")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    lead = np.zeros(int(rate * rng.uniform(0.0, 0.4)))
    tail = np.zeros(int(rate * rng.uniform(0.0, 0.3)))
    signal = np.concatenate([lead, samples, tail]) * rng.uniform(0.3, 1.0)
    if rng.random() < 0.5:
        power = float(np.mean(samples**2)) + 1e-12
        snr_db = rng.uniform(12.0, 35.0)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 1.0, signal.shape)
        signal = signal + noise * np.sqrt(power / 10 ** (snr_db / 10))
    peak = float(np.max(np.abs(signal)))
    if peak > 0.99:
        signal = signal * (0.99 / peak)
    out = io.BytesIO()
    soundfile.write(out, signal, rate, format="WAV", subtype="PCM_16")
    return out.getvalue()
