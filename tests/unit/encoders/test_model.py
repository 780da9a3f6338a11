from __future__ import annotations

import dataclasses

import pytest
import torch

from encoders import model as model_module
from encoders.modality import Modality
from encoders.model import (
    ConvStem,
    EncoderConfig,
    Memo,
    MultimodalEncoder,
    PatchTower,
    ShapeCNN,
    figure_colours,
    principal_contrast,
)
from encoders.patches import image_patches, video_tubelets
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


def test_a_manifest_without_an_image_shape_loads_the_patch_shape_tower() -> None:
    config = dataclasses.asdict(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True))
    del config["image_shape"]
    model = MultimodalEncoder(EncoderConfig(**config))
    assert isinstance(model.towers["image"], PatchTower)


def test_an_unknown_image_shape_tower_is_refused() -> None:
    with pytest.raises(ValueError, match="image_shape"):
        config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True, image_shape="resnet")


def test_a_manifest_without_a_shape_input_loads_luminance() -> None:
    config = dataclasses.asdict(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True))
    del config["shape_input"]
    assert EncoderConfig(**config).shape_input == "luminance"


def test_a_manifest_without_a_colour_input_loads_pixel_statistics() -> None:
    config = dataclasses.asdict(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True))
    del config["colour_input"], config["video_grid"]
    assert EncoderConfig(**config).colour_input == "pixels"
    assert EncoderConfig(**config).video_grid == DEFAULT_PREPROCESS.video_size // 16


def test_an_unknown_colour_input_is_refused() -> None:
    with pytest.raises(ValueError, match="colour_input"):
        config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True, colour_input="hue")


def test_an_unknown_shape_input_is_refused() -> None:
    with pytest.raises(ValueError, match="shape_input"):
        config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2, factored=True, shape_input="hue")


SHAPE_TOWERS = pytest.mark.parametrize(
    "image_shape, shape_input, colour_input",
    [
        ("patch", "luminance", "pixels"),
        ("cnn", "luminance", "pixels"),
        ("patch", "contrast", "pixels"),
        ("cnn", "contrast", "figure"),
    ],
)


def factored_model(
    image_shape: str = "patch", shape_input: str = "luminance", colour_input: str = "pixels"
) -> MultimodalEncoder:
    torch.manual_seed(0)
    config = config_for(
        DEFAULT_PREPROCESS,
        32,
        32,
        1,
        2,
        image_stem="conv",
        factored=True,
        image_shape=image_shape,
        shape_input=shape_input,
        colour_input=colour_input,
    )
    model = MultimodalEncoder(config).eval()
    expected = PatchTower if image_shape == "patch" else ShapeCNN
    assert isinstance(model.towers["image"], expected)
    return model


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


