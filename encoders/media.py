"""Safe decoding of submitted media into model-ready arrays.

This module runs inside small sandboxed decode worker processes, so it must
not import torch: it uses numpy, Pillow, PyAV and its own WAV reader only.
Every limit is checked from headers before pixels or samples are decoded
(DESIGN §3), and every malformed input becomes an ``UndecodableError``.
"""

from __future__ import annotations

import codecs
import pathlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from encoders.caption import read_caption
from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media_audio import decode_wav
from encoders.media_image import decode_image
from encoders.media_video import decode_mp4
from encoders.modality import MEDIA_TYPES, Modality, media_type


@dataclass(frozen=True)
class MediaLimits:
    """Per-item size limits (DESIGN §3 defaults), checked before decoding."""

    text_bytes: int = 64 * 1024
    image_bytes: int = 8 * 1024 * 1024
    image_pixels: int = 16_000_000
    audio_seconds: float = 30.0
    video_seconds: float = 10.0
    video_frames: int = 300


@dataclass(frozen=True)
class PreprocessSpec:
    """The preprocessing a model was built for; shipped in its weights manifest.

    Spatial and spectrogram sizes must be multiples of the 16-pixel patch and
    ``video_frames`` a multiple of the 2-frame tubelet, so that tokenizing
    never drops pixels.
    """

    image_size: int
    video_frames: int
    video_size: int
    audio_sample_rate: int
    n_mels: int
    audio_frames: int
    text_max_tokens: int

    def __post_init__(self) -> None:
        for name in ("image_size", "video_size", "n_mels", "audio_frames"):
            value = getattr(self, name)
            if value <= 0 or value % 16:
                raise ValueError(f"{name}={value} must be a positive multiple of 16")
        if self.video_frames <= 0 or self.video_frames % 2:
            raise ValueError(f"video_frames={self.video_frames} must be a positive even number")
        if self.audio_sample_rate < 1000:
            raise ValueError(f"audio_sample_rate={self.audio_sample_rate} is below 1000 Hz")
        if self.text_max_tokens < 3:
            raise ValueError(f"text_max_tokens={self.text_max_tokens} leaves no room for text")


DecodedMedia = str | npt.NDArray[np.float32]
"""text -> str; image -> [3,S,S]; audio -> log-mel [n_mels, audio_frames]; video -> [F,3,S,S]."""


def decode_media(
    modality: Modality, mime: str, data: bytes, limits: MediaLimits, spec: PreprocessSpec
) -> DecodedMedia:
    """Decode one submitted item into what the shard's encoders consume.

    Raises ``MediaTooLargeError`` for a limit exceeded (detected from headers
    where the format has them) and ``UndecodableError`` for anything else
    wrong with the bytes, including a media type that does not carry
    ``modality``.
    """
    named = media_type(mime)
    if named is None:
        raise UndecodableError(f"unsupported media type {mime!r}")
    mime, carried = named, MEDIA_TYPES[named]
    if carried is not modality:
        raise UndecodableError(f"media type {mime!r} carries {carried}, not {modality}")
    if not data:
        raise UndecodableError(f"empty {mime} item")
    if modality is Modality.TEXT:
        return decode_text(data, limits)
    if modality is Modality.IMAGE:
        return decode_image(mime, data, limits.image_bytes, limits.image_pixels, spec.image_size)
    if modality is Modality.AUDIO:
        return decode_wav(
            data,
            max_seconds=limits.audio_seconds,
            sample_rate=spec.audio_sample_rate,
            n_mels=spec.n_mels,
            n_frames=spec.audio_frames,
        )
    return decode_mp4(
        data,
        max_seconds=limits.video_seconds,
        max_frames=limits.video_frames,
        max_pixels=limits.image_pixels,
        n_frames=spec.video_frames,
        size=spec.video_size,
    )


def decode_text(data: bytes, limits: MediaLimits) -> str:
    """Strict UTF-8 (a submitter must not get two readings of the same bytes), read as
    the encoders read a caption (``encoders.caption``: marks a copy could change go)."""
    if len(data) > limits.text_bytes:
        raise MediaTooLargeError(f"text is {len(data)} bytes, limit {limits.text_bytes}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UndecodableError(f"text is not valid UTF-8 at byte {exc.start}") from exc
    if not text.strip():
        raise UndecodableError("text holds only whitespace")
    caption = read_caption(text)
    if not caption:
        raise UndecodableError("text holds no letter or digit")
    return caption


_SNIFF_BYTES = 1 << 20


def media_type_of(path: pathlib.Path) -> str:
    """Recognise a file's wire media type from its magic bytes.

    The CLI's ``submit FILE`` uses it so a file's name never decides how it is
    decoded. Only the first MiB is read: text is recognised by that prefix
    being UTF-8 (a character cut at the end of the prefix is allowed).
    """
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
        more = bool(handle.read(1))
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head[4:8] == b"ftyp":
        return "video/mp4"
    if not head:
        raise UndecodableError(f"{path} is empty")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=not more)
    except UnicodeDecodeError as exc:
        raise UndecodableError(f"{path} is not PNG, JPEG, WAV, MP4 nor UTF-8 text") from exc
    return "text/plain"


def read_item(text: str) -> tuple[Modality, str, bytes]:
    """A command-line item: ``text:...`` or a file, as (modality, media type, data).

    A file's media type comes from its content (:func:`media_type_of`);
    raises :class:`UndecodableError` naming the problem otherwise.
    """
    if text.startswith("text:"):
        return Modality.TEXT, "text/plain", text[len("text:") :].encode("utf-8")
    path = pathlib.Path(text)
    if not path.is_file():
        raise UndecodableError(f'{text!r} is neither text:"..." nor a readable file')
    mime = media_type_of(path)
    return MEDIA_TYPES[mime], mime, path.read_bytes()
