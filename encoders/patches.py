"""Tokenizing decoded arrays into patch sequences (DESIGN §4).

Images become 16x16 patches and video 16x16x2 tubelets; each token is the
flattened pixels of its patch. Audio tokens are time slices of the log-mel
spectrogram: 4 frames (40 ms) of every band, so a spoken word is a run of
tokens that each see its whole spectrum (16x16 patches split a word's
formants over four tokens and mixed them with their neighbours').
"""

from __future__ import annotations

import torch

PATCH = 16
TUBELET = 2
AUDIO_TOKEN_FRAMES = 4
"""Log-mel frames (10 ms each) per audio token."""


def image_patches(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, S, S]`` → ``[B, (S/16)², 3·16·16]``, row-major over the grid."""
    b, c, h, w = images.shape
    grid = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), -1)


def video_tubelets(clips: torch.Tensor) -> torch.Tensor:
    """``[B, F, 3, S, S]`` → ``[B, (F/2)·(S/16)², 2·3·16·16]``, time-major."""
    b, f, c, h, w = clips.shape
    grid = clips.reshape(b, f // TUBELET, TUBELET, c, h // PATCH, PATCH, w // PATCH, PATCH)
    tokens = (f // TUBELET) * (h // PATCH) * (w // PATCH)
    return grid.permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(b, tokens, -1)


def audio_patches(spectrograms: torch.Tensor) -> torch.Tensor:
    """``[B, M, T]`` log-mel → ``[B, T/4, M·4]``: token j holds frames 4j…4j+3 of every
    band, band-major (band 0's four frames first)."""
    b, m, t = spectrograms.shape
    k = AUDIO_TOKEN_FRAMES
    return spectrograms.reshape(b, m, t // k, k).permute(0, 2, 1, 3).reshape(b, t // k, m * k)


def unpatchify(patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, N, 3·16·16]`` patches and ``[B, V, N]`` masks → images ``[B·V, 3, S, S]``.

    The inverse of ``image_patches`` for each keep variant; hidden patches
    become 0, mid-grey in the node's [-1, 1] pixels. Adapters of models with
    their own image stem (open_clip, Hugging Face CLIP) feed them this.
    """
    b, n, _ = patches.shape
    v = keep.shape[1]
    side = round(n**0.5)
    shown = patches.unsqueeze(1) * keep.unsqueeze(-1).to(patches.dtype)
    grid = shown.reshape(b * v, side, side, 3, PATCH, PATCH)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(b * v, 3, side * PATCH, side * PATCH)
