from __future__ import annotations

import random

from training.world import (
    COLOURS,
    HELD_OUT,
    SHAPES,
    Concept,
    caption,
    moving_concepts,
    still_concepts,
    training_captions,
    unseen_captions,
)


def test_held_out_combinations_cover_every_colour_and_shape() -> None:
    assert {c for c, _ in HELD_OUT} == set(COLOURS)
    assert {s for _, s in HELD_OUT} == set(SHAPES)
    # every held-out colour and shape is still seen in training, in other combinations
    train = still_concepts(held_out=False)
    assert {c.colour for c in train} == set(COLOURS)
    assert {c.shape for c in train} == set(SHAPES)


def test_splits_partition_the_world() -> None:
    train, test = still_concepts(held_out=False), still_concepts(held_out=True)
    assert len(train) + len(test) == len(COLOURS) * len(SHAPES)
    assert not set(train) & set(test)
    assert all(c.held_out for c in moving_concepts(held_out=True))
    assert not any(c.held_out for c in moving_concepts(held_out=False))


def test_every_caption_names_colour_and_shape() -> None:
    rng = random.Random(0)
    for concept in (Concept("red", "star"), Concept("orange", "cross", "up")):
        phrasings = [caption(concept, rng) for _ in range(20)]
        phrasings += training_captions(concept) + unseen_captions(concept)
        for text in phrasings:
            assert concept.colour in text.lower() and concept.shape in text
    assert not set(unseen_captions(Concept("red", "star"))) & set(
        training_captions(Concept("red", "star"))
    )
