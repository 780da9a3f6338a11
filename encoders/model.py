"""The project's ImageBind-shaped encoder: one ``nn.Module`` for four modalities.

Image, video and audio each have their own patch stem, learned positional
embeddings, CLS token, transformer trunk and head into the shared space D.
Text uses the frozen pretrained MiniLM (``text_backbone``) and a trainable
head; the backbone is held by the shard, not by this module, because it is
shared by every encoder of a shard and pinned by hash rather than stored in
our weight files. Every output is L2-normalised. A *factored* encoder
(``EncoderConfig.factored``) gives image and video a second, colour-only
tower and builds every embedding from a colour half and a shape half.

Encoding takes a keep-mask per variant of each item so the differential loss
can evaluate ``E(x)``, ``E(x|m)`` and ``E(x|¬m)`` in one forward pass: masked
tokens are hidden from attention, which for CLS pooling is the same as
dropping them from the sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from encoders.interface import TextVariants
from encoders.modality import Modality
from encoders.patches import PATCH, TUBELET

TEXT_FEATURES = 384
"""Width of the MiniLM sentence embedding the text head reads."""

Memo = dict[tuple[object, ...], torch.Tensor]
"""What one batch's encoders may share: the parameter-free channels computed from the
same ``patches`` and ``keep`` (``principal_contrast``, ``figure_colours``), by kind."""


def _memoised(
    memo: Memo | None, key: tuple[object, ...], compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, or the result an earlier encoder stored in ``memo`` under ``key``."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture hyperparameters; stored per encoder in the manifest."""

    dim: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int
    image_tokens: int
    video_tokens: int
    audio_tokens: int
    image_stem: str = "linear"
    """Patch stem of the image tower. ``linear``: one projection of each patch's
    pixels (ViT); ``conv``: two strided convolutions inside each patch, then the
    projection (an early-convolution stem, which lets a small tower see edges and
    corners, hence shapes). Video and audio towers use the linear stem."""

    factored: bool = False
    """Image and video embeddings built from two towers: a shape-blind colour tower
    (statistics of each token's pixels, no positions) fills the first half of the
    embedding, a colour-blind tower (one channel, ``shape_input``) the second.
    Text and audio embeddings are split in the same halves. Each half is unit length
    over √2, so a cosine is the mean of a colour cosine and a shape cosine, and an
    unseen colour-shape combination lands where its colour and its shape point."""

    image_shape: str = "patch"
    """Shape tower of a factored image encoder, over the channel ``shape_input`` names.
    ``patch``: a ``PatchTower`` (with ``image_stem``) on the tokens; ``cnn``: a
    ``ShapeCNN``, a small convolutional network over the whole picture, pooled over its
    kept tokens (translation-equivariant, so a shape learned in one place is known in
    every other)."""

    shape_input: str = "luminance"
    """What the shape towers of a factored encoder (image and video) see of the pixels.
    ``luminance``: the grey picture; ``contrast``: each picture's (or clip's) principal
    colour contrast over its kept pixels (``principal_contrast``), which shows a shape
    as well where its luminance equals its background's, as often happens here."""

    colour_input: str = "pixels"
    """What the colour towers of a factored encoder see of each token. ``pixels``: the
    statistics of its colours; ``figure``: those and its ``figure_colours``, which
    tell a figure's colour from a coloured background's."""

    video_grid: int = 4
    """Tokens per side of a video frame (the preprocessing's ``video_size`` / 16)."""

    def __post_init__(self) -> None:
        if self.image_stem not in STEMS:
            raise ValueError(f"image_stem must be one of {sorted(STEMS)}, got {self.image_stem!r}")
        if self.image_shape not in SHAPE_TOWERS:
            raise ValueError(
                f"image_shape must be one of {sorted(SHAPE_TOWERS)}, got {self.image_shape!r}"
            )
        if self.shape_input not in SHAPE_INPUTS:
            raise ValueError(
                f"shape_input must be one of {sorted(SHAPE_INPUTS)}, got {self.shape_input!r}"
            )
        if self.colour_input not in COLOUR_INPUTS:
            raise ValueError(
                f"colour_input must be one of {sorted(COLOUR_INPUTS)}, got {self.colour_input!r}"
            )

    def tokens(self, modality: Modality) -> int:
        return {
            Modality.IMAGE: self.image_tokens,
            Modality.VIDEO: self.video_tokens,
            Modality.AUDIO: self.audio_tokens,
        }[modality]


