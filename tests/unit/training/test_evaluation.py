from __future__ import annotations

import numpy as np

from training.evaluation import Bank, pair_distances, recall
from training.world import Concept

RED_STAR, RED_CIRCLE = Concept("red", "star"), Concept("red", "circle")
BLUE_STAR, BLUE_CIRCLE = Concept("blue", "star"), Concept("blue", "circle")


def bank(concepts: list[Concept], vectors: list[list[float]]) -> Bank:
    unit = np.asarray(vectors, dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return Bank(unit, (), tuple(concepts))


def test_every_kind_of_mismatch_is_drawn_for_every_item() -> None:
    items = bank([RED_STAR], [[1.0, 0.0, 0.0]])
    partners = bank(
        [RED_STAR, BLUE_STAR, RED_CIRCLE, BLUE_CIRCLE],
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]],
    )
    distances = pair_distances(items, partners, seed=0)
    assert distances.matched == [0.0]
    assert distances.mismatched == {"colour": [1.0], "shape": [1.0], "both": [2.0]}
    assert sorted(distances.all_mismatched) == [1.0, 1.0, 2.0]


def test_a_kind_the_partners_cannot_offer_stays_empty() -> None:
    items = bank([RED_STAR], [[1.0, 0.0]])
    partners = bank([RED_STAR, BLUE_CIRCLE], [[1.0, 0.0], [0.0, 1.0]])
    distances = pair_distances(items, partners, seed=0)
    assert distances.mismatched["colour"] == [] and distances.mismatched["shape"] == []
    assert distances.mismatched["both"] == [1.0]


def test_recall_needs_shape_when_the_gallery_holds_every_concept() -> None:
    # The query sees colour only: among one item per colour it is right, among
    # every concept of its colour it cannot tell the shape.
    query = bank([RED_STAR], [[1.0, 0.0]])
    by_colour = bank([RED_STAR, BLUE_STAR], [[1.0, 0.0], [0.0, 1.0]])
    every = bank([RED_STAR, RED_CIRCLE, BLUE_STAR], [[1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])
    assert recall(query, by_colour, False, trials=1, seed=0) == (1.0, 1.0)
    assert recall(query, every, False, trials=1, seed=0)[0] == 0.0
