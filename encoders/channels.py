"""What the towers read of pixels before any parameter: the figure, its colours, its motion.

These channels have no parameters; every encoder of a shard reads the same
ones, so they are computed once per batch (``Memo``). Each is **continuous in
the pixels**: no sign, no eigenvector, no argmax or threshold step decides
what a tower sees, so two validators whose arithmetic differs in the last bits
compute embeddings that differ in the last bits too, never by a jump (a
rounding-decided sign did exactly that in the first encoders; see
docs/ENCODERS.md, *Changelog*). Each channel of a keep variant is computed from
that variant's kept tokens only, and a masked token reads as 0, so hiding a
token hides all of its information, as the differential loss requires.

Pixels arrive as tokens: ``patches [B, N, frames·3·16·16]`` for ``frames``
frames of ``grid`` by ``grid`` tokens (time-major for video tubelets), values
in [-1, 1], and ``keep [B, V, N]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from encoders.patches import PATCH

Memo = dict[tuple[object, ...], torch.Tensor]
"""Channels already computed for one batch's ``patches`` and ``keep``, by kind."""

BORDER = 3
"""Width, in pixels, of the frame edge whose mean colour is taken for the background."""
FIGURE_SCALE = 0.45
"""Colour distance (pixel values span [-1, 1]) at which a pixel is half figure: about
57 levels of 255, where noise and gradients of a background stay well below and a
figure, at least 110 levels from its background in this world, well above."""
MOTION_FLOOR = 0.25
"""Figure weight a pixel must exceed to count in the motion track, so that a noisy
background (weights up to about 0.15) does not pull the figure's centre."""


def memoised(
    memo: Memo | None, key: tuple[object, ...], compute: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """``compute()``, or what an earlier encoder stored in ``memo`` under ``key``."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def figure(patches: torch.Tensor, keep: torch.Tensor, frames: int, grid: int) -> torch.Tensor:
    """How much each pixel stands out from the background: ``[B, V, N, frames, 256]`` in [0, 1).

    The background colour of a keep variant is the mean of its kept pixels within
    ``BORDER`` pixels of a frame's edge (of all its kept pixels when none is kept
    there): a drawing's background reaches the edges, its figure hardly does. A
    pixel at colour distance ``d`` from it weighs ``d² / (d² + s²)``, ``s`` being
    ``FIGURE_SCALE``. Whatever the two colours, the figure reads the same: a red
    star on a grey of its own luminance as well as a black one on white, and no
    sign or axis is chosen, so the channel is continuous. Masked tokens are 0.
    """
    b, _, n = keep.shape
    rgb = patches.reshape(b, n, frames, 3, PATCH * PATCH)
    weights = keep.to(patches.dtype)  # [B, V, N]
    ring = _border(n, grid, patches.device, patches.dtype)  # [N, 256]
    ring_sums = torch.einsum("bvn,bnfip,np->bvi", weights, rgb, ring)
    ring_counts = weights @ ring.sum(-1) * frames  # [B, V]
    all_sums = torch.einsum("bvn,bni->bvi", weights, rgb.sum(dim=(2, 4)))
    all_counts = (weights.sum(dim=-1) * frames * PATCH * PATCH).clamp(min=1.0)
    background = torch.where(
        ring_counts[..., None] > 0,
        ring_sums / ring_counts.clamp(min=1.0)[..., None],
        all_sums / all_counts[..., None],
    )  # [B, V, 3]; which branch depends on the mask alone, never on the pixels
    offsets = rgb.unsqueeze(1) - background[:, :, None, None, :, None]  # [B, V, N, f, 3, 256]
    distance = offsets.square().sum(dim=-2)  # [B, V, N, f, 256]
    weight = distance / (distance + FIGURE_SCALE**2)
    return weight * weights[..., None, None]


def figure_colours(patches: torch.Tensor, weight: torch.Tensor, frames: int) -> torch.Tensor:
    """Per keep variant and token: its share of figure, and the figure-weighted mean colour.

    ``patches [B, N, frames·3·256]`` and ``figure``'s ``weight [B, V, N, frames, 256]``
    → ``[B, V, N, 4]``: what tells a figure's colour from a coloured background's.
    """
    b, _, n = weight.shape[:3]
    rgb = patches.reshape(b, n, frames, 3, PATCH * PATCH)
    share = weight.mean(dim=(-2, -1))  # [B, V, N]
    colour = torch.einsum("bvnfp,bnfip->bvni", weight, rgb) / (
        weight.sum(dim=(-2, -1))[..., None] + 1e-6
    )
    return torch.cat([share.unsqueeze(-1), colour], dim=-1)


def frames_of(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """``figure``'s ``[B, V, N, frames, 256]`` → pictures ``[B, V, T·frames, grid·16, grid·16]``.

    ``N`` is ``T`` time slices of ``grid`` by ``grid`` tokens (``T`` = 1 for a still image).
    """
    b, v, n, frames, _ = weight.shape
    slices = n // (grid * grid)
    side = grid * PATCH
    pictures = weight.reshape(b, v, slices, grid, grid, frames, PATCH, PATCH)
    return pictures.permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(b, v, slices * frames, side, side)


def motion(pictures: torch.Tensor) -> torch.Tensor:
    """The figure's displacement over a clip, ``[B, V, 2]`` (x then y, in frame widths).

    ``pictures [B, V, F, S, S]`` are a clip's figure weights (``frames_of``). Each
    frame's figure centre is the mean position of its pixels weighted by their
    weight above ``MOTION_FLOOR``; the displacement is the least-squares slope of
    the centres over the clip, times its length, each frame weighed by how much
    figure it shows (a frame whose figure is masked counts for little). Every
    step is a weighted mean with a floor in its denominator: continuous, and 0
    for a clip with no figure.
    """
    f, side = pictures.shape[2], pictures.shape[3]
    mass = F.relu(pictures - MOTION_FLOOR)  # [B, V, F, S, S]
    coords = (torch.arange(side, device=pictures.device, dtype=pictures.dtype) + 0.5) / side - 0.5
    total = mass.sum(dim=(-2, -1))  # [B, V, F]
    x = (mass.sum(dim=-2) * coords).sum(dim=-1) / (total + 1.0)
    y = (mass.sum(dim=-1) * coords).sum(dim=-1) / (total + 1.0)
    trust = total / (total + 16.0)  # [B, V, F]
    time = torch.arange(f, device=pictures.device, dtype=pictures.dtype) / max(1, f - 1)
    weight_sum = trust.sum(dim=-1, keepdim=True) + 1e-3
    mean_time = (trust * time).sum(dim=-1, keepdim=True) / weight_sum
    centred = time - mean_time  # [B, V, F]
    spread = (trust * centred.square()).sum(dim=-1) + 1e-3
    centres = torch.stack([x, y], dim=-1)  # [B, V, F, 2]
    return (trust[..., None] * centred[..., None] * centres).sum(dim=2) / spread[..., None]


def _border(n: int, grid: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[N, 256]``: 1 for a token's pixels within ``BORDER`` of its frame's edge."""
    side = grid * PATCH
    index = torch.arange(n, device=device) % (grid * grid)
    rows = (index // grid)[:, None] * PATCH + torch.arange(PATCH, device=device).repeat_interleave(
        PATCH
    )
    cols = (index % grid)[:, None] * PATCH + torch.arange(PATCH, device=device).repeat(PATCH)
    edge = torch.minimum(torch.minimum(rows, cols), torch.minimum(side - 1 - rows, side - 1 - cols))
    return (edge < BORDER).to(dtype)