STEMS = frozenset({"linear", "conv"})
SHAPE_TOWERS = frozenset({"patch", "cnn"})
SHAPE_INPUTS = frozenset({"luminance", "contrast"})
COLOUR_INPUTS = frozenset({"pixels", "figure"})
PATCH_CHANNELS = {Modality.IMAGE: 3, Modality.VIDEO: TUBELET * 3, Modality.AUDIO: 1}
_FRAMES = {Modality.IMAGE: 1, Modality.VIDEO: TUBELET}
"""Frames per token of the modalities a factored encoder splits into colour and shape."""


class ConvStem(nn.Module):
    """Per-patch early convolutions: ``[.., C·16·16]`` → ``[.., width]``.

    Each token is convolved on its own pixels only, so hiding a token still
    hides all of its information (what the masks of the differential loss need).
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.channels = channels
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.project = nn.Linear(64 * (PATCH // 4) ** 2, width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        lead = patches.shape[:-1]
        pixels = patches.reshape(-1, self.channels, PATCH, PATCH)
        features = self.convs(pixels).flatten(1)
        out: torch.Tensor = self.project(features).reshape(*lead, -1)
        return out


class Block(nn.Module):
    """Pre-norm transformer block whose attention ignores masked-out keys."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, w))
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class PatchTower(nn.Module):
    """Stem, positional embedding, CLS token, trunk and head for one modality."""

    def __init__(
        self,
        config: EncoderConfig,
        channels: int,
        n_tokens: int,
        stem: str,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.stem: nn.Module = (
            ConvStem(channels, config.width)
            if stem == "conv"
            else nn.Linear(channels * PATCH * PATCH, config.width)
        )
        self.cls = nn.Parameter(torch.randn(1, 1, config.width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, n_tokens + 1, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, out_dim or config.dim)

    def forward(self, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``patches [B, N, P]`` and ``keep [B, V, N]`` → head outputs ``[B, V, D]``."""
        b, v, n = keep.shape
        tokens = self.stem(patches) + self.position[:, 1:]
        tokens = tokens.unsqueeze(1).expand(b, v, n, -1).reshape(b * v, n, -1)
        cls = (self.cls + self.position[:, :1]).expand(b * v, 1, -1)
        x = torch.cat([cls, tokens], dim=1)
        mask = torch.cat([keep.new_ones(b * v, 1), keep.reshape(b * v, n)], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        out: torch.Tensor = self.head(self.norm(x[:, 0])).reshape(b, v, -1)
        return out


class ColourTower(nn.Module):
    """Colour without shape: per-token pixel statistics, attention-pooled over kept tokens.

    Each token is reduced to the mean, spread, minimum and maximum of each
    colour channel; there are no positional embeddings, so the tower sees a set
    of token colours and cannot tell a star from a square. With ``grid`` (the
    tokens per side of a frame), each token also carries its ``figure_colours``,
    so the tower can tell the figure's colour from the background's.
    """

    def __init__(self, frames: int, width: int, out_dim: int, grid: int | None = None) -> None:
        super().__init__()
        self.frames = frames
        self.grid = grid
        features = 12 if grid is None else 16
        self.embed = nn.Sequential(
            nn.Linear(features, width), nn.GELU(), nn.Linear(width, width), nn.GELU()
        )
        self.score = nn.Linear(width, 1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(
        self, patches: torch.Tensor, keep: torch.Tensor, memo: Memo | None = None
    ) -> torch.Tensor:
        b, n, _ = patches.shape
        v = keep.shape[1]
        pixels = patches.reshape(b, n, self.frames, 3, -1).transpose(2, 3).reshape(b, n, 3, -1)
        stats = torch.cat(
            [pixels.mean(-1), pixels.std(-1), pixels.amin(-1), pixels.amax(-1)], dim=-1
        )
        if self.grid is None:
            h = self.embed(stats).unsqueeze(1).expand(b, v, n, -1)  # [B, V, N, W]
        else:
            grid = self.grid
            figure = _memoised(
                memo,
                ("figure", self.frames, grid),
                lambda: figure_colours(patches, keep, self.frames, grid),
            )
            h = self.embed(torch.cat([stats.unsqueeze(1).expand(b, v, n, 12), figure], dim=-1))
        scores = self.score(h).squeeze(-1)  # [B, V, N]
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=2)  # [B, V, W]
        out: torch.Tensor = self.head(self.norm(pooled))
        return out


def figure_colours(
    patches: torch.Tensor, keep: torch.Tensor, frames: int, grid: int
) -> torch.Tensor:
    """Per keep variant and token: how much of it stands out from the background, in what colour.

    ``patches [B, N, frames·3·16·16]`` (frames of ``grid`` by ``grid`` tokens, time-major)
    and ``keep [B, V, N]`` → ``[B, V, N, 4]``: the mean figure weight of the token's
    pixels, then the figure-weighted mean colour. The background colour is the mean
    of the kept pixels within ``_BORDER`` pixels of a frame's edge (of all kept pixels
    when no such pixel is kept): a drawing's background reaches the edges, its figure
    hardly does. A pixel's figure weight is ``d² / (d² + s²)``, ``d`` its colour's
    distance from the background's. Only kept tokens count, as everywhere.
    """
    b, _, n = keep.shape
    area = PATCH * PATCH
    rgb = patches.reshape(b, n, frames, 3, area)
    weights = keep.to(patches.dtype)  # [B, V, N]
    ring = _border(n, grid, patches.device, patches.dtype)  # [N, 256]
    ring_sums = torch.einsum("bvn,bnfip,np->bvi", weights, rgb, ring)
    ring_counts = weights @ ring.sum(-1) * frames  # [B, V]
    all_sums, all_counts = _kept_totals(rgb, weights)
    background = torch.where(
        ring_counts[..., None] > 0,
        ring_sums / ring_counts.clamp(min=1.0)[..., None],
        all_sums / all_counts[..., None],
    )  # [B, V, 3]
    offsets = rgb.unsqueeze(1) - background[:, :, None, None, :, None]  # [B, V, N, f, 3, 256]
    distance = offsets.square().sum(dim=-2)  # [B, V, N, f, 256]
    figure = distance / (distance + _FIGURE_SCALE**2)
    share = figure.mean(dim=(-2, -1))  # [B, V, N]
    colour = torch.einsum("bvnfp,bnfip->bvni", figure, rgb) / (
        figure.sum(dim=(-2, -1))[..., None] + 1e-6
    )
    return torch.cat([share.unsqueeze(-1), colour], dim=-1)


_BORDER = 3
"""Width, in pixels, of the frame edge whose colour ``figure_colours`` takes for background."""
_FIGURE_SCALE = 0.45
"""Colour distance (pixel values span [-1, 1]) at which a pixel is half figure: about
57 levels of 255, where noise and gradients of the background stay well below and
a shape, at least 110 from its background in this world, well above."""


def _kept_totals(rgb: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per keep variant, the summed colour of the kept pixels and their number (at least 1).

    ``rgb [B, N, frames, 3, 256]`` and ``weights [B, V, N]`` (1 kept, 0 masked) →
    ``[B, V, 3]`` and ``[B, V]``.
    """
    sums = torch.einsum("bvn,bni->bvi", weights, rgb.sum(dim=(2, 4)))
    count = (weights.sum(dim=-1) * rgb.shape[2] * rgb.shape[4]).clamp(min=1.0)
    return sums, count


def _border(n: int, grid: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[N, 256]``: 1 for a token's pixels within ``_BORDER`` of its frame's edge."""
    side = grid * PATCH
    index = torch.arange(n, device=device) % (grid * grid)
    rows = (index // grid)[:, None] * PATCH + torch.arange(PATCH, device=device).repeat_interleave(
        PATCH
    )
    cols = (index % grid)[:, None] * PATCH + torch.arange(PATCH, device=device).repeat(PATCH)
    edge = torch.minimum(torch.minimum(rows, cols), torch.minimum(side - 1 - rows, side - 1 - cols))
    return (edge < _BORDER).to(dtype)


_LUMA = (0.299, 0.587, 0.114)


def _luma(patches: torch.Tensor, frames: int) -> torch.Tensor:
    """``[B, N, frames·3·16·16]`` → each pixel's luminance, ``[B, N, frames·16·16]``."""
    b, n, _ = patches.shape
    pixels = patches.reshape(b, n, frames, 3, -1)
    weights = pixels.new_tensor(_LUMA).reshape(1, 1, 1, 3, 1)
    return (pixels * weights).sum(dim=3).reshape(b, n, -1)


def luminance(patches: torch.Tensor, frames: int, polarity: torch.Tensor | None) -> torch.Tensor:
    """Colour-blind tokens: each token's luminance minus its own mean, times ``polarity``.

    ``[B, N, frames·3·16·16]`` → ``[B, N, frames·16·16]``. Centring each token on
    its own removes how bright the shape is; training flips the sign at random
    (``polarity [B]`` of ±1) so whether a shape is lighter or darker than its
    background, which hints at its colour, says nothing either.
    """
    b = patches.shape[0]
    luma = _luma(patches, frames)
    luma = luma - luma.mean(dim=-1, keepdim=True)
    if polarity is not None:
        luma = luma * polarity.reshape(b, 1, 1)
    return luma


def principal_contrast(patches: torch.Tensor, keep: torch.Tensor, frames: int) -> torch.Tensor:
    """Colour-blind shading: each pixel along the axis its picture's colours vary most on.

    ``patches [B, N, frames·3·16·16]`` and ``keep [B, V, N]`` → ``[B, V, N,
    frames·16·16]``. For each keep variant, the mean, covariance and principal axis
    of the colours come from the pixels of its kept tokens only; each kept pixel's
    offset from the mean is projected on the axis and divided by the spread along
    it, and masked tokens are 0, so a masked token changes nothing of what the
    variant shows. A shape and its background differ more than anything else in a
    picture, so the axis runs from one's colour to the other's, whichever the two
    are: a red shape on a grey of equal luminance, invisible in luminance, stands
    out as well as a black one on white. The axis's sign is the one whose
    components sum to at least 0 (lighter is positive); training flips it at random
    anyway, as for luminance.
    """
    b, v, n = keep.shape
    rgb = patches.reshape(b, n, frames, 3, PATCH * PATCH)
    weights = keep.to(patches.dtype)  # [B, V, N]
    # Per-token sums, then per-variant sums over kept tokens: no pixel copy per variant.
    sums, kept = _kept_totals(rgb, weights)
    products = torch.einsum("bvn,bnij->bvij", weights, torch.einsum("bnfip,bnfjp->bnij", rgb, rgb))
    count = kept[..., None]  # [B, V, 1]
    mean = sums / count
    covariance = products / count[..., None] - mean[..., :, None] * mean[..., None, :]
    spreads: torch.Tensor
    axes: torch.Tensor
    spreads, axes = torch.linalg.eigh(covariance)
    axis = axes[..., -1]  # [B, V, 3], the largest eigenvalue's
    axis = axis * torch.where(axis.sum(dim=-1, keepdim=True) < 0, -1.0, 1.0)
    spread = (spreads[..., -1].clamp(min=0.0) + _CONTRAST_FLOOR**2).sqrt()  # [B, V]
    along = torch.einsum("bnfip,bvi->bvnfp", rgb, axis)
    offset = (mean * axis).sum(dim=-1)  # [B, V]
    shading = (along - offset[..., None, None, None]) / spread[..., None, None, None]
    return (shading * weights[..., None, None]).reshape(b, v, n, -1)


_CONTRAST_FLOOR = 1e-3
"""The least spread along the principal axis (pixel values span [-1, 1]), so that a
picture of one flat colour stays flat rather than becoming amplified rounding noise."""


class ShapeCNN(nn.Module):
    """Shape without colour, for still images: a small CNN over a colour-blind picture.

    The picture is the luminance centred on the kept pixels' mean or, with
    ``contrast``, the principal colour contrast (``principal_contrast``) of the kept
    tokens. Masked tokens are blanked (zero) before the first convolution, so no
    pixel of theirs reaches the output; four stride-2 convolutions take each 16x16
    token to one cell of a feature grid, and the cells of kept tokens are averaged.
    ``polarity`` flips the picture's sign, as in ``luminance``.
    """

    def __init__(self, width: int, out_dim: int, *, contrast: bool = False) -> None:
        super().__init__()
        self.contrast = contrast
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=4, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, width, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(
        self,
        patches: torch.Tensor,
        keep: torch.Tensor,
        polarity: torch.Tensor | None = None,
        memo: Memo | None = None,
    ) -> torch.Tensor:
        """``patches [B, N, 3·16·16]``, ``keep [B, V, N]`` → ``[B, V, out_dim]``."""
        b, v, n = keep.shape
        side = math.isqrt(n)
        if self.contrast:
            shading = _memoised(memo, ("contrast", 1), lambda: principal_contrast(patches, keep, 1))
        else:
            kept = keep.to(patches.dtype).unsqueeze(-1)  # [B, V, N, 1]
            luma = _luma(patches, 1).unsqueeze(1) * kept  # [B, V, N, 256]
            pixels = kept.sum(dim=(2, 3)).clamp(min=1.0) * luma.shape[-1]
            mean = luma.sum(dim=(2, 3)) / pixels  # [B, V]
            shading = (luma - mean[..., None, None]) * kept
        if polarity is not None:
            shading = shading * polarity.reshape(b, 1, 1, 1)
        picture = (
            shading.reshape(b * v, side, side, PATCH, PATCH)
            .permute(0, 1, 3, 2, 4)
            .reshape(b * v, 1, side * PATCH, side * PATCH)
        )
        cells = self.convs(picture).flatten(2)  # [B·V, W, N]: one cell per token
        weights = keep.to(patches.dtype).reshape(b * v, 1, n)
        pooled = (cells * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)
        out: torch.Tensor = self.head(self.norm(pooled))
        return out.reshape(b, v, -1)


def unit_halves(x: torch.Tensor) -> torch.Tensor:
    """Each half of the last axis scaled to length 1/√2 (a unit vector in all)."""
    half = x.shape[-1] // 2
    halves = [F.normalize(x[..., :half], dim=-1), F.normalize(x[..., half:], dim=-1)]
    return torch.cat(halves, dim=-1) * math.sqrt(0.5)


class MultimodalEncoder(nn.Module):
    """One encoder of a shard: maps any modality's tokens to the shared space.

    It satisfies ``encoders.interface.Encoder`` (``embed_text``,
    ``embed_patches``); ``encode_text``/``encode_patches`` are the same
    computations on plain tensors, for training.
    """

    modalities = frozenset(Modality)

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        towers: dict[str, nn.Module] = {}
        half = config.dim // 2
        for m in (Modality.IMAGE, Modality.VIDEO, Modality.AUDIO):
            stem = config.image_stem if m is Modality.IMAGE else "linear"
            if config.factored and m in _FRAMES:
                frames = _FRAMES[m]
                if m is Modality.IMAGE and config.image_shape == "cnn":
                    towers[str(m)] = ShapeCNN(
                        config.width, half, contrast=config.shape_input == "contrast"
                    )
                else:
                    towers[str(m)] = PatchTower(config, frames, config.tokens(m), stem, half)
                grid = math.isqrt(config.image_tokens) if m is Modality.IMAGE else config.video_grid
                towers[f"{m}-colour"] = ColourTower(
                    frames,
                    config.width // 2,
                    half,
                    grid if config.colour_input == "figure" else None,
                )
            else:
                towers[str(m)] = PatchTower(config, PATCH_CHANNELS[m], config.tokens(m), stem)
        self.towers = nn.ModuleDict(towers)
        self.text_head = nn.Linear(TEXT_FEATURES, config.dim)

    @property
    def dim(self) -> int:
        return self.config.dim

    def embed_text(self, text: TextVariants) -> torch.Tensor:
        return self.encode_text(text.features)

    def embed_patches(
        self, modality: Modality, patches: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        return self.encode_patches(modality, patches, keep)

    def encode_patches(
        self,
        modality: Modality,
        patches: torch.Tensor,
        keep: torch.Tensor,
        polarity: torch.Tensor | None = None,
        memo: Memo | None = None,
    ) -> torch.Tensor:
        """Image, video or audio tokens ``[B, N, P]`` with ``keep [B, V, N]`` → ``[B, V, D]``.

        ``polarity`` (training only) flips the channel seen by a factored shape tower.
        Encoders given the same ``patches`` and ``keep`` may pass one ``memo`` so that
        the channels computed from them without parameters are computed once.
        """
        tower = self.towers[str(modality)]
        if not self.config.factored:
            return F.normalize(tower(patches, keep), dim=-1)
        if modality not in _FRAMES:
            return unit_halves(tower(patches, keep))
        frames = _FRAMES[modality]
        colour = cast(ColourTower, self.towers[f"{modality}-colour"])(patches, keep, memo)
        if isinstance(tower, ShapeCNN):
            shape = tower(patches, keep, polarity, memo)
        elif self.config.shape_input == "contrast":
            b, v, n = keep.shape
            shading = _memoised(
                memo, ("contrast", frames), lambda: principal_contrast(patches, keep, frames)
            )
            if polarity is not None:
                shading = shading * polarity.reshape(b, 1, 1, 1)
            per_variant = tower(shading.reshape(b * v, n, -1), keep.reshape(b * v, 1, n))
            shape = per_variant.reshape(b, v, -1)
        else:
            shape = tower(luminance(patches, frames, polarity), keep)
        return unit_halves(torch.cat([colour, shape], dim=-1))

    def encode_text(self, sentence_features: torch.Tensor) -> torch.Tensor:
        """Pooled MiniLM features ``[B, V, 384]`` (one per keep variant) → ``[B, V, D]``."""
        out = self.text_head(sentence_features)
        return unit_halves(out) if self.config.factored else F.normalize(out, dim=-1)
