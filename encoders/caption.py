"""A caption as the encoders read it: the words, not the marks a copy can change.

Near-duplicates are judged on embeddings (DESIGN.md §3, §6), but text's radius
is tiny: two distinct captions of the closed world can lie 0.004 apart, so ε
for text was 0.0057 (0.0018 since the weights were recalibrated on this
reading). A caption copied with a mark added landed far beyond it
(measured on the shipped weights: ``!`` 0.021, ``!!!`` 0.042, quotes 0.015,
an emoji 0.016, ``<b>…</b>`` 0.085, ``**…**`` 0.039, one Cyrillic ``e``
(U+0435) for the Latin one 0.48) and was paid as new text. So the encoders
read each caption in a canonical form that such copies share with their
original:

1. only the first ``READ_CHARS`` (2,048) characters, runs of blanks counted
   as one, far past the encoders' window;
2. a character that Unicode's confusables table (UTS #39, through the pinned
   ``confusable-homoglyphs`` data) lists as a look-alike of an ASCII letter
   or digit becomes that letter (Cyrillic U+0430 → ``a``), before and after
   the steps below, and so does a Latin small capital; symbols, punctuation
   and spacing modifier marks become blanks first, before NFKC can make
   letters of them (the trade mark sign would be ``tm``);
3. Unicode NFKC (full-width and mathematical letters, ligatures, superscripts
   become plain ones);
4. markup tags (``<b>``, ``</span>``) become blanks;
5. case folded (the text encoder is uncased anyway);
6. accents and other combining marks dropped (as the uncased tokenizer does),
   format and control characters (zero-width spaces, bidi marks), invisible
   fillers and default-ignorable code points deleted;
7. everything else that is not a letter or a digit (punctuation, symbols,
   emoji, blanks of any kind) becomes one blank; leading and trailing blanks
   go.

Copies that differ only in those marks become the same string, so the same
tokens, the same masks (the text's masks are seeded by this form,
``encoders.shard``) and the same embedding: distance 0, a duplicate.

What it does not catch: copies that change the words (a typo, a synonym, ASCII
look-alikes such as ``I`` for ``l`` or ``0`` for ``o``, which are words of
their own to the tokenizer). Those are new text to the encoders.

Every member must read captions alike, so the confusables data is checked
against its SHA-256 when first used, and the package's own ``CONFUSABLE_DATA``
override is ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import threading
import unicodedata
from importlib import resources

CONFUSABLES_SHA256 = "2d8b4774cd9dc6f233a18681bc00423ae270037437f276fc6a8b80630941fe7d"
"""SHA-256 of ``confusable_homoglyphs/confusables.json`` (version 3.3.1)."""

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]{0,31}+(?:\s++[^<>=]{0,64}+=[^<>]{0,256}+)?+\s*+/?>")
"""A markup tag: ``<b>``, ``</span>``, ``<br/>``, ``<a href="…">``; not ``x<y and y>z``.
Possessive throughout: a scan never backtracks, so 64 KiB of ``<a ====…`` costs
0.3 ms, where plain quantifiers took 160 ms of the event loop."""
_LOCK = threading.Lock()
_CONTROLS = frozenset(chr(code) for code in [*range(0x20), 0x7F] if not chr(code).isspace())


class CaptionDataError(RuntimeError):
    """The confusables data is missing or not the pinned file."""


READ_CHARS = 2048
"""Only a caption's first characters (blanks between words counted once) are read: the
encoders' window (64 wordpieces for the shipped text tower, 77 for a CLIP) ends long
before, and reading is then bounded work on the event loop whatever the caption holds
(64 KiB of it, or one letter under 32,000 combining marks, which Unicode normalization
reorders in quadratic time)."""
READ_WORDS = 512
"""At most this many blank-separated words are read (each is one wordpiece at least)."""


def read_caption(text: str) -> str:
    """``text`` in the form the encoders read (see the module's docstring); ``""``
    when it holds no letter or digit. Reading a reading gives it back."""
    # Blanks in front or between words are not read as characters (the split stops
    # after READ_WORDS words: C speed over 64 KiB of blanks).
    text = " ".join(text.split(maxsplit=READ_WORDS)[:READ_WORDS])[:READ_CHARS]
    if text.isascii():
        text = _TAG.sub(" ", text.translate(_ASCII_CONTROLS)).lower().translate(_ASCII)
    else:
        early, table = _tables()
        # Look-alikes first (NFKC would turn some into letters that are not: the lunate
        # sigma U+03F2, a look-alike of c, becomes sigma), and marks and format
        # characters out before any normalization reorders them; then the look-alikes
        # again, after NFKC and case folding, which make look-alikes of their own.
        text = unicodedata.normalize("NFKC", text.translate(early))[:READ_CHARS]  # ≤ 18-fold
        text = _TAG.sub(" ", text).casefold()
        text = unicodedata.normalize("NFD", text).translate(table)
        text = unicodedata.normalize("NFC", text)
    # Punctuation split words and case folding grew some (ß is ss): cut to the same
    # bounds again, so that the reading of a reading is itself.
    return " ".join(text.split()[:READ_WORDS])[:READ_CHARS].rstrip()


_ASCII: dict[int, str | None] = {
    code: None if chr(code) in _CONTROLS else " " for code in range(128) if not chr(code).isalnum()
}
"""ASCII: control characters are deleted (as the tokenizer deletes them: ``re\\x01d``
is ``red``), and every other character that is not a letter or a digit becomes a blank."""


_ASCII_CONTROLS: dict[int, str | None] = {ord(char): None for char in _CONTROLS}
_DELETED = frozenset({"Mn", "Me", "Cf", "Cs"})
"""Combining marks (accents: the uncased tokenizer drops them too), format characters
(zero-width spaces and joiners, bidi marks) and lone surrogates."""
_INVISIBLE = frozenset({0x115F, 0x1160, 0x3164, 0xFFA0, 0x0640})
"""Letters nobody sees: the Hangul fillers (default-ignorable code points of category
Lo) and the Arabic tatweel, which only stretches a word."""
_IGNORABLE = ((0x2065, 0x2065), (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))
"""Default-ignorable code points unassigned in Unicode 14.0 (rendered as nothing)."""
_REMEMBERED = 1 << 16
"""Characters a table remembers (about 5 MiB each at most); past that it still answers."""


class _Table(dict[int, "str | None"]):
    """A ``str.translate`` table that works each character out on first sight: deleted
    (``None``), a blank, its ASCII look-alike, or itself. A full table up to plane 3
    would take 21 MB in every process that reads captions; this one holds the
    characters seen, at C speed after the first time."""

    def __init__(self, folds: dict[int, str], *, early: bool) -> None:
        super().__init__()
        self._folds = folds
        self._early = early  # the raw text: look-alikes and deletions only

    def __missing__(self, code: int) -> str | None:
        char = chr(code)
        category = unicodedata.category(char)
        value: str | None = char
        if self._early and code < 0x80:  # ASCII marks wait for the markup pass
            value = None if char in _CONTROLS else char
        elif (
            category in _DELETED
            or code in _INVISIBLE
            or any(low <= code <= high for low, high in _IGNORABLE)
            or (category == "Cc" and not char.isspace())
        ):
            value = None
        elif category[0] in "SP" or (category == "Lm" and 0x02B0 <= code <= 0x02FF):
            # Symbols, punctuation and spacing modifier marks are blanks before NFKC can
            # make letters of them (the trade mark sign is tm, a circled i is i) or a
            # look-alike a letter (the divides sign U+2223 is l).
            value = " "
        elif (small := _small_capital(char)) is not None:
            value = small  # "fancy text" in small capitals
        elif code in self._folds and not (self._early and _plain_after_nfkc(char)):
            value = self._folds[code]
        elif not self._early and category[0] not in "LN" and category != "Mc":
            value = " "  # (a vowel sign, Mc, belongs to its word)
        if len(self) < _REMEMBERED:
            self[code] = value
        return value


def _small_capital(char: str) -> str | None:
    """The ASCII letter a LATIN LETTER SMALL CAPITAL stands for (U+1D00 is a), else None."""
    name = unicodedata.name(char, "")
    prefix = "LATIN LETTER SMALL CAPITAL "
    if name.startswith(prefix) and len(name) == len(prefix) + 1:
        return name[-1].lower()
    return None


def _plain_after_nfkc(char: str) -> bool:
    """NFKC already makes it an ASCII letter or digit (full-width I is I, not its
    look-alike l); it is left to NFKC and case folding."""
    plain = unicodedata.normalize("NFKC", char)
    return plain.isascii() and plain.isalnum()


UNICODE_VERSION = "14.0.0"
"""The Unicode database captions are read with (Python 3.11's): a character unassigned
in one version is a letter in the next (U+1E030, a Cyrillic modifier letter in 15.0),
so members on two versions would read one caption two ways."""


def check_caption_data() -> None:
    """Load the pinned look-alikes now, and check the Unicode database; raises
    :class:`CaptionDataError` if either is not the pinned one (a node refuses to start,
    rather than read its first non-ASCII caption unlike the rest of its committee)."""
    if unicodedata.unidata_version != UNICODE_VERSION:
        raise CaptionDataError(
            f"captions are read with Unicode {UNICODE_VERSION} (Python 3.11); this Python "
            f"has Unicode {unicodedata.unidata_version}: run the node on Python 3.11"
        )
    _tables()


def _tables() -> tuple[_Table, _Table]:
    with _LOCK:
        return _built()


@functools.cache
def _built() -> tuple[_Table, _Table]:
    """The tables for the raw text (look-alikes and deletions) and for the normalized
    one (blanks as well), from the pinned look-alikes (about 20 ms, once a process)."""
    folds = {ord(char): ascii_ for char, ascii_ in _ascii_lookalikes().items()}
    table = _Table(folds, early=False)
    table.update(_ASCII)
    return _Table(folds, early=True), table


def _ascii_lookalikes() -> dict[str, str]:
    """What each non-ASCII character that UTS #39 lists as confusable with ASCII is read
    as: a letter as the ASCII letter it looks like (lower case), else as its upper
    case's (Cyrillic em, U+043C, as its capital: m; a caption in capitals reads as in
    small letters); a digit as an ASCII digit; a look-alike of ASCII punctuation alone
    (the retroflex click U+01C3 for !, the modifier apostrophe U+02BC, the visarga for
    a colon) as a blank. Where several qualify, a
    lower-case letter first, then an upper-case one, each by code point."""
    package = resources.files("confusable_homoglyphs")
    try:
        raw = package.joinpath("confusables.json").read_bytes()
    except OSError as exc:
        raise CaptionDataError(f"confusable-homoglyphs data is missing: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CONFUSABLES_SHA256:
        raise CaptionDataError(
            f"confusable-homoglyphs data has SHA-256 {digest}, expected {CONFUSABLES_SHA256}"
            " (install the pinned version)"
        )
    table: dict[str, list[str]] = {
        char: [g["c"] for g in glyphs if g["c"].isascii()]
        for char, glyphs in json.loads(raw).items()
        if len(char) == 1 and not char.isascii()
    }
    folds: dict[str, str] = {}
    for char, looks in table.items():
        target = _alike(char, looks)
        upper = char.upper()
        if target is None and len(upper) == 1 and upper != char and char.isalpha():
            target = _alike(char, table.get(upper, []))
        if target is not None:
            folds[char] = target
        elif looks and all(
            not look.isspace() and not any(c.isalnum() for c in look) for look in looks
        ):
            folds[char] = " "
    return folds


def _alike(char: str, looks: list[str]) -> str | None:
    """The ASCII letter (for a letter) or digit (for a digit) among ``looks``."""
    singles = [look for look in looks if len(look) == 1 and look.isalnum()]
    if char.isalpha():
        singles = [look for look in singles if look.isalpha()]
    elif unicodedata.category(char)[0] == "N":
        singles = [look for look in singles if look.isdigit()]
    if not singles:
        return None
    best = min(singles, key=lambda c: (not c.islower(), c)).lower()
    # UTS #39 reads I and l alike, as l; a capital that looks like l stands for an I.
    return "i" if best == "l" and char.isupper() else best
