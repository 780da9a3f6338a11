"""The closed world: colours, shapes, motions, the held-out split and captions.

A *concept* is a colour and a shape, plus a motion for video. Some
colour-shape combinations never appear in training in any modality: they
form the test split, so every evaluation figure measures generalisation to
combinations the model has never seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (40, 170, 60),
    "blue": (35, 70, 215),
    "yellow": (245, 220, 40),
    "orange": (250, 140, 20),
    "purple": (135, 50, 175),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
MOTIONS = ("left", "right", "up", "down")

HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("green", "cross"),
        ("blue", "triangle"),
        ("yellow", "circle"),
        ("orange", "diamond"),
        ("purple", "square"),
        ("white", "star"),
        ("black", "diamond"),
    }
)
"""Colour-shape combinations kept out of training: every colour and shape once at least."""


@dataclass(frozen=True, order=True)
class Concept:
    """What an item shows or says; ``motion`` is empty except for video."""

    colour: str
    shape: str
    motion: str = ""

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT

    @property
    def name(self) -> str:
        base = f"{self.colour} {self.shape}"
        return f"{base} moving {self.motion}" if self.motion else base


def still_concepts(*, held_out: bool) -> list[Concept]:
    """Colour-shape concepts of one split, in a fixed order."""
    return [Concept(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def moving_concepts(*, held_out: bool) -> list[Concept]:
    """Colour-shape-motion concepts of one split, in a fixed order."""
    return [
        Concept(c.colour, c.shape, m) for c in still_concepts(held_out=held_out) for m in MOTIONS
    ]


_STILL_TEMPLATES = (
    "{a} {c} {s}",
    "{c} {s}",
    "a {s} that is {c}",
    "a {c} coloured {s}",
    "there is a {c} {s}",
    "a picture of a {c} {s}",
    "an image showing a {c} {s}",
    "the {s} is {c}",
    "a small {c} {s}",
    "a large {c} {s}",
    "one {c} {s} on a plain background",
    "a drawing of a {c} {s}",
    "{C} {s}.",
    "this is a {c} {s}",
    "a {c} {s} shape",
    "a single {s}, {c}",
    "look, a {c} {s}",
    "the colour is {c} and the shape is a {s}",
    "a photo of a {c} {s}",
    "the picture shows a {c} {s}",
    "a {s} coloured {c}",
    "a {s} in {c}",
    "{c} colored {s}",
    "it's a {c} {s}",
    "a simple {c} {s}",
    "a bright {c} {s}",
    "a rotated {c} {s}",
    "a blurry {c} {s}",
    "{s}, {c}",
    "shape: {s}, colour: {c}",
    "a {s} painted {c}",
    "a {s} filled with {c}",
    "can you see the {c} {s}?",
    "a tiny {c} {s}",
    "an image of a {s} which is {c}",
    "a {c} {s} symbol",
    "a flat {c} {s} icon",
    "a {c} {s} against the background",
)
_MOVING_TEMPLATES = (
    "{a} {c} {s} moving {m}",
    "a {c} {s} moves {m}",
    "a {c} {s} going {m}",
    "a {c} {s} sliding {m}",
    "a {s} that is {c} travels {m}",
    "video of a {c} {s} moving {m}",
    "a {c} {s} drifting {m}",
    "{C} {s} heading {m}.",
    "a {mw} moving {c} {s}",
    "a {c} {s} in motion, going {m}",
    "a {c} {s} travelling {mw}",
    "watch the {c} {s} move {m}",
    "a {c} {s} is moving {m}",
    "the {c} {s} goes {m}",
    "{c} {s}, moving {m}",
    "a {c} {s} floating {m}",
    "a {c} {s} gliding {m}",
    "animation of a {c} {s} moving {m}",
    "a {c} {s} shifts {m}",
    "the {s}, {c}, goes {m}",
    "moving {m}: a {c} {s}",
    "a {c} {s} heads {mw}",
    "footage of a {c} {s} going {m}",
    "a {s} in {c} moving {mw}",
)
_SPOKEN_TEMPLATES = (
    "{a} {c} {s}",
    "{c} {s}",
    "this is a {c} {s}",
    "a {s} that is {c}",
    "I see a {c} {s}",
    "the {s} is {c}",
)
_DIRECTION_WORDS = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}


def _article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def caption(concept: Concept, rng: random.Random, *, spoken: bool = False) -> str:
    """A free phrasing of the concept, drawn from varied templates."""
    templates: tuple[str, ...]
    if concept.motion:
        templates = _MOVING_TEMPLATES
    else:
        templates = _SPOKEN_TEMPLATES if spoken else _STILL_TEMPLATES
    return _fill(rng.choice(templates), concept)


_TEST_STILL_TEMPLATES = (
    "an illustration of one {c} {s}",
    "{c}-coloured {s} in the middle",
    "what a nice {c} {s}",
    "I drew a {s}, it is {c}",
)
_TEST_MOVING_TEMPLATES = (
    "clip of a {c} {s} that moves {m}",
    "one {c} {s} slowly moving {m}",
    "here a {c} {s} travels {mw}",
)


def _fill(template: str, concept: Concept) -> str:
    return template.format(
        a=_article(concept.colour),
        c=concept.colour,
        C=concept.colour.capitalize(),
        s=concept.shape,
        m=concept.motion,
        mw=_DIRECTION_WORDS.get(concept.motion, ""),
    )


def training_captions(concept: Concept) -> list[str]:
    """Every phrasing training may pair with the concept, in a fixed order."""
    if concept.motion:
        return [_fill(t, concept) for t in _MOVING_TEMPLATES]
    return [_fill(t, concept) for t in _STILL_TEMPLATES + _SPOKEN_TEMPLATES]


def unseen_captions(concept: Concept) -> list[str]:
    """Phrasings never seen in training, used only by the evaluation."""
    templates = _TEST_MOVING_TEMPLATES if concept.motion else _TEST_STILL_TEMPLATES
    return [_fill(t, concept) for t in templates]
