from __future__ import annotations

import pytest

from encoders.errors import MediaTooLargeError, UndecodableError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.weights import DEFAULT_PREPROCESS

LIMITS = MediaLimits()


def decode(data: bytes, limits: MediaLimits = LIMITS) -> object:
    return decode_media(Modality.TEXT, "text/plain", data, limits, DEFAULT_PREPROCESS)


def test_utf8_text_is_returned_as_the_caption_the_encoders_read() -> None:
    assert decode("Héllo,  wörld ✓".encode()) == "hello world"
    assert decode("赤い丸".encode()) == "赤い丸"


@pytest.mark.parametrize("data", [b"!!!", "\u200b \U0001f534 --".encode()])
def test_text_without_a_letter_or_digit_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableError, match="no letter or digit"):
        decode(data)


def test_invalid_utf8_is_undecodable_with_offset() -> None:
    with pytest.raises(UndecodableError, match="UTF-8 at byte 2"):
        decode(b"ab\xff\xfe")


def test_truncated_multibyte_character_is_undecodable() -> None:
    with pytest.raises(UndecodableError):
        decode("é".encode()[:1])


@pytest.mark.parametrize("data", [b"", b"   \n\t"])
def test_empty_or_blank_text_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableError):
        decode(data)


def test_text_over_byte_limit_is_too_large() -> None:
    with pytest.raises(MediaTooLargeError) as info:
        decode(b"a" * 11, MediaLimits(text_bytes=10))
    assert info.value.reason == "too_large"


def test_mime_must_carry_the_modality() -> None:
    with pytest.raises(UndecodableError, match="carries text"):
        decode_media(Modality.IMAGE, "text/plain", b"hi", LIMITS, DEFAULT_PREPROCESS)
    with pytest.raises(UndecodableError, match="unsupported media type"):
        decode_media(Modality.TEXT, "text/html", b"hi", LIMITS, DEFAULT_PREPROCESS)
