"""The one architecture: halves, what each half sees, masks, the figure and motion channels."""

from __future__ import annotations

import pytest
import torch

from encoders import model as model_module
from encoders.channels import Memo, figure, figure_colours, frames_of, motion
from encoders.modality import Modality
from encoders.model import MultimodalEncoder
from encoders.patches import audio_patches, image_patches, video_tubelets
from encoders.towers import ShapeNet
from encoders.weights import DEFAULT_PREPROCESS, config_for


def small_model(seed: int = 0) -> MultimodalEncoder:
    torch.manual_seed(seed)
    return MultimodalEncoder(config_for(DEFAULT_PREPROCESS, 32, 32, 1, 2)).eval()


def encode(model: MultimodalEncoder, images: torch.Tensor, keep: torch.Tensor | None = None):
    patches = image_patches(images)
    if keep is None:
        keep = torch.ones(images.shape[0], 1, patches.shape[1], dtype=torch.bool)
    with torch.inference_mode():
        out = model.encode_patches(Modality.IMAGE, patches, keep)[:, 0]
    return out[:, :16], out[:, 16:]


def square(
    colour: tuple[float, float, float],
    at: tuple[int, int] = (8, 8),
    ground: tuple[float, float, float] = (-0.2, -0.2, -0.2),
) -> torch.Tensor:
    image = torch.tensor(ground).reshape(1, 3, 1, 1).expand(1, 3, 64, 64).clone()
    y, x = at
    image[0, :, y : y + 24, x : x + 24] = torch.tensor(colour).reshape(3, 1, 1)
    return image


def moving_square(dx: int, dy: int, colour=(0.8, -0.8, -0.7)) -> torch.Tensor:
    """``[1, 8, 3, 64, 64]``: a 16-pixel square crossing a grey frame by (dx, dy) per frame."""
    clip = torch.full((1, 8, 3, 64, 64), -0.2)
    for f in range(8):
        y, x = 24 + dy * (f - 4), 24 + dx * (f - 4)
        clip[0, f, :, y : y + 16, x : x + 16] = torch.tensor(colour).reshape(3, 1, 1)
    return clip


