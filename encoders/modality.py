"""The modalities of the shared space and the media types that carry them."""

from __future__ import annotations

from enum import StrEnum


class Modality(StrEnum):
    """A kind of data the shared embedding space accepts."""

    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"


PATCHED: tuple[Modality, ...] = (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)
"""The modalities tokenized into patches (DESIGN.md §4), each with its own tower."""

MEDIA_TYPES: dict[str, Modality] = {
    "text/plain": Modality.TEXT,
    "image/png": Modality.IMAGE,
    "image/jpeg": Modality.IMAGE,
    "audio/wav": Modality.AUDIO,
    "video/mp4": Modality.VIDEO,
}
"""Wire protocol v1 media types (DESIGN.md §3), each with the modality it carries."""
