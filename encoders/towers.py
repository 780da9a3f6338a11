"""The trainable towers: a colour tower, a shape network, and a transformer for audio.

Each tower maps a modality's tokens (or the channels ``encoders.channels``
computes from them) to one half of the shared space, or, for audio, to all of
it. Every tower reads only kept tokens: masked tokens are hidden from
attention, blanked before a convolution, or left out of a pooled mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """Linear token stem, learned positions, CLS token, transformer trunk and head (audio)."""

    def __init__(
        self,
        token_size: int,
        n_tokens: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: int,
        out_dim: int,
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(token_size, width)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position = nn.Parameter(torch.randn(1, n_tokens + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

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
    """Colour without shape: per-token colour statistics, attention-pooled over kept tokens.

    Each token is reduced to the mean, spread, minimum and maximum of each
    colour channel and its ``figure_colours`` (its share of figure and the
    figure's colour in it). There are no positions, so the tower sees a set of
    token colours and cannot tell a star from a square. A token holds ``frames``
    frames (1 for an image patch, 2 for a video tubelet), pooled alike, so images
    and video share the tower: what 2,800 pictures teach of colours serves video.
    """

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Linear(16, width), nn.GELU(), nn.Linear(width, width), nn.GELU()
        )
        self.score = nn.Linear(width, 1)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(
        self, patches: torch.Tensor, keep: torch.Tensor, figure_colours: torch.Tensor, frames: int
    ) -> torch.Tensor:
        """``patches [B, N, P]``, ``keep [B, V, N]``, ``figure_colours [B, V, N, 4]``
        → ``[B, V, D]``."""
        b, n, _ = patches.shape
        v = keep.shape[1]
        pixels = patches.reshape(b, n, frames, 3, -1).transpose(2, 3).reshape(b, n, 3, -1)
        stats = torch.cat(
            [pixels.mean(-1), pixels.std(-1), pixels.amin(-1), pixels.amax(-1)], dim=-1
        )
        h = self.embed(torch.cat([stats.unsqueeze(1).expand(b, v, n, 12), figure_colours], dim=-1))
        scores = self.score(h).squeeze(-1)  # [B, V, N]
        weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=2)  # [B, V, W]
        out: torch.Tensor = self.head(self.norm(pooled))
        return out


class ShapeNet(nn.Module):
    """Shape without colour: a small CNN over figure pictures, one feature cell per token.

    Four stride-2 convolutions take each 16 by 16 token of a picture to one cell
    of a feature grid; the cells of kept tokens are averaged. Masked tokens are
    already 0 in the figure channel, so no pixel of theirs reaches a cell. The
    network is translation-equivariant: a shape learned in one place is known
    in every other. Images and video frames share it, so what 2,800 pictures
    teach of shapes serves video as well.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
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

    def forward(self, pictures: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``pictures [B, V, F, S, S]``, ``keep [B, V, F, (S/16)²]`` → pooled ``[B, V, W]``.

        ``F`` pictures per item (1 for an image, frames for a clip); the mean runs
        over the kept cells of all of them.
        """
        b, v, f, side, _ = pictures.shape
        cells = self.convs(pictures.reshape(b * v * f, 1, side, side)).flatten(2)
        cells = cells.reshape(b, v, f, self.width, -1)  # [B, V, F, W, cells]
        weights = keep.to(pictures.dtype).unsqueeze(3)  # [B, V, F, 1, cells]
        total = weights.sum(dim=(2, 4)).clamp(min=1.0)  # [B, V, 1]
        pooled: torch.Tensor = (cells * weights).sum(dim=(2, 4)) / total
        return pooled


class ShapeHead(nn.Module):
    """Pooled shape features (and, for video, the figure's motion) → one half of the space."""

    def __init__(self, width: int, out_dim: int, extra: int = 0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.extra = (
            nn.Sequential(nn.Linear(extra, width), nn.GELU(), nn.Linear(width, width))
            if extra
            else None
        )
        inputs = width * (2 if extra else 1)
        self.head = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, pooled: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        features = self.norm(pooled)
        if self.extra is not None:
            assert extra is not None
            features = torch.cat([features, self.extra(extra)], dim=-1)
        out: torch.Tensor = self.head(features)
        return out