def test_every_embedding_is_two_halves_of_equal_length() -> None:
    model = small_model()
    colour, shape = encode(model, torch.randn(3, 3, 64, 64))
    assert torch.allclose(colour.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    assert torch.allclose(shape.norm(dim=-1), torch.full((3,), 0.5**0.5), atol=1e-5)
    with torch.inference_mode():
        text = model.encode_text(torch.randn(2, 1, 384))
        clip = model.encode_patches(
            Modality.VIDEO,
            video_tubelets(moving_square(2, 0)),
            torch.ones(1, 1, 64, dtype=torch.bool),
        )
        audio = model.encode_patches(
            Modality.AUDIO, torch.randn(2, 64, 256), torch.ones(2, 1, 64, dtype=torch.bool)
        )
    for out in (text, clip, audio):
        assert torch.allclose(
            out[..., :16].norm(dim=-1), torch.full(out.shape[:2], 0.5**0.5), atol=1e-5
        )


def test_the_colour_half_does_not_see_where_things_are() -> None:
    model = small_model()
    colour_a, shape_a = encode(model, square((0.8, -0.8, -0.8)))
    colour_b, shape_b = encode(model, square((0.8, -0.8, -0.8), at=(32, 32)))
    assert torch.allclose(colour_a, colour_b, atol=1e-5)
    assert not torch.allclose(shape_a, shape_b, atol=1e-3)


@pytest.mark.parametrize(
    "second",
    [
        (-0.4, 0.15298, 0.3),  # the red's luminance: invisible to a grey picture
        (0.5, -0.5954, 0.0),  # the background's luminance
        (1.0, 1.0, 1.0),
    ],
)
def test_the_shape_half_does_not_see_the_colour_of_a_figure_far_from_its_background(
    second: tuple[float, float, float],
) -> None:
    """The figure channel is a silhouette: any two colours well apart from the ground
    draw the same shape, including one as light as the ground, and no flat picture."""
    model = small_model()
    colour_a, shape_a = encode(model, square((0.8, -0.4, 0.0), ground=(-0.9, -0.9, -0.9)))
    colour_b, shape_b = encode(model, square(second, ground=(-0.9, -0.9, -0.9)))
    assert torch.allclose(shape_a, shape_b, atol=0.02)
    assert not torch.allclose(colour_a, colour_b, atol=1e-3)
    keep = torch.ones(1, 1, 16, dtype=torch.bool)
    seen = figure(image_patches(square(second, ground=(-0.9, -0.9, -0.9))), keep, 1, 4)
    silhouette = frames_of(seen, 4)[0, 0, 0]
    assert (silhouette[8:32, 8:32] > 0.8).all()
    assert silhouette[40:, 40:].abs().max() < 1e-6


@pytest.mark.parametrize("ground", [(-0.2, -0.2, -0.2), (-0.6, -0.4, 0.9), (0.2, 0.9, 0.1)])
def test_figure_colours_name_the_figure_whatever_the_background(
    ground: tuple[float, float, float],
) -> None:
    red = (0.8, -0.8, -0.7)
    image = torch.tensor(ground).reshape(1, 3, 1, 1).expand(1, 3, 64, 64).clone()
    image[0, :, 16:48, 16:48] = torch.tensor(red).reshape(3, 1, 1)  # the four middle tokens
    keep = torch.ones(1, 2, 16, dtype=torch.bool)
    keep[0, 1, [0, 1, 4]] = False  # variant 1 hides three edge tokens
    patches = image_patches(image)
    weight = figure(patches, keep, 1, 4)
    colours = figure_colours(patches, weight, 1)[0]  # [V, N, 4]
    middle, edge = [5, 6, 9, 10], [3, 12, 15]
    for variant in (0, 1):
        assert (colours[variant, middle, 0] > 0.8).all()
        assert torch.allclose(colours[variant, middle, 1:], torch.tensor(red), atol=1e-3)
        assert (colours[variant, edge, 0] < 0.01).all()
    assert (weight[0, 1, [0, 1, 4]] == 0).all()  # masked tokens show nothing


@pytest.mark.parametrize(
    ("dx", "dy", "expected"), [(3, 0, (1, 0)), (-3, 0, (-1, 0)), (0, 3, (0, 1)), (0, -3, (0, -1))]
)
def test_motion_points_where_the_figure_goes(dx: int, dy: int, expected: tuple[int, int]) -> None:
    patches = video_tubelets(moving_square(dx, dy))
    keep = torch.ones(1, 2, 64, dtype=torch.bool)
    keep[0, 1, ::5] = False  # a masked variant still sees the direction
    moved = motion(frames_of(figure(patches, keep, 2, 4), 4))[0]  # [V, 2]
    travel = 3 * 7 / 64  # pixels per frame, over 7 frame steps, in frame widths
    for variant, slack in ((0, 0.02), (1, 0.2)):  # hidden tokens pull the centre a little
        direction = moved[variant] / moved[variant].norm()
        assert torch.allclose(direction, torch.tensor(expected, dtype=torch.float32), atol=slack)
        assert abs(float(moved[variant].norm()) - travel) < 2 * slack * travel
    static = torch.full((1, 8, 3, 64, 64), 0.1)
    still = motion(frames_of(figure(video_tubelets(static), keep, 2, 4), 4))
    assert still.abs().max() < 1e-6


def test_video_sees_which_way_the_figure_moves() -> None:
    model = small_model()
    keep = torch.ones(2, 1, 64, dtype=torch.bool)
    clips = torch.cat([moving_square(3, 0), moving_square(-3, 0)])
    with torch.inference_mode():
        out = model.encode_patches(Modality.VIDEO, video_tubelets(clips), keep)[:, 0]
    assert torch.allclose(out[0, :16], out[1, :16], atol=1e-3)  # same colours
    assert not torch.allclose(out[0, 16:], out[1, 16:], atol=1e-3)


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.VIDEO, Modality.AUDIO])
def test_a_masked_token_changes_neither_half(modality: Modality) -> None:
    """Even across token borders: a masked token's neighbours see it as blank."""
    model = small_model()
    if modality is Modality.AUDIO:
        items = torch.rand(2, 64, 256) * 2 - 1
        changed = items.clone()
        changed[:, :, 20:24] = torch.rand(2, 64, 4) * 2 - 1  # 40 ms of every band: token 5
        patches, after, token, n = audio_patches(items), audio_patches(changed), 5, 64
    elif modality is Modality.IMAGE:
        items = torch.rand(2, 3, 64, 64) * 2 - 1
        changed = items.clone()
        changed[:, :, 16:32, 16:32] = torch.rand(2, 3, 16, 16) * 2 - 1  # token (1, 1)
        patches, after, token, n = image_patches(items), image_patches(changed), 5, 16
    else:
        items = torch.rand(2, 8, 3, 64, 64) * 2 - 1
        changed = items.clone()
        changed[:, :2, :, 16:32, 16:32] = torch.rand(2, 2, 3, 16, 16) * 2 - 1  # tubelet 5
        patches, after, token, n = video_tubelets(items), video_tubelets(changed), 5, 64
    keep = torch.ones(2, 3, n, dtype=torch.bool)
    keep[:, 1, token] = False  # variant 1 hides it
    keep[:, 2, :4] = False  # variant 2 hides others and keeps it
    with torch.inference_mode():
        a = model.encode_patches(modality, patches, keep)
        b = model.encode_patches(modality, after, keep)
    assert torch.allclose(a[:, 1], b[:, 1], atol=1e-6)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-4)
    assert not torch.allclose(a[:, 2], b[:, 2], atol=1e-4)


