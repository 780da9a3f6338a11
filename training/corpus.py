"""The generated corpus: items of every modality, decoded exactly as the node decodes them.

Every item is rendered to real file bytes (PNG/JPEG, WAV from espeak-ng,
MP4 from PyAV) and then decoded by ``encoders.media.decode_media``, so the
model trains on precisely what a validator will feed it. Each item draws
from its own ``random.Random`` seeded by (seed, split, modality, index):
the corpus is the same whatever the number of worker processes.

The decoded arrays are cached under ``var/corpus/<version>-seed<seed>/`` as
``.npz`` (images and video as uint8, which ``decode_media``'s
``x/127.5 - 1`` makes lossless; log-mel audio as float16).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from encoders.media import MediaLimits, PreprocessSpec, decode_media
from encoders.modality import PATCHED, Modality
from training import render, speech, video
from training.world import MOTIONS, Concept, caption, moving_concepts, still_concepts

CORPUS_VERSION = "shapes-v4"
"""Bumped whenever generation changes what a seed produces. v2: backgrounds from
black to white, and a third of them coloured. v3: a third of the pictures and
clips on oblong canvases, decoded with their aspect ratio kept. v4: the same items,
the cached log-mel spectrograms with the silence floor at ``melspec.FLOOR_POWER``."""
_ITEM_SEEDS = "shapes-v1"
"""Part of every item's seed. Kept at v1, so that what v2 did not change (the
spoken descriptions) stays exactly what v1 made."""
VIDEO_SIZE = 80
VIDEO_FPS = 12
VIDEO_FRAMES = 12
_LIMITS = MediaLimits()


@dataclass(frozen=True)
class CorpusSize:
    """Items per concept for each split and modality.

    ``concepts`` keeps only the first concepts of each split (for tests);
    ``None`` uses them all.
    """

    train_images: int = 70
    train_audio: int = 100
    train_video: int = 12
    test_images: int = 40
    test_audio: int = 30
    test_video: int = 8
    concepts: int | None = None

    def per_concept(self, split: str, modality: Modality) -> int:
        count: int = getattr(self, f"{split}_{_PLURAL[modality]}")
        return count


_PLURAL = {Modality.IMAGE: "images", Modality.AUDIO: "audio", Modality.VIDEO: "video"}
PARTS = tuple((split, modality) for split in ("train", "test") for modality in PATCHED)
DEFAULT_SIZE = CorpusSize()
"""The corpus the default weights are trained on."""
TINY = CorpusSize(4, 3, 2, 3, 2, 2)
"""A small corpus for quick experiments: about a minute to generate."""


@dataclass(frozen=True)
class Split:
    """One split of one modality: decoded arrays, concept ids and descriptions."""

    modality: Modality
    arrays: npt.NDArray[np.generic]
    concepts: npt.NDArray[np.int64]
    notes: tuple[str, ...]

    def decoded(self, rows: npt.NDArray[np.int64] | slice) -> npt.NDArray[np.float32]:
        """Rows as ``decode_media`` returned them (float32)."""
        chosen = self.arrays[rows]
        if self.modality is Modality.AUDIO:
            return chosen.astype(np.float32)
        return chosen.astype(np.float32) / np.float32(127.5) - np.float32(1.0)

    def __len__(self) -> int:
        return int(self.concepts.shape[0])


@dataclass(frozen=True)
class Corpus:
    """Train and test splits of image, audio and video, with their concept tables."""

    seed: int
    still: tuple[Concept, ...]
    moving: tuple[Concept, ...]
    train: dict[Modality, Split]
    test: dict[Modality, Split]

    def concepts_of(self, modality: Modality) -> tuple[Concept, ...]:
        return self.moving if modality is Modality.VIDEO else self.still


def all_still() -> tuple[Concept, ...]:
    return tuple(still_concepts(held_out=False) + still_concepts(held_out=True))


def all_moving() -> tuple[Concept, ...]:
    return tuple(moving_concepts(held_out=False) + moving_concepts(held_out=True))


def item_rng(seed: int, split: str, modality: Modality, index: int) -> random.Random:
    digest = hashlib.sha256(f"{_ITEM_SEEDS}|{seed}|{split}|{modality}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    modality: Modality
    index: int
    concept: Concept
    spec: PreprocessSpec


def render_item(
    modality: Modality, concept: Concept, rng: random.Random, *, held_out_voices: bool
) -> tuple[str, bytes, str]:
    """``(media type, file bytes, note)`` of one rendered item of ``concept``."""
    if modality is Modality.IMAGE:
        mime, data = render.render_image(concept.colour, concept.shape, rng)
        return mime, data, mime
    if modality is Modality.AUDIO:
        voice = speech.random_voice(rng, held_out=held_out_voices)
        text = caption(concept, rng, spoken=True)
        wav = speech.roughen(speech.speak(text, voice), rng)
        return "audio/wav", wav, f"{voice.name} s{voice.speed} p{voice.pitch}: {text}"
    frames = render.render_frames(
        concept.colour, concept.shape, concept.motion, rng, VIDEO_SIZE, VIDEO_FRAMES
    )
    return "video/mp4", video.encode_mp4(frames, VIDEO_FPS, rng), concept.name


def _make(job: _Job) -> tuple[npt.NDArray[np.generic], str]:
    rng = item_rng(job.seed, job.split, job.modality, job.index)
    mime, data, note = render_item(
        job.modality, job.concept, rng, held_out_voices=job.split == "test"
    )
    decoded = decode_media(job.modality, mime, data, _LIMITS, job.spec)
    assert not isinstance(decoded, str)
    if job.modality is Modality.AUDIO:
        return decoded.astype(np.float16), note
    return np.rint((decoded + 1.0) * 127.5).astype(np.uint8), note


def _jobs(
    seed: int,
    split: str,
    modality: Modality,
    concepts: Iterable[tuple[int, Concept]],
    per: int,
    spec: PreprocessSpec,
) -> list[_Job]:
    jobs: list[_Job] = []
    for _, concept in concepts:
        for _ in range(per):
            jobs.append(_Job(seed, split, modality, len(jobs), concept, spec))
    return jobs


def part_jobs(
    seed: int, split: str, modality: Modality, size: CorpusSize, spec: PreprocessSpec
) -> tuple[list[_Job], list[int]]:
    """The items of one part (split x modality) and their concept ids."""
    table = all_moving() if modality is Modality.VIDEO else all_still()
    chosen = [(i, c) for i, c in enumerate(table) if c.held_out == (split == "test")]
    if size.concepts is not None:
        stills = [c for c in all_still() if c.held_out == (split == "test")][: size.concepts]
        if modality is Modality.VIDEO:
            wanted = {
                Concept(c.colour, c.shape, MOTIONS[k % len(MOTIONS)]) for k, c in enumerate(stills)
            }
            chosen = [(i, c) for i, c in chosen if c in wanted]
        else:
            chosen = [(i, c) for i, c in chosen if c in stills]
    per = size.per_concept(split, modality)
    jobs = _jobs(seed, split, modality, chosen, per, spec)
    return jobs, [i for i, _ in chosen for _ in range(per)]


def generate_part(
    seed: int,
    split: str,
    modality: Modality,
    size: CorpusSize,
    spec: PreprocessSpec,
    *,
    pool: ProcessPoolExecutor | None = None,
    progress: Callable[[int], None] | None = None,
) -> Split:
    """Render and decode one part of the corpus."""
    jobs, ids = part_jobs(seed, split, modality, size, spec)
    results = []
    mapped = pool.map(_make, jobs, chunksize=16) if pool else map(_make, jobs)
    for result in mapped:
        results.append(result)
        if progress is not None:
            progress(1)
    arrays = np.stack([r[0] for r in results])
    return Split(modality, arrays, np.asarray(ids, dtype=np.int64), tuple(r[1] for r in results))


def cache_dir(root: Path, seed: int, spec: PreprocessSpec) -> Path:
    """The cache folder of one seed; the preprocessing is part of its name."""
    key = hashlib.sha256(repr(spec).encode()).hexdigest()[:10]
    return root / f"{CORPUS_VERSION}-seed{seed}-{key}"


def _part_name(split: str, modality: Modality, size: CorpusSize) -> str:
    limit = "" if size.concepts is None else f"-c{size.concepts}"
    return f"{split}-{modality}-{size.per_concept(split, modality)}{limit}"


def load_or_generate(
    root: Path,
    seed: int,
    spec: PreprocessSpec,
    size: CorpusSize = DEFAULT_SIZE,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> Corpus:
    """The corpus for ``seed``: each part read from the cache, or generated and cached."""
    folder = cache_dir(root, seed, spec)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PARTS if not (folder / f"{_part_name(*p, size)}.npz").is_file()]
    total = sum(len(part_jobs(seed, split, m, size, spec)[1]) for split, m in missing)
    done = [0]

    def advance(count: int) -> None:
        done[0] += count
        if progress is not None:
            progress(done[0], total)

    splits: dict[str, dict[Modality, Split]] = {"train": {}, "test": {}}
    pool = ProcessPoolExecutor(workers) if workers > 1 and missing else None
    try:
        for split, modality in PARTS:
            name = _part_name(split, modality, size)
            if (split, modality) in missing:
                part = generate_part(seed, split, modality, size, spec, pool=pool, progress=advance)
                np.savez(folder / f"{name}.tmp.npz", arrays=part.arrays, concepts=part.concepts)
                (folder / f"{name}.json").write_text(json.dumps(list(part.notes)), encoding="utf-8")
                (folder / f"{name}.tmp.npz").replace(folder / f"{name}.npz")
            else:
                with np.load(folder / f"{name}.npz") as data:
                    arrays, concepts = data["arrays"], data["concepts"]
                notes = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
                part = Split(modality, arrays, concepts, tuple(notes))
            splits[split][modality] = part
    finally:
        if pool is not None:
            pool.shutdown()
    return Corpus(seed, all_still(), all_moving(), splits["train"], splits["test"])


def is_cached(root: Path, seed: int, spec: PreprocessSpec, size: CorpusSize) -> bool:
    folder = cache_dir(root, seed, spec)
    return all((folder / f"{_part_name(*p, size)}.npz").is_file() for p in PARTS)
