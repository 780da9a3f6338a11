"""The project's encoder: one ``nn.Module`` binding image, video and audio to text.

Every embedding has two halves, each of length 1/√2, so that a cosine is the
mean of a **colour** cosine and a **shape** cosine:

- image and video: one ``ColourTower`` (token colour statistics and the figure's
  colours, no positions), shared by both, fills the colour half; a ``ShapeNet`` over the
  *figure* channel (how much each pixel stands out from the background, blind
  to colour) fills the shape half, through its own head per modality. Video
  runs the same ``ShapeNet`` on two of its frames and adds the
  figure's motion (``encoders.channels.motion``) to its head's input, so its
  shape half names the shape and the direction it moves;
- audio: a transformer over log-mel time slices (``PatchTower``), whose output
  is split in the same halves;
- text: the frozen pretrained MiniLM's sentence features (held by the shard,
  pinned by hash) through a trainable linear head, split the same way.

An unseen colour-shape combination then lands where its colour and its shape,
each seen in training with other partners, point. The parameter-free channels
are in ``encoders.channels``, the towers in ``encoders.towers``. Encoding takes a
keep-mask per variant of each item, so the differential loss reads ``E(x)``,
``E(x|m)`` and ``E(x|¬m)`` from one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.channels import Memo, figure, figure_colours, frames_of, memoised, motion
from encoders.interface import TextVariants
from encoders.modality import Modality
from encoders.towers import ColourTower, PatchTower, ShapeHead, ShapeNet

TEXT_FEATURES = 384
"""Width of the MiniLM sentence embedding the text head reads."""
MOTION_GAIN = 4.0
"""Scale of the motion features (a crossing moves the figure about half a frame)."""
VIDEO_SHAPE_STRIDE = 2
"""The shape network reads the first frame of one tubelet in this many."""
_FRAMES = {Modality.IMAGE: 1, Modality.VIDEO: 2}
"""Frames per token: 1 for an image patch, 2 for a video tubelet."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture sizes; stored per encoder in the manifest (format 3)."""

    dim: int
    width: int
    depth: int
    heads: int
    mlp_ratio: int
    image_tokens: int
    video_tokens: int
    audio_tokens: int
    audio_token_size: int
    """Values per audio token: the preprocessing's ``n_mels`` times 4 frames."""
    video_grid: int
    """Tokens per side of a video frame (the preprocessing's ``video_size`` / 16)."""

    @property
    def image_grid(self) -> int:
        return math.isqrt(self.image_tokens)


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
        half = config.dim // 2
        self.colour = ColourTower(config.width // 2, half)
        self.shape = ShapeNet(config.width)
        self.image_shape = ShapeHead(config.width, half)
        self.video_shape = ShapeHead(config.width, half, extra=2)
        self.audio = PatchTower(
            config.audio_token_size,
            config.audio_tokens,
            config.width,
            config.depth,
            config.heads,
            config.mlp_ratio,
            config.dim,
        )
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
        memo: Memo | None = None,
    ) -> torch.Tensor:
        """Image, video or audio tokens ``[B, N, P]`` with ``keep [B, V, N]`` → ``[B, V, D]``.

        Encoders given the same ``patches`` and ``keep`` may pass one ``memo`` so that
        the parameter-free channels are computed once for all of them.
        """
        if modality is Modality.AUDIO:
            return unit_halves(self.audio(patches, keep))
        frames = _FRAMES[modality]
        grid = self.config.image_grid if modality is Modality.IMAGE else self.config.video_grid
        weight = memoised(memo, ("figure", modality), lambda: figure(patches, keep, frames, grid))
        colours = memoised(
            memo, ("figure_colours", modality), lambda: figure_colours(patches, weight, frames)
        )
        pictures = memoised(memo, ("pictures", modality), lambda: frames_of(weight, grid))
        b, v, n = keep.shape
        cells = grid * grid
        if modality is Modality.IMAGE:
            colour = self.colour(patches, keep, colours, frames)
            pooled = self.shape(pictures, keep.reshape(b, v, 1, cells))
            shape = self.image_shape(pooled)
        else:
            colour = self.colour(patches, keep, colours, frames)
            moved = memoised(memo, ("motion", modality), lambda: motion(pictures))
            # The first frame of every other tubelet: two of the clip's frames show the
            # shape as well as eight, at a quarter of the cost (motion reads all eight).
            seen = pictures[:, :, :: VIDEO_SHAPE_STRIDE * frames]
            slices = keep.reshape(b, v, n // cells, cells)[:, :, ::VIDEO_SHAPE_STRIDE]
            pooled = self.shape(seen, slices)
            shape = self.video_shape(pooled, moved * MOTION_GAIN)
        return unit_halves(torch.cat([colour, shape], dim=-1))

    def encode_text(self, sentence_features: torch.Tensor) -> torch.Tensor:
        """Pooled MiniLM features ``[B, V, 384]`` (one per keep variant) → ``[B, V, D]``."""
        return unit_halves(self.text_head(sentence_features))
