"""A tiny, randomly initialised Hugging Face CLIP checkpoint, built on disk without a download.

A CLIP config with two-layer, 32-wide towers and 32x32 pictures in 16x16
patches, a BPE tokenizer whose vocabulary (letters, with and without the
end-of-word mark) and empty merges are written here, and the image
processor's config, all saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PROJECTION = 24
SIDE = 32


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Save a random tiny CLIP checkpoint (model, tokenizer, image processor) in ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True)
    source = folder.parent / f"{folder.name}-tokenizer-source"
    source.mkdir()
    letters = list(string.ascii_lowercase)
    vocab = {token: i for i, token in enumerate([*letters, *(c + "</w>" for c in letters)])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (source / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (source / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(source), local_files_only=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIDE,
            "patch_size": 16,
        },
        projection_dim=PROJECTION,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    images = CLIPImageProcessor(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder
