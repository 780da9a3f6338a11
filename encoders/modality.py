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

_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "audio/x-wav": "audio/wav",
    "audio/wave": "audio/wav",
    "audio/vnd.wave": "audio/wav",
}


def media_type(mime: str) -> str | None:
    """The wire media type (a key of ``MEDIA_TYPES``) that ``mime`` names, or None.

    Media types are case-insensitive and may carry parameters (RFC 2045):
    ``IMAGE/PNG`` and ``text/plain; charset=utf-8`` name ``image/png`` and
    ``text/plain`` (text is read as strict UTF-8 whatever a parameter says). The
    common aliases ``image/jpg``, ``audio/x-wav`` and ``audio/wave`` name
    theirs. Found from the outside: each was refused ``unsupported_modality``.
    """
    base = mime.split(";", 1)[0].strip().lower()
    base = _ALIASES.get(base, base)
    return base if base in MEDIA_TYPES else None
