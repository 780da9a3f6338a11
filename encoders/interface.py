"""The public encoder contract: what any model must provide to join a shard.

A shard hands every encoder the same inputs, already tokenized and masked
(DESIGN §4), and expects unit vectors of one shared dimension back:

- ``embed_patches(modality, patches [B, N, P], keep [B, V, N]) -> [B, V, D]``
  for image, video and audio: 16x16 patches, 2x16x16 tubelets, 16x16
  log-mel patches (``encoders.patches``), and per item V keep-masks (the
  full input, then each mask and its complement). A masked-out token must
  not influence the output.
- ``embed_text(text: TextVariants) -> [B, V, D]``: the same V variants of
  each text, offered both as features of the shard's pinned MiniLM and as
  plain strings (the kept wordpieces, detokenized), so an encoder with its
  own tokenizer can read the strings.

``modalities`` says which of the four an encoder reads; a shard asks each
encoder only for those, and an encoder that lacks a modality is left out of
that modality's ensemble (its differential loss is reported as NaN).

Outputs must be L2-normalised; a non-finite output drops that encoder from
the item's ensemble. See docs/ENCODERS.md for how to plug a model in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from encoders.modality import Modality


class TextVariants:
    """The V keep-variants of a batch of B texts, computed only if an encoder asks."""

    def __init__(
        self,
        texts: tuple[str, ...],
        features: Callable[[], torch.Tensor],
        strings: Callable[[], tuple[tuple[str, ...], ...]],
    ) -> None:
        self.texts = texts
        self._features = features
        self._strings = strings

    @cached_property
    def features(self) -> torch.Tensor:
        """Mean-pooled, normalised MiniLM features ``[B, V, 384]``."""
        return self._features()

    @cached_property
    def strings(self) -> tuple[tuple[str, ...], ...]:
        """``strings[b][v]``: variant v of text b as plain text (variant 0 is the whole text)."""
        return self._strings()


@runtime_checkable
class Encoder(Protocol):
    """One encoder of a shard (the project's own ``MultimodalEncoder`` is one)."""

    @property
    def dim(self) -> int:
        """D, the size of every embedding; equal for all encoders of a shard."""
        ...

    @property
    def modalities(self) -> frozenset[Modality]:
        """The modalities this encoder reads."""
        ...

    def embed_text(self, text: TextVariants) -> torch.Tensor:
        """Unit embeddings ``[B, V, D]`` of every variant of every text."""
        ...

    def embed_patches(
        self, modality: Modality, patches: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Unit embeddings ``[B, V, D]`` of patches ``[B, N, P]`` under keep-masks ``[B, V, N]``."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    """An encoder entry of a verified manifest: what a loader builds an encoder from.

    ``path`` is the encoder's weight file, already checked against its
    SHA-256; ``config`` is the entry's free-form ``config`` object; ``extra``
    lists other files of the manifest's folder by name (all verified), for
    loaders that need more than one file.
    """

    kind: str
    path: Path
    config: Mapping[str, Any]
    extra: Mapping[str, Path]
    device: str


EncoderLoader = Callable[[EncoderSpec], Encoder]
"""Builds an encoder from its manifest entry; registered per ``kind``."""
