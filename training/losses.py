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


def pairwise_sigmoid(
    items: torch.Tensor,
    texts: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's loss: every (item, text) cell is a binary "same concept?" decision.

    Unlike InfoNCE, which only ranks texts per item, it pushes matched pairs
    above and mismatched pairs below one learned similarity threshold for
    the whole space, which is what a single δ per modality pair needs.
    """
    logits = scale * items @ texts.T + bias
    signs = (labels[:, None] == labels[None, :]).to(logits.dtype) * 2.0 - 1.0
    return -torch.nn.functional.logsigmoid(signs * logits).sum(dim=1).mean()
