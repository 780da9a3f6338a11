"""The optional open_clip adapter, offline, on a randomly initialised architecture.

open_clip imports torchvision, whose PyPI wheel fails beside the CPU torch
(ENVIRONMENT.md): where it cannot be imported the adapter tests skip, and
say why. ``unpatchify`` needs only torch and is always tested.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from encoders.adapters import open_clip as adapter
from encoders.modality import Modality
from encoders.patches import image_patches

needs_open_clip = pytest.mark.skipif(
    adapter.open_clip is None,
    reason=f"open_clip cannot be imported here ({adapter.IMPORT_ERROR!r}); "
    "install the 'openclip' extra with a constraints file pinning torch==2.13.0",
)


def test_unpatchify_inverts_image_patches_and_greys_hidden_patches() -> None:
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    patches = image_patches(images)
    keep = torch.ones(2, 2, patches.shape[1], dtype=torch.bool)
    keep[:, 1, 0] = False
    out = adapter.unpatchify(patches, keep).reshape(2, 2, 3, 64, 64)
    assert torch.equal(out[:, 0], images)
    assert torch.all(out[:, 1, :, :16, :16] == 0)
    assert torch.equal(out[:, 1, :, 16:, :], images[:, :, 16:, :])


@needs_open_clip
def test_random_open_clip_in_a_shard() -> None:
    from encoders.embedding import EncodeRequest
    from encoders.ensemble import EnsembleRule
    from encoders.shard import Shard
    from encoders.text_backbone import TextBackbone, backbone_dir
    from encoders.weights import DEFAULT_PREPROCESS

    assert adapter.open_clip is not None
    model = adapter.open_clip.create_model("ViT-B-32", pretrained=None)
    encoder = adapter.from_model(model, "ViT-B-32")
    shard = Shard(
        weights_id="open_clip-random",
        preprocess=DEFAULT_PREPROCESS,
        pair_delta={},
        encoders=[encoder],
        backbone=TextBackbone(backbone_dir(), DEFAULT_PREPROCESS.text_max_tokens, "cpu"),
        rule=EnsembleRule(),
        mask_count=2,
        device="cpu",
    )
    image = np.random.default_rng(0).uniform(-1, 1, (3, 64, 64)).astype(np.float32)
    text, picture = shard.embed(
        [
            EncodeRequest(Modality.TEXT, "a red circle", hashlib.sha256(b"t").digest()),
            EncodeRequest(Modality.IMAGE, image, hashlib.sha256(b"i").digest()),
        ],
        b"beacon",
    )
    for item in (text, picture):
        assert item.vector.shape == (encoder.dim,)
        assert abs(float(np.linalg.norm(item.vector)) - 1.0) < 1e-4
