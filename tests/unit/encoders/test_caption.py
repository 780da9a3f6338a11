"""A caption as the encoders read it: copies that only add marks read as the original."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders import caption
from encoders.caption import CaptionDataError, read_caption
from encoders.embedding import EncodeRequest
from encoders.errors import WeightsError
from encoders.media import MediaLimits, decode_media
from encoders.modality import Modality
from encoders.shard import Shard
from encoders.weights import DEFAULT_PREPROCESS, sha256_file

ORIGINAL = "a red circle"
COPIES = [
    "a red circle!!!",
    "a red circle.",
    "A Red Circle",
    "A  RED\tCIRCLE\n",
    '"a red circle"',
    "«a red circle»",
    "**a red circle**",
    "<b>a red circle</b>",
    '<span class="x">a red</span> circle<br/>',
    "a red circle \U0001f534",
    "a r\u200bed\u200d circle\u202e",  # zero-width joiners, a bidi override
    "a r\u0435d circl\u0435",  # Cyrillic ie (U+0435)
    "\u0430 red circle",  # Cyrillic a (U+0430)
    "a red \u03f2ircle",  # Greek lunate sigma for c
    "".join(chr(ord(c) + 0xFEE0) if c != " " else c for c in "a red circle"),  # full-width
    "".join(chr(ord(c) + 0x1D3B9) if c != " " else c for c in "a red circle"),  # math bold
    "a re\u0301d circle",  # a combining accent
    "á réd círclé",
    "a red circle ¡¿…—",
    "a red circle\u3164",  # a Hangul filler: a letter nobody sees
    "\u02baa red circle\u02ba",  # modifier letters as quotes
    "a red circle\u01c3",  # a click letter as an exclamation mark
    "a re\u0640d circle",  # the Arabic tatweel stretching a word
    "A RED CIRCLE\u0903",  # a vowel sign as a colon
    "<b>a red circle</b> \u2122",  # markup beside a non-ASCII mark
    "a red circle\u2122",  # the trade mark sign (NFKC makes it tm)
    "a red circle \u24d8 \u02c7 \u02db",  # a circled i, spacing caron and ogonek
    "a re\u2065d circ\U000e0002le",  # default-ignorable code points, unassigned
    "\u1d00 \u0280\u1d07\u1d05 \u1d04\u026a\u0280\u1d04\u029f\u1d07",  # small capitals
]


@pytest.mark.parametrize("copy", COPIES)
def test_a_copy_with_marks_reads_as_its_original(copy: str) -> None:
    assert read_caption(copy) == ORIGINAL


@pytest.mark.parametrize(
    "text, read",
    [
        ("a blue circle", "a blue circle"),  # other words stay other
        ("10 red circles", "10 red circles"),  # digits are words
        ("x<y and y>z", "x y and y z"),  # comparison signs are not markup
        ("it's a green circle", "it s a green circle"),
        ("赤い丸", "赤い丸"),  # letters of other scripts stay
        ("हिन्दी", "हिनदी"),  # with their vowel signs; combining marks go, as accents do
        ("circle No. 2", "circle no 2"),
        ("a red circIe", "a red circie"),  # ASCII look-alikes are words of their own
    ],
)
def test_what_the_reading_keeps(text: str, read: str) -> None:
    assert read_caption(text) == read


@pytest.mark.parametrize(
    "copy, original",
    [
        ("\uff29n a box", "In a box"),  # full-width I is I (NFKC), not its look-alike l
        ("\u0399n a box", "In a box"),  # a Greek capital iota stands for I
        ("\U0001d7cf\U0001d7ce red circles", "10 red circles"),  # mathematical digits
        ("\u041c\u041e\u0421\u041a\u0412\u0410", "\u043c\u043e\u0441\u043a\u0432\u0430"),
        ("\u017fun", "sun"),  # the long s
        ("shape: cross \u2223 colour: blue", "shape: cross, colour: blue"),  # a bar, not l
        ("<b\x01>red", "<b>red"),  # control characters go before markup, in both paths
        ("<b\x01>red\u00e9", "<b>red\u00e9"),
    ],
)
def test_look_alikes_read_as_what_they_look_like(copy: str, original: str) -> None:
    assert read_caption(copy) == read_caption(original)


@pytest.mark.parametrize("text", ["a." * 1000, "a-b " * 300, "\u00df" * 3000, "\ufdfa" * 300])
def test_reading_a_reading_gives_it_back(text: str) -> None:
    """The shard reads again what decoding read (``encoders.shard._text``): bounds cut
    after punctuation split words or case folding grew them (ß is ss) too."""
    read = read_caption(text)
    assert read_caption(read) == read and len(read) <= caption.READ_CHARS


@pytest.mark.parametrize("text", ["", "   ", "!!!", "\u200b", "\U0001f534 --", "<b></b>"])
def test_marks_alone_read_as_nothing(text: str) -> None:
    assert read_caption(text) == ""


def test_only_the_first_characters_are_read() -> None:
    """The encoders' window (64 wordpieces) ends long before; past it nothing is read,
    so a 64 KiB caption is bounded work however it is built."""
    head = "a red circle " * (caption.READ_CHARS // 13 + 1)
    assert read_caption(head + "and more") == read_caption(head + "or less")
    # Blanks count once: padding in front does not push the words out of reach.
    assert read_caption(" " * 60_000 + "a red  \n circle") == "a red circle"
    # One letter under 64,000 combining marks (normalization reorders marks in
    # quadratic time: 0.6 s of the event loop when they were read), markup that
    # backtracked, and ligatures that grow eighteenfold under NFKC.
    assert read_caption("a" + "\u0301\u0316" * 32_000) == "a"
    assert set(read_caption(("<a " + "=" * 250) * 260).split()) == {"a"}  # not markup
    assert len(read_caption("\ufdfa" * 20_000)) <= caption.READ_CHARS


@settings(max_examples=300)
@given(st.text(max_size=3000))
def test_the_reading_is_a_fixed_point_of_words_and_single_blanks(text: str) -> None:
    read = read_caption(text)
    assert read_caption(read) == read
    assert read == read.strip() and "  " not in read
    assert all(char == " " or char.isalnum() or unicodedata.category(char) == "Mc" for char in read)


def test_the_confusables_data_is_the_pinned_file(
    monkeypatch: pytest.MonkeyPatch, shard_manifest: Path
) -> None:
    """Every member must read captions alike: another table would fold other letters,
    so a shard (and so a node) with another table refuses to load."""
    monkeypatch.setattr(caption, "CONFUSABLES_SHA256", "0" * 64)
    caption._built.cache_clear()
    try:
        with pytest.raises(CaptionDataError, match="expected 0000"):
            read_caption("\u0430 red circle")
        with pytest.raises(WeightsError, match="confusable-homoglyphs data has SHA-256"):
            Shard.load(shard_manifest, sha256_file(shard_manifest))
    finally:
        monkeypatch.undo()
        caption._built.cache_clear()
    assert read_caption("\u0430 red circle") == ORIGINAL


def test_another_unicode_database_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption, "UNICODE_VERSION", "15.0.0")
    with pytest.raises(CaptionDataError, match=r"Unicode 15\.0\.0 .* this Python has Unicode 14"):
        caption.check_caption_data()


def test_the_package_data_override_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "confusables.json").write_text("{}")
    monkeypatch.setenv("CONFUSABLE_DATA", str(tmp_path))
    caption._built.cache_clear()
    try:
        assert read_caption("\u0430 red circle") == ORIGINAL
    finally:
        caption._built.cache_clear()


def test_copies_embed_exactly_as_the_original(shard: Shard) -> None:
    """Same reading, same tokens, same masks (seeded by the reading): distance 0, so a
    copy is within text's near-duplicate radius of its original however small it is."""

    def embedded(text: str) -> np.ndarray:
        data = text.encode()
        media = decode_media(Modality.TEXT, "text/plain", data, MediaLimits(), DEFAULT_PREPROCESS)
        request = EncodeRequest(Modality.TEXT, media, hashlib.sha256(data).digest())
        (item,) = shard.embed([request], b"beacon")
        return np.asarray(item.vector)

    original = embedded(ORIGINAL)
    for copy in COPIES[:3] + COPIES[7:13]:
        assert np.array_equal(embedded(copy), original), copy
    assert not np.array_equal(embedded("a blue circle"), original)
