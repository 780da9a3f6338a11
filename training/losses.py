"""InfoNCE with several positives: every item of the same concept counts as a match."""

from __future__ import annotations

import torch


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """``-log Σ_pos softmax(logits)`` per row, averaged; ``positives`` is boolean ``[B, B']``.

    With one positive per row (the diagonal) this is CLIP's InfoNCE; with a
    closed world, other items of the same concept in the batch are not
    negatives, so all of them share the probability mass.
    """
    masked = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def symmetric_nce(
    items: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Both directions (item → text and text → item) of the multi-positive loss."""
    logits = scale * items @ texts.T
    positives = labels[:, None] == labels[None, :]
    return 0.5 * (multi_positive_nce(logits, positives) + multi_positive_nce(logits.T, positives))