@SHAPE_TOWERS
def test_factored_embeddings_are_two_halves_of_equal_length(
    image_shape: str, shape_input: str, colour_input: str
) -> None:
    model = factored_model(image_shape, shape_input, colour_input)
    colour, shape = encode(model, torch.randn(3, 3, 64, 64))
    assert torch.allclose(colour.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    assert torch.allclose(shape.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    with torch.inference_mode():
        text = model.encode_text(torch.randn(2, 1, 384))
    assert torch.allclose(text[..., :16].norm(dim=-1), torch.full((2, 1), 0.5**0.5), atol=1e-5)


@SHAPE_TOWERS
def test_the_colour_half_does_not_see_where_things_are(
    image_shape: str, shape_input: str, colour_input: str
) -> None:
    model = factored_model(image_shape, shape_input, colour_input)
    red_here, red_there = square((0.8, -0.8, -0.8)), square((0.8, -0.8, -0.8), at=(32, 32))
    colour_a, shape_a = encode(model, red_here)
    colour_b, shape_b = encode(model, red_there)
    assert torch.allclose(colour_a, colour_b, atol=1e-5)
    assert not torch.allclose(shape_a, shape_b, atol=1e-3)


@SHAPE_TOWERS
def test_the_shape_half_does_not_see_colour(
    image_shape: str, shape_input: str, colour_input: str
) -> None:
    model = factored_model(image_shape, shape_input, colour_input)
    red, teal = (0.8, -0.4, 0.0), (-0.4, 0.15298, 0.3)  # equal 0.299 r + 0.587 g + 0.114 b
    luma = [0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] for c in (red, teal)]
    assert abs(luma[0] - luma[1]) < 1e-4
    colour_a, shape_a = encode(model, square(red))
    colour_b, shape_b = encode(model, square(teal))
    assert torch.allclose(shape_a, shape_b, atol=1e-3)
    assert not torch.allclose(colour_a, colour_b, atol=1e-3)


ISO_LUMINANT = (0.5, -0.5954, 0.0)
"""A red whose luminance is the background's (-0.2) in ``square``."""


@pytest.mark.parametrize("image_shape", ["patch", "cnn"])
def test_a_shape_as_light_as_its_background_is_seen_through_contrast_only(
    image_shape: str,
) -> None:
    assert abs(0.299 * 0.5 + 0.587 * -0.5954 - -0.2) < 1e-4
    blank = torch.full((1, 3, 64, 64), -0.2)
    grey = factored_model(image_shape, "luminance")
    assert torch.allclose(encode(grey, square(ISO_LUMINANT))[1], encode(grey, blank)[1], atol=1e-3)
    seeing = factored_model(image_shape, "contrast")
    _, red = encode(seeing, square(ISO_LUMINANT))
    assert torch.allclose(red, encode(seeing, square((1.0, 1.0, 1.0)))[1], atol=1e-3)
    assert not torch.allclose(red, encode(seeing, blank)[1], atol=1e-2)


def test_principal_contrast_draws_any_two_colours_alike_up_to_sign() -> None:
    torch.manual_seed(0)
    keep = torch.ones(1, 2, 16, dtype=torch.bool)
    keep[0, 1, :4] = False  # variant 1 hides the top row of tokens
    pictures = []
    for fill, ground in [((0.8, -0.4, 0.0), (-0.2,) * 3), ((-0.9, -0.9, 0.7), (0.6, 0.5, 0.4))]:
        image = torch.tensor(ground).reshape(1, 3, 1, 1).expand(1, 3, 64, 64).clone()
        image[0, :, 20:50, 20:50] = torch.tensor(fill).reshape(3, 1, 1)
        image[0, :, :16] = torch.rand(3, 16, 64)  # the top row of tokens: noise
        pictures.append(principal_contrast(image_patches(image), keep, 1)[0])
    a, b = pictures  # [V, N, 256] each
    assert (a[1, :4] == 0).all() and (b[1, :4] == 0).all()
    assert torch.allclose(a[1], b[1], atol=1e-4) or torch.allclose(a[1], -b[1], atol=1e-4)
    assert a[1].std() > 0.5
    assert not torch.allclose(a[0, 4:], a[1, 4:], atol=1e-2)  # the noise moved the mean


@pytest.mark.parametrize(
    ("shape_input", "colour_input"), [("luminance", "pixels"), ("contrast", "figure")]
)
def test_a_masked_video_token_changes_neither_half(shape_input: str, colour_input: str) -> None:
    model = factored_model("cnn", shape_input, colour_input)
    clips = torch.randn(1, 8, 3, 64, 64)
    changed = clips.clone()
    changed[:, :2, :, :16, :16] = torch.randn(1, 2, 3, 16, 16)  # token 0: first tubelet, top left
    keep = torch.ones(1, 2, 64, dtype=torch.bool)
    keep[0, 0, 0] = False
    with torch.inference_mode():
        a = model.encode_patches(Modality.VIDEO, video_tubelets(clips), keep)
        b = model.encode_patches(Modality.VIDEO, video_tubelets(changed), keep)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)
    assert not torch.allclose(a[:, 1, 16:], b[:, 1, 16:], atol=1e-4)


