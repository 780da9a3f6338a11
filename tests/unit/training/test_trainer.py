from __future__ import annotations

from pathlib import Path

import pytest
import torch

from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS, sha256_file, write_shard
from training.corpus import Corpus
from training.losses import multi_positive_nce
from training.trainer import (
    BatchMaker,
    EpochReport,
    TrainSettings,
    concept_factors,
    motion_maps,
    train,
)
from training.world import Concept

from .conftest import random_table, tiny_settings


def test_multi_positive_nce_is_clip_loss_with_one_positive() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.3], [0.2, 0.1, 3.0]])
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    assert torch.allclose(multi_positive_nce(logits, torch.eye(3, dtype=torch.bool)), expected)


def test_motion_maps_swap_directions(micro_corpus: Corpus) -> None:
    flip, reverse = motion_maps(micro_corpus.moving)
    moving = micro_corpus.moving
    for i, concept in enumerate(moving):
        flipped, reversed_ = moving[int(flip[i])], moving[int(reverse[i])]
        assert (flipped.colour, flipped.shape) == (concept.colour, concept.shape)
        assert {concept.motion, flipped.motion} in ({"left", "right"}, {"up"}, {"down"})
        assert {concept.motion, reversed_.motion} in ({"left", "right"}, {"up", "down"})


def test_training_lowers_the_loss_on_a_tiny_corpus(micro_corpus: Corpus) -> None:
    torch.set_num_threads(1)
    settings = tiny_settings(
        seed=0, encoder_seeds=(0,), epochs=10, learning_rate=3e-3, masked_share=0.3
    )
    reports: list[EpochReport] = []
    models = train(
        micro_corpus,
        DEFAULT_PREPROCESS,
        random_table(micro_corpus.still),
        random_table(micro_corpus.moving),
        settings,
        on_epoch=reports.append,
    )
    assert len(models) == 1 and len(reports) == 10
    first, last = reports[0].loss, reports[-1].loss
    assert last[Modality.IMAGE] < first[Modality.IMAGE]
    assert sum(last.values()) < sum(first.values())
    assert all(0.0 <= r <= 1.0 for r in reports[-1].recall.values())
    assert not any(p.requires_grad for p in models[0].parameters())


def test_image_turns_are_quarter_turns_and_flips_of_each_image(micro_corpus: Corpus) -> None:
    maker = BatchMaker(micro_corpus, torch.Generator().manual_seed(0))
    images = torch.randn(32, 3, 8, 8)
    turned = maker._turn(images.clone())
    changed = 0
    for before, after in zip(images, turned, strict=True):
        views = [
            torch.rot90(v, k, dims=(-2, -1)) for v in (before, before.flip(-2)) for k in range(4)
        ]
        assert any(torch.equal(after, view) for view in views)
        changed += not torch.equal(after, before)
    assert changed > 16


def test_factors_are_colour_and_shape_with_motion() -> None:
    concepts = (
        Concept("red", "star", "up"),
        Concept("blue", "star", "up"),
        Concept("red", "star", "down"),
        Concept("red", "circle", "up"),
    )
    colours, forms = concept_factors(concepts)
    assert colours.tolist() == [1, 0, 1, 1]
    assert forms[0] == forms[1] and len({int(forms[0]), int(forms[2]), int(forms[3])}) == 3


@pytest.mark.parametrize("key", ["schedule", "learn_temperature"])
def test_settings_refuse_a_misspelt_modality(key: str) -> None:
    with pytest.raises(ValueError, match=f"{key} names no modality.*'imgae'"):
        TrainSettings(**{key: ("imgae",)})


def test_training_twice_from_one_seed_gives_the_same_bytes(
    micro_corpus: Corpus, tmp_path: Path
) -> None:
    """What makes two runs of ``poc-node train`` give one manifest hash: every draw
    seeded, the same thread count; another seed must give other weights."""
    torch.set_num_threads(2)
    still, moving = random_table(micro_corpus.still), random_table(micro_corpus.moving)

    def weights(seed: int, out: Path) -> str:
        settings = tiny_settings(seed=seed, encoder_seeds=(0, 1), epochs=2)
        models = train(micro_corpus, DEFAULT_PREPROCESS, still, moving, settings)
        manifest = write_shard(
            out,
            list(zip(settings.encoder_seeds, models, strict=True)),
            spec=DEFAULT_PREPROCESS,
            pair_delta=dict.fromkeys(
                (frozenset((a, b)) for a in Modality for b in Modality if a is not b), 0.5
            ),
            trained=True,
            notes="test",
        )
        return sha256_file(manifest)

    first = weights(0, tmp_path / "a")
    assert weights(0, tmp_path / "b") == first
    assert weights(1, tmp_path / "c") != first
