from __future__ import annotations

import dataclasses

import pytest
import torch

from encoders.modality import Modality
from encoders.model import ConvStem, EncoderConfig, MultimodalEncoder
from encoders.patches import image_patches
from encoders.weights import DEFAULT_PREPROCESS, config_for


def test_conv_stem_reads_each_token_from_its_own_pixels_only() -> None:
    torch.manual_seed(0)
    stem = ConvStem(3, 32)
    images = torch.randn(2, 3, 64, 64)
    changed = images.clone()
    changed[:, :, 16:32, 32:48] = torch.randn(2, 3, 16, 16)  # token (1, 2) of the 4x4 grid
    before, after = stem(image_patches(images)), stem(image_patches(changed))
    assert before.shape == (2, 16, 32)
    differs = (before - after).abs().amax(dim=(0, 2)) > 0
    assert differs.nonzero().flatten().tolist() == [1 * 4 + 2]


def test_a_masked_token_changes_nothing_with_the_conv_stem() -> None:
    torch.manual_seed(0)
    model = MultimodalEncoder(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, image_stem="conv"))
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, :16, :16] += 1.0
    keep = torch.ones(1, 1, 16, dtype=torch.bool)
    keep[0, 0, 0] = False
    with torch.inference_mode():
        a = model.encode_patches(Modality.IMAGE, image_patches(images), keep)
        b = model.encode_patches(Modality.IMAGE, image_patches(changed), keep)
    assert torch.allclose(a, b, atol=1e-6)


def test_a_manifest_without_a_stem_loads_the_linear_stem() -> None:
    config = dataclasses.asdict(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2))
    del config["image_stem"]
    model = MultimodalEncoder(EncoderConfig(**config))
    assert isinstance(model.towers["image"].stem, torch.nn.Linear)


def test_an_unknown_stem_is_refused() -> None:
    with pytest.raises(ValueError, match="image_stem"):
        config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, image_stem="resnet")