@SHAPE_TOWERS
def test_a_masked_token_changes_neither_half(
    image_shape: str, shape_input: str, colour_input: str
) -> None:
    model = factored_model(image_shape, shape_input, colour_input)
    images = torch.randn(1, 3, 64, 64)
    changed = images.clone()
    changed[:, :, :16, :16] += 1.0
    keep = torch.ones(1, 1, 16, dtype=torch.bool)
    keep[0, 0, 0] = False
    for a, b in zip(encode(model, images, keep), encode(model, changed, keep), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_cnn_shape_tower_reads_no_pixel_of_a_masked_token() -> None:
    """Even across token borders: the neighbours of a masked token see it as blank."""
    torch.manual_seed(0)
    tower = ShapeCNN(32, 8).eval()
    images = torch.randn(2, 3, 64, 64)
    changed = images.clone()
    changed[:, :, 16:32, 16:32] = torch.randn(2, 3, 16, 16)  # token (1, 1)
    keep = torch.ones(2, 3, 16, dtype=torch.bool)
    keep[:, 1, 5] = False  # variant 1 hides token (1, 1)
    keep[:, 2, 10:] = False  # variant 2 hides others and keeps it
    with torch.inference_mode():
        a = tower(image_patches(images), keep)
        b = tower(image_patches(changed), keep)
    assert a.shape == (2, 3, 8)
    assert torch.allclose(a[:, 1], b[:, 1], atol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)


def test_the_cnn_shape_tower_polarity_is_a_negated_picture() -> None:
    torch.manual_seed(0)
    tower = ShapeCNN(32, 8).eval()
    patches = image_patches(torch.randn(2, 3, 64, 64))
    keep = torch.ones(2, 1, 16, dtype=torch.bool)
    with torch.inference_mode():
        plain = tower(patches, keep)
        same = tower(patches, keep, torch.tensor([1.0, 1.0]))
        inverted = tower(patches, keep, torch.tensor([-1.0, 1.0]))
        negative = tower(-patches, keep)
    assert torch.allclose(plain, same)
    assert torch.allclose(inverted[0], negative[0], atol=1e-5)
    assert torch.allclose(inverted[1], plain[1])


@pytest.mark.parametrize("ground", [(-0.2, -0.2, -0.2), (-0.6, -0.4, 0.9), (0.2, 0.9, 0.1)])
def test_figure_colours_name_the_figure_whatever_the_background(
    ground: tuple[float, float, float],
) -> None:
    red = (0.8, -0.8, -0.7)
    image = torch.tensor(ground).reshape(1, 3, 1, 1).expand(1, 3, 64, 64).clone()
    image[0, :, 16:48, 16:48] = torch.tensor(red).reshape(3, 1, 1)  # the four middle tokens
    keep = torch.ones(1, 2, 16, dtype=torch.bool)
    keep[0, 1, [0, 1, 4]] = False  # variant 1 hides three edge tokens
    figure = figure_colours(image_patches(image), keep, 1, 4)[0]  # [V, N, 4]
    middle, edge = [5, 6, 9, 10], [0, 3, 12, 15]
    for variant in (0, 1):
        assert (figure[variant, middle, 0] > 0.8).all()
        assert torch.allclose(figure[variant, middle, 1:], torch.tensor(red), atol=1e-3)
        assert (figure[variant, edge, 0] < 0.01).all()


def test_degenerate_pictures_give_finite_unit_embeddings() -> None:
    """One flat colour, extreme values, a single kept token: nothing to divide by, no NaN."""
    model = factored_model("cnn", "contrast", "figure")
    flat = torch.full((1, 3, 64, 64), 0.3)
    extreme = torch.where(torch.rand(1, 3, 64, 64) < 0.5, -1.0, 1.0)
    keep = torch.zeros(2, 2, 16, dtype=torch.bool)
    keep[:, 0] = True
    keep[:, 1, 5] = True  # an inner token alone: no pixel of the frame's edge is kept
    with torch.inference_mode():
        out = model.encode_patches(Modality.IMAGE, image_patches(torch.cat([flat, extreme])), keep)
        clip = model.encode_patches(
            Modality.VIDEO,
            video_tubelets(torch.full((1, 8, 3, 64, 64), -1.0)),
            torch.ones(1, 1, 64, dtype=torch.bool),
        )
    for embedding in (out, clip):
        assert torch.isfinite(embedding).all()
        assert torch.allclose(embedding.norm(dim=-1), torch.ones(embedding.shape[:2]), atol=1e-5)


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.VIDEO])
def test_encoders_sharing_a_memo_compute_each_channel_once_and_alike(
    modality: Modality, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (
        factored_model("cnn", "contrast", "figure"),
        factored_model("cnn", "contrast", "figure"),
    )
    torch.nn.init.normal_(second.towers[f"{modality}-colour"].head.weight)  # another encoder
    if modality is Modality.IMAGE:
        patches = image_patches(torch.rand(2, 3, 64, 64) * 2 - 1)
    else:
        patches = video_tubelets(torch.rand(2, 8, 3, 64, 64) * 2 - 1)
    keep = torch.rand(2, 3, patches.shape[1]) < 0.7
    with torch.inference_mode():
        alone = [m.encode_patches(modality, patches, keep) for m in (first, second)]
        calls: list[str] = []
        for name in ("principal_contrast", "figure_colours"):
            original = getattr(model_module, name)
            monkeypatch.setattr(
                model_module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
            )
        memo: Memo = {}
        shared = [m.encode_patches(modality, patches, keep, memo=memo) for m in (first, second)]
    assert sorted(calls) == ["figure_colours", "principal_contrast"]
    for a, b in zip(alone, shared, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(shared[0], shared[1])
