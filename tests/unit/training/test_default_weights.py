"""The shipped default weights mean something on freshly rendered held-out items."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from encoders.embedding import EncodeRequest
from encoders.fusion import cosine_distance
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import sha256_file
from training.corpus import render_item
from training.world import HELD_OUT, Concept

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


def test_matched_text_image_pairs_are_closer_than_mismatched(default_shard: Shard) -> None:
    rng = random.Random(20261127)  # a seed the corpus never uses: fresh renderings
    concepts = sorted(Concept(c, s) for c, s in HELD_OUT)[:5]
    requests = []
    for concept in concepts:
        mime, data, _ = render_item(Modality.IMAGE, concept, rng, held_out_voices=True)
        media = decode_media(Modality.IMAGE, mime, data, MediaLimits(), default_shard.preprocess)
        requests.append(EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data).digest()))
    for concept in concepts:
        text = f"a {concept.colour} {concept.shape}"
        requests.append(EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest()))
    embedded = default_shard.embed(requests, b"test-beacon")
    images, texts = embedded[: len(concepts)], embedded[len(concepts) :]
    delta = default_shard.delta(Modality.TEXT, Modality.IMAGE)
    within = 0
    for i, image in enumerate(images):
        distances = np.array([cosine_distance(image.vector, t.vector) for t in texts])
        assert distances[i] < np.delete(distances, i).min()
        within += distances[i] <= delta
    # δ is calibrated to balance acceptance against rejecting one-attribute
    # mismatches; about nine matched pairs in ten are accepted (manifest eval).
    assert within >= len(concepts) - 1


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
        media = decode_media(Modality.IMAGE, mime, data, MediaLimits(), default_shard.preprocess)
        requests = [EncodeRequest(Modality.IMAGE, media, hashlib.sha256(data).digest())]
        texts = [f"a {colour} {shape}"] + [f"a {colour} {s}" for s in shapes if s != shape]
        for text in texts:
            requests.append(
                EncodeRequest(Modality.TEXT, text, hashlib.sha256(text.encode()).digest())
            )
        image, *captions = default_shard.embed(requests, b"test-beacon")
        distances = [cosine_distance(image.vector, c.vector) for c in captions]
        recognised += min(distances[1:]) > distances[0]
    assert recognised >= 6
