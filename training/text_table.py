"""Frozen MiniLM features of every caption of every concept, computed once.

The text tower's backbone is frozen, so its sentence features are a fixed
table: training only runs the trainable text head over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from encoders.text_backbone import TextBackbone
from training.world import Concept

_BATCH = 64


@dataclass(frozen=True)
class TextTable:
    """``features[concept, phrasing]`` (``[C, P, 384]``) and the phrasings themselves."""

    features: torch.Tensor
    captions: tuple[tuple[str, ...], ...]


def sentence_features(backbone: TextBackbone, texts: Sequence[str]) -> torch.Tensor:
    """Full-text (unmasked) MiniLM features ``[N, 384]``, exactly as the shard computes them."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), _BATCH):
            tokens = backbone.tokenize(list(texts[start : start + _BATCH]))
            keep = tokens.attention.unsqueeze(1)
            out.append(backbone.sentence_features(tokens, keep)[:, 0])
    return torch.cat(out).clone()


def build_table(
    backbone: TextBackbone,
    concepts: Sequence[Concept],
    phrasings: Callable[[Concept], list[str]],
) -> TextTable:
    """Features of ``phrasings(c)`` for every concept (each concept has as many)."""
    captions = tuple(tuple(phrasings(c)) for c in concepts)
    flat = [text for group in captions for text in group]
    features = sentence_features(backbone, flat).reshape(len(concepts), len(captions[0]), -1)
    return TextTable(features, captions)
