"""A caption as the encoders read it: the words, not the marks a copy can change.

Near-duplicates are judged on embeddings (DESIGN.md §3, §6), but text's radius
is tiny: two distinct captions of the closed world can lie 0.004 apart, so ε
for text is 0.0057. A caption copied with a mark added lands far beyond it
(measured on the shipped weights: ``!`` 0.021, ``!!!`` 0.042, quotes 0.015,
an emoji 0.016, ``<b>…</b>`` 0.085, ``**…**`` 0.039, one Cyrillic ``e``
(U+0435) for the Latin one 0.48) and was paid as new text. So the encoders read each caption in a
canonical form that such copies share with their original:

1. Unicode NFKC (full-width and mathematical letters, ligatures, superscripts
   become plain ones);
2. markup tags (``<b>``, ``</span>``) become blanks;
3. case folded (the text encoder is uncased anyway);
4. a letter that Unicode's confusables table (UTS #39, through the pinned
   ``confusable-homoglyphs`` data) lists as a look-alike of an ASCII letter
   or digit becomes that letter (Cyrillic U+0430 → ``a``);
5. accents and other combining marks dropped (as the uncased tokenizer does),
   format and control characters (zero-width spaces, bidi marks) deleted;
6. everything else that is not a letter or a digit (punctuation, symbols,
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

_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]{0,31}(?:\s+[^<>]{0,256}=[^<>]{0,256})?\s*/?>")
"""A markup tag: ``<b>``, ``</span>``, ``<br/>``, ``<a href="…">``; not ``x<y and y>z``."""
_LOCK = threading.Lock()
_CONTROLS = frozenset(chr(code) for code in [*range(0x20), 0x7F] if not chr(code).isspace())


class CaptionDataError(RuntimeError):
    """The confusables data is missing or not the pinned file."""


def read_caption(text: str) -> str:
    """``text`` in the form the encoders read (see the module's docstring); ``""``
    when it holds no letter or digit."""
    if text.isascii():
        text = _TAG.sub(" ", text).lower().translate(_ASCII)
        return " ".join(text.split())
    folds, table = _tables()
    # Look-alikes first (NFKC would turn some into letters that are not: the
    # lunate sigma U+03F2, a look-alike of c, becomes sigma), then
    # again after NFKC and case folding, which make look-alikes of their own.
    text = unicodedata.normalize("NFKC", text.translate(folds))
    text = _TAG.sub(" ", text).casefold()
    text = unicodedata.normalize("NFD", text).translate(table)
    text = _FAR.sub(" ", text)
    return " ".join(unicodedata.normalize("NFC", text).split())


_ASCII: dict[int, str | None] = {
    code: None if chr(code) in _CONTROLS else " " for code in range(128) if not chr(code).isalnum()
}
"""ASCII: control characters are deleted (as the tokenizer deletes them: ``re\\x01d``
is ``red``), and every other character that is not a letter or a digit becomes a blank."""


_DELETED = frozenset({"Mn", "Me", "Cf", "Cs"})
"""Combining marks (accents: the uncased tokenizer drops them too), format characters
(zero-width spaces and joiners, bidi marks) and lone surrogates."""
_FAR = re.compile("[\U00040000-\U000dffff\U000e1000-\U0010ffff]")
"""Planes 4-13 (unassigned), the rest of 14 and the private-use planes 15-16: no
letter of any script."""


def _tables() -> tuple[dict[int, str], dict[int, str | None]]:
    with _LOCK:
        return _built()


@functools.cache
def _built() -> tuple[dict[int, str], dict[int, str | None]]:
    """The look-alikes alone, and what each character up to plane 3 (and plane 14's
    tags and selectors) becomes: deleted (``None``), a blank, an ASCII look-alike, or
    (absent) itself. Built once per process, from the first non-ASCII caption (about
    0.1 s)."""
    folds = {ord(char): ascii_ for char, ascii_ in _ascii_lookalikes().items()}
    table: dict[int, str | None] = dict(_ASCII)
    for plane in (range(0x80, 0x40000), range(0xE0000, 0xE1000)):
        for code in plane:
            category = unicodedata.category(chr(code))
            if category in _DELETED or (category == "Cc" and not chr(code).isspace()):
                table[code] = None
            elif code in folds:
                table[code] = folds[code]
            elif category[0] not in "LN" and category != "Mc":  # a vowel sign is a word's
                table[code] = " "
    return folds, table


def _ascii_lookalikes() -> dict[str, str]:
    """Each non-ASCII character that UTS #39 lists as confusable with an ASCII letter
    or digit, and the lower-case letter (else the digit) it is read as; where several
    qualify, a lower-case letter first, then an upper-case one, then a digit, each by
    code point."""
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
    folds: dict[str, str] = {}
    for char, glyphs in json.loads(raw).items():
        if len(char) != 1 or char.isascii():
            continue
        ascii_ = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii()]
        letters = sorted(c for c in ascii_ if c.isalnum())
        if letters:
            best = min(letters, key=lambda c: (not c.islower(), not c.isalpha(), c))
            folds[char] = best.lower()
    return folds
