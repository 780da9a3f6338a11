"""Preprocessing, encoders, masks, differential loss, shard ensemble and fusion.

A pure core: no sockets, no YAML, no environment. The torch-free names
(errors, media decoding, masks, fusion, value types) are imported eagerly;
``Shard``, ``create_untrained_shard`` and ``sha256_file`` pull in torch and
are loaded on first use, so that the sandboxed decode workers that import
``encoders.media`` never load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from encoders.embedding import EncodeRequest, ItemEmbedding
from encoders.errors import (
    EncoderError,
    EncodingFailedError,
    MediaTooLargeError,
    UndecodableError,
    WeightsError,
)
from encoders.fusion import PairOutcome, cosine_distance, fuse_pair
from encoders.masks import MASK_SHARES, mask_seed, token_masks
from encoders.media import (
    DecodedMedia,
    MediaLimits,
    PreprocessSpec,
    decode_media,
    media_type_of,
)
from encoders.modality import MEDIA_TYPES, Modality

if TYPE_CHECKING:
    from encoders.shard import Shard
    from encoders.weights import create_untrained_shard, sha256_file

_LAZY = {
    "Shard": "encoders.shard",
    "create_untrained_shard": "encoders.weights",
    "sha256_file": "encoders.weights",
}

__all__ = [
    "MASK_SHARES",
    "MEDIA_TYPES",
    "DecodedMedia",
    "EncodeRequest",
    "EncoderError",
    "EncodingFailedError",
    "ItemEmbedding",
    "MediaLimits",
    "MediaTooLargeError",
    "Modality",
    "PairOutcome",
    "PreprocessSpec",
    "Shard",
    "UndecodableError",
    "WeightsError",
    "cosine_distance",
    "create_untrained_shard",
    "decode_media",
    "fuse_pair",
    "mask_seed",
    "media_type_of",
    "sha256_file",
    "token_masks",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'encoders' has no attribute {name!r}")
