"""A micro corpus (a few items of three concepts per split), generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encoders.weights import DEFAULT_PREPROCESS
from training.corpus import Corpus, CorpusSize, load_or_generate
from training.text_table import TextTable
from training.trainer import TrainSettings
from training.world import Concept

MICRO = CorpusSize(
    train_images=4,
    train_audio=2,
    train_video=2,
    test_images=2,
    test_audio=2,
    test_video=2,
    concepts=3,
)


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="session")
def micro_corpus(corpus_root: Path) -> Corpus:
    return load_or_generate(corpus_root, 7, DEFAULT_PREPROCESS, MICRO)


def random_table(concepts: tuple[Concept, ...], phrasings: int = 3, seed: int = 0) -> TextTable:
    """A stand-in for MiniLM features: fixed random unit vectors, no model load."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(
        torch.randn(len(concepts), phrasings, 384, generator=generator), dim=-1
    )
    captions = tuple(tuple(f"{c.name} {i}" for i in range(phrasings)) for c in concepts)
    return TextTable(features, captions)


def tiny_settings(**overrides: object) -> TrainSettings:
    """Training settings for a micro corpus: a 16-d, one-block model in batches of 4."""
    base: dict[str, object] = {
        "dim": 16,
        "width": 32,
        "depth": 1,
        "heads": 2,
        "batch_size": 4,
        "warmup_steps": 1,
        "schedule": ("image", "audio", "video"),
    }
    return TrainSettings(**{**base, **overrides})  # type: ignore[arg-type]