def test_an_audio_token_is_40_ms_of_every_band() -> None:
    """The layout a peer must reproduce: token j holds frames 4j…4j+3, band-major."""
    spectrogram = torch.arange(64 * 256, dtype=torch.float32).reshape(1, 64, 256)
    tokens = audio_patches(spectrogram)
    assert tokens.shape == (1, 64, 256)
    for j in (0, 5, 63):
        assert torch.equal(tokens[0, j], spectrogram[0, :, 4 * j : 4 * j + 4].reshape(-1))


def test_the_shape_network_pools_kept_cells_of_every_frame() -> None:
    torch.manual_seed(0)
    net = ShapeNet(8).eval()
    pictures = torch.rand(1, 1, 2, 64, 64)
    keep = torch.ones(1, 1, 2, 16, dtype=torch.bool)
    with torch.inference_mode():
        both = net(pictures, keep)
        keep_first = keep.clone()
        keep_first[0, 0, 1] = False
        first = net(pictures, keep_first)
        alone = net(pictures[:, :, :1], keep[:, :, :1])
    assert torch.allclose(first, alone, atol=1e-6)
    assert not torch.allclose(both, first, atol=1e-4)


def test_degenerate_pictures_give_finite_unit_embeddings() -> None:
    """One flat colour, extreme values, a single kept token: nothing to divide by, no NaN."""
    model = small_model()
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
    first, second = small_model(0), small_model(1)
    if modality is Modality.IMAGE:
        patches = image_patches(torch.rand(2, 3, 64, 64) * 2 - 1)
    else:
        patches = video_tubelets(torch.rand(2, 8, 3, 64, 64) * 2 - 1)
    keep = torch.rand(2, 3, patches.shape[1]) < 0.7
    with torch.inference_mode():
        alone = [m.encode_patches(modality, patches, keep) for m in (first, second)]
        calls: list[str] = []
        names = ["figure", "figure_colours", "frames_of"] + (
            ["motion"] if modality is Modality.VIDEO else []
        )
        for name in names:
            original = getattr(model_module, name)
            monkeypatch.setattr(
                model_module, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
            )
        memo: Memo = {}
        shared = [m.encode_patches(modality, patches, keep, memo=memo) for m in (first, second)]
    assert sorted(calls) == sorted(names)
    for a, b in zip(alone, shared, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(shared[0], shared[1])
