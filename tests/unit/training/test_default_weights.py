"""The shipped default weights mean something on freshly rendered held-out items."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoders.embedding import EncodeRequest
from encoders.fusion import cosine_distance
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import sha256_file
from tests.media import square_on_white
from training import render
from training.corpus import render_item
from training.trainer import TrainSettings
from training.world import COLOURS, HELD_OUT, SHAPES, Concept

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = ROOT / "weights" / "default" / "manifest.json"


@pytest.fixture(scope="module")
def default_shard() -> Shard:
    pinned = re.search(
        r'manifest_sha256:\s*"([0-9a-f]{64})"', (ROOT / "config" / "default.yaml").read_text()
    )
    assert pinned is not None
    assert sha256_file(MANIFEST) == pinned.group(1), "config/default.yaml pins another manifest"
    assert json.loads(MANIFEST.read_text())["trained"] is True
    return Shard.load(MANIFEST, pinned.group(1))


def test_poc_node_train_defaults_are_the_settings_of_the_shipped_run() -> None:
    """``poc-node train`` with no options reproduces the shipped weights only if so."""
    recorded = dict(json.loads(MANIFEST.read_text())["training"])
    recorded.pop("threads")
    defaults = json.loads(json.dumps(dataclasses.asdict(TrainSettings())))
    assert recorded == defaults


def test_the_pair_check_accepts_matched_and_refuses_one_attribute_mismatches(
    default_shard: Shard,
) -> None:
    """Fresh pictures of the eight held-out combinations against all 48 captions.

    The weights before the convolutional shape tower accepted 7 of 8 matched
    pairs but refused only a third of the captions naming another shape of the
    same colour, and ranked the right caption first for 5 of 8 pictures.
    """
    rng = random.Random(20261127)  # a seed the corpus never uses: fresh renderings
    concepts = sorted(Concept(c, s) for c, s in HELD_OUT)
    requests = []
    for concept in concepts:
        mime, data, _ = render_item(Modality.IMAGE, concept, rng, held_out_voices=True)
        media = decode_media(Modality.IMAGE, mime, data, MediaLimits(), default_shard.preprocess)
        requests.append(EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data).digest()))
    captions = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    for colour, shape in captions:
        text = f"a {colour} {shape}"
        requests.append(EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()))
    embedded = default_shard.embed(requests, b"test-beacon")
    images, texts = embedded[: len(concepts)], embedded[len(concepts) :]
    delta = default_shard.delta(Modality.TEXT, Modality.IMAGE)
    within = first = 0
    refused: dict[str, list[bool]] = {"other shape": [], "other colour": []}
    for concept, image in zip(concepts, images, strict=True):
        distance = {
            caption: cosine_distance(image.vector, text.vector)
            for caption, text in zip(captions, texts, strict=True)
        }
        own = distance.pop((concept.colour, concept.shape))
        within += own <= delta
        first += own < min(distance.values())
        refused["other shape"] += [
            distance[(concept.colour, s)] > delta for s in SHAPES if s != concept.shape
        ]
        refused["other colour"] += [
            distance[(c, concept.shape)] > delta for c in COLOURS if c != concept.colour
        ]
    # Measured with the shipped weights on this seed: 8/8 within δ, 8/8 first,
    # every other shape and 98 % of other colours refused (manifest eval: 1.000
    # accepted; 1.000 / 0.988 refused). The weights whose shape towers saw
    # luminance: 6/8, 6/8, 95 % and 93 %.
    assert within >= 7
    assert first >= 7
    assert np.mean(refused["other shape"]) >= 0.95
    assert np.mean(refused["other colour"]) >= 0.95


def test_the_shape_of_an_unseen_combination_is_recognised(default_shard: Shard) -> None:
    """A held-out image is nearer its own caption than every other shape of its colour.

    Plain (unfactored) towers failed this for 7 of the 8 held-out concepts:
    they filed a red star under a red shape seen in training.
    """
    rng = random.Random(20261128)
    shapes = sorted({s for _, s in HELD_OUT})
    recognised = 0
    for colour, shape in sorted(HELD_OUT):
        mime, data, _ = render_item(
            Modality.IMAGE, Concept(colour, shape), rng, held_out_voices=True
        )
        recognised += nearest_its_own_shape(default_shard, mime, data, colour, shape, shapes)
    assert recognised >= 7


def test_a_shape_as_light_as_its_background_is_recognised(default_shard: Shard) -> None:
    """Each chromatic held-out combination drawn on a grey of its own luminance.

    Shape and background then differ in hue alone; weights whose shape towers
    saw luminance could not see such a shape at all: they recognised none of the 6.
    """
    rng = random.Random(20261129)
    recognised = 0
    chromatic = sorted((c, s) for c, s in HELD_OUT if c not in ("white", "black"))
    for colour, shape in chromatic:
        fill = render.shape_colour(colour, rng)
        level = round(0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2])
        canvas = Image.new("RGB", (96, 96), (level, level, level))
        placement = render.random_placement((96, 96), rng, 0.5, 0.8)
        picture = render.draw_shape(canvas, shape, fill, placement, None)
        out = io.BytesIO()
        picture.save(out, format="PNG")
        recognised += nearest_its_own_shape(
            default_shard, "image/png", out.getvalue(), colour, shape, SHAPES
        )
    assert recognised >= 5


def nearest_its_own_shape(
    shard: Shard, mime: str, data: bytes, colour: str, shape: str, shapes: Sequence[str]
) -> bool:
    """Is the picture nearer "a {colour} {shape}" than "a {colour} {s}" for every other s?"""
    media = decode_media(Modality.IMAGE, mime, data, MediaLimits(), shard.preprocess)
    requests = [EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data).digest())]
    texts = [f"a {colour} {shape}"] + [f"a {colour} {s}" for s in shapes if s != shape]
    for text in texts:
        requests.append(EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()))
    image, *captions = shard.embed(requests, b"test-beacon")
    distances = [cosine_distance(image.vector, c.vector) for c in captions]
    return min(distances[1:]) > distances[0]


def test_a_shape_on_a_coloured_background_is_named_in_its_own_colour(
    default_shard: Shard,
) -> None:
    """Each held-out combination on a flat background of a random hue, among all 48 captions.

    Weights trained on grey backgrounds only, whose colour towers could not tell
    figure from ground, named the right colour for half such pictures.
    """
    rng = random.Random(20261130)
    captions = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    texts = [f"a {colour} {shape}" for colour, shape in captions]
    requests = [EncodeRequest(Modality.TEXT, t, hashlib.sha256(t.encode()).digest()) for t in texts]
    pictures = sorted(HELD_OUT) * 2
    for colour, shape in pictures:
        fill = render.shape_colour(colour, rng)
        while True:
            ground = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
            if math.dist(ground, fill) >= 110 and max(ground) - min(ground) > 80:
                break
        canvas = Image.new("RGB", (96, 96), ground)
        picture = render.draw_shape(
            canvas, shape, fill, render.random_placement((96, 96), rng, 0.35, 0.85), None
        )
        out = io.BytesIO()
        picture.save(out, format="PNG")
        media = decode_media(
            Modality.IMAGE, "image/png", out.getvalue(), MediaLimits(), default_shard.preprocess
        )
        requests.append(
            EncodeRequest(Modality.IMAGE, media, hashlib.sha256(out.getvalue()).digest())
        )
    embedded = default_shard.embed(requests, b"test-beacon")
    text_vectors, images = embedded[: len(texts)], embedded[len(texts) :]
    right_colour = 0
    for (colour, _), image in zip(pictures, images, strict=True):
        distances = [cosine_distance(image.vector, t.vector) for t in text_vectors]
        right_colour += captions[int(np.argmin(distances))][0] == colour
    assert right_colour >= 14  # the shipped weights: 16 of 16


@pytest.mark.parametrize(
    ("width", "height"), [(300, 200), (200, 300), (400, 160), (1000, 100), (100, 1000), (200, 200)]
)
def test_a_blue_square_of_any_canvas_shape_pairs_with_its_caption(
    default_shard: Shard, width: int, height: int
) -> None:
    """What a new user tried: the 300x200 one was refused at 0.57 when pictures were
    squashed to a square; now each is fitted whole and padded with its own white.
    On a 1000x100 canvas, padding alone left the square 3 of the model's 64 pixels,
    too small to name; the 2.5:1 window around it keeps it at 13."""
    data = square_on_white(width, height)
    media = decode_media(Modality.IMAGE, "image/png", data, MediaLimits(), default_shard.preprocess)
    text = "a blue square"
    picture, caption = default_shard.embed(
        [
            EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data).digest()),
            EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()),
        ],
        b"test-beacon",
    )
    distance = cosine_distance(picture.vector, caption.vector)
    assert distance <= default_shard.delta(Modality.TEXT, Modality.IMAGE)


def _named(
    shard: Shard,
    modality: Modality,
    items: Sequence[Concept],
    everything: Sequence[Concept],
    caption: Callable[[Concept], str],
    rng: random.Random,
) -> int:
    """How many fresh renderings of ``items`` have their own caption nearest among all."""
    requests = []
    for concept in items:
        mime, data, _ = render_item(modality, concept, rng, held_out_voices=True)
        media = decode_media(modality, mime, data, MediaLimits(), shard.preprocess)
        requests.append(EncodeRequest(modality, media, hashlib.sha256(data).digest()))
    for concept in everything:
        text = caption(concept)
        requests.append(EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()))
    embedded = shard.embed(requests, b"test-beacon")
    rendered, captions = embedded[: len(items)], embedded[len(items) :]
    named = 0
    for concept, item in zip(items, rendered, strict=True):
        distances = [cosine_distance(item.vector, c.vector) for c in captions]
        named += everything[int(np.argmin(distances))] == concept
    return named


def test_held_out_clips_are_named_among_every_moving_concept(default_shard: Shard) -> None:
    """Fresh clips of held-out combinations, each moving one way, against all 192 captions."""
    motions = ("left", "right", "up", "down")
    moving = [Concept(c, s, m) for c, s in sorted(HELD_OUT) for m in motions][::2]
    everything = [Concept(c, s, m) for c in COLOURS for s in SHAPES for m in motions]
    named = _named(
        default_shard,
        Modality.VIDEO,
        moving,
        everything,
        lambda c: f"a {c.colour} {c.shape} moving {c.motion}",
        random.Random(20261131),
    )
    assert named >= 14  # of 16


def test_unheard_voices_are_named_among_every_still_concept(default_shard: Shard) -> None:
    """Fresh speech of the held-out combinations by voices training never heard.

    Against all 48 captions. Encoders v2, whose audio tower read 16x16 log-mel
    patches, named 11 of these 16 (0.50 among every concept in `poc-node eval`):
    they had learned their training voices. Read as 40 ms slices of every band,
    0.91 in `poc-node eval`.
    """
    spoken = [Concept(c, s) for c, s in sorted(HELD_OUT)] * 2
    named = _named(
        default_shard,
        Modality.AUDIO,
        spoken,
        [Concept(c, s) for c in COLOURS for s in SHAPES],
        lambda c: f"a {c.colour} {c.shape}",
        random.Random(20261130),  # a seed the corpus never uses: fresh speech
    )
    assert named >= 13  # of 16
