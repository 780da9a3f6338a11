from __future__ import annotations

from pathlib import Path

import numpy as np

from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS
from training.corpus import PARTS, Corpus, _make, load_or_generate, part_jobs

from .conftest import MICRO


def test_items_are_deterministic_from_the_seed() -> None:
    for modality in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
        jobs, _ = part_jobs(3, "train", modality, MICRO, DEFAULT_PREPROCESS)
        first, again = _make(jobs[0]), _make(jobs[0])
        assert np.array_equal(first[0], again[0]) and first[1] == again[1]
        other = _make(part_jobs(4, "train", modality, MICRO, DEFAULT_PREPROCESS)[0][0])
        assert not np.array_equal(first[0], other[0])


def test_held_out_combinations_never_reach_training(micro_corpus: Corpus) -> None:
    for modality, split in micro_corpus.train.items():
        table = micro_corpus.concepts_of(modality)
        assert len(split) > 0
        assert not any(table[int(i)].held_out for i in split.concepts)
    for modality, split in micro_corpus.test.items():
        table = micro_corpus.concepts_of(modality)
        assert all(table[int(i)].held_out for i in split.concepts)


def test_decoded_arrays_have_the_preprocessing_shapes(micro_corpus: Corpus) -> None:
    spec = DEFAULT_PREPROCESS
    assert micro_corpus.train[Modality.IMAGE].decoded(slice(0, 2)).shape == (2, 3, 64, 64)
    assert micro_corpus.train[Modality.AUDIO].decoded(slice(0, 2)).shape == (
        2,
        spec.n_mels,
        spec.audio_frames,
    )
    video = micro_corpus.train[Modality.VIDEO].decoded(slice(0, 1))
    assert video.shape == (1, spec.video_frames, 3, 64, 64)
    assert float(video.min()) >= -1.0 and float(video.max()) <= 1.0


def test_cache_is_reused_and_equal(micro_corpus: Corpus, corpus_root: Path) -> None:
    again = load_or_generate(corpus_root, 7, DEFAULT_PREPROCESS, MICRO)
    for split, modality in PARTS:
        first = getattr(micro_corpus, split)[modality]
        second = getattr(again, split)[modality]
        assert np.array_equal(first.arrays, second.arrays)
        assert np.array_equal(first.concepts, second.concepts)
