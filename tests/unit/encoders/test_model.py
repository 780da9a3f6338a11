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


def factored_model() -> MultimodalEncoder:
    torch.manual_seed(0)
    config = config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, image_stem="conv", factored=True)
    return MultimodalEncoder(config).eval()


def encode(model: MultimodalEncoder, images: torch.Tensor, keep: torch.Tensor | None = None):
    patches = image_patches(images)
    if keep is None:
        keep = torch.ones(images.shape[0], 1, patches.shape[1], dtype=torch.bool)
    with torch.inference_mode():
        out = model.encode_patches(Modality.IMAGE, patches, keep)[:, 0]
    return out[:, :16], out[:, 16:]


def square(colour: tuple[float, float, float], at: tuple[int, int] = (8, 8)) -> torch.Tensor:
    image = torch.full((1, 3, 64, 64), -0.2)
    y, x = at
    image[0, :, y : y + 24, x : x + 24] = torch.tensor(colour).reshape(3, 1, 1)
    return image


def test_factored_embeddings_are_two_halves_of_equal_length() -> None:
    model = factored_model()
    colour, shape = encode(model, torch.randn(3, 3, 64, 64))
    assert torch.allclose(colour.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    assert torch.allclose(shape.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    with torch.inference_mode():
        text = model.encode_text(torch.randn(2, 1, 384))
    assert torch.allclose(text[..., :16].norm(dim=-1), torch.full((2, 1), 0.5**0.5), atol=1e-5)


def test_the_colour_half_does_not_see_where_things_are() -> None:
    model = factored_model()
    red_here, red_there = square((0.8, -0.8, -0.8)), square((0.8, -0.8, -0.8), at=(32, 32))
    colour_a, shape_a = encode(model, red_here)
    colour_b, shape_b = encode(model, red_there)
    assert torch.allclose(colour_a, colour_b, atol=1e-5)
    assert not torch.allclose(shape_a, shape_b, atol=1e-3)


def test_the_shape_half_does_not_see_colour_at_equal_luminance() -> None:
    model = factored_model()
    red, teal = (0.8, -0.4, 0.0), (-0.4, 0.15298, 0.3)  # equal 0.299 r + 0.587 g + 0.114 b
    luma = [0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in (red, teal)]
    assert abs(luma[0] - luma[1]) < 1e-4
    colour_a, shape_a = encode(model, square(red))
    colour_b, shape_b = encode(model, square(teal))
    assert torch.allclose(shape_a, shape_b, atol=1e-3)
    assert not torch.allclose(colour_a, colour_b, atol=1e-3)


def test_a_masked_token_changes_neither_half() -> None:
    model = factored_model()
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, :16, :16] += 1.0
    keep = torch.ones(1, 1, 16, dtype=torch.bool)
    keep[0, 0, 0] = False
    for a, b in zip(encode(model, images, keep), encode(model, changed, keep), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
