"""Value types of the shard's output, free of torch so that fusion and the
node's decode side can use them without loading a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from encoders.media import DecodedMedia
from encoders.modality import Modality


@dataclass(frozen=True)
class ItemEmbedding:
    """One item's place in the shared space, with how much to trust it.

    ``encoder_losses`` holds every encoder's differential loss, including an
    encoder dropped as an outlier; it is ``nan`` only for an encoder whose
    output was not finite. ``used`` says which encoders entered the average.
    """

    vector: npt.NDArray[np.float32]
    diff_loss: float
    quality: float
    encoder_losses: tuple[float, ...]
    used: tuple[bool, ...]


@dataclass(frozen=True)
class EncodeRequest:
    """An item decoded by ``decode_media``, with the hash that seeds its masks."""

    modality: Modality
    media: DecodedMedia
    data_sha256: bytes
