"""Turn docstring text into clean English prose sentences.

Docstrings mix prose with code samples, argument tables and ASCII art. The filters
below keep sentences that read like ordinary English, because the benchmark wants
a natural-language masked-LM task, not a code-completion one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MIN_WORDS = 5
MAX_WORDS = 60
# Share of non-space characters that must be letters; keeps out sentences that
# are mostly numbers, paths or punctuation.
MIN_LETTER_SHARE = 0.85

# Substrings that almost always mean code, markup, URLs or identifiers rather than prose.
# fmt: off
CODE_MARKERS: tuple[str, ...] = (
    ">>>", "{", "}", "==", "::", "`", "->", "()", "[", "]", "=", "\\", "<", ">",
    "|", "#", "$", "@", "*", "~", "^", "_", "...", " -- ", "http", "www.", "://",
)
# fmt: on

# camelCase words, dotted calls like `os.path(` and dotted names with 3+ parts
# (`xml.dom.minidom`) are identifiers, not English words.
IDENTIFIER_PATTERN = re.compile(r"\b[a-z]+[A-Z]\w*\b|\w+\.\w+\(|\b\w+\.\w+\.\w+")

# A sentence ends at . ! or ? followed by whitespace and something that can start
# a sentence. Requiring an uppercase/quote/bracket after the space avoids splitting
# inside "e.g. the" or "i.e. a".
SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def text_blocks(docstring: str) -> Iterator[str]:
    """Yield runs of consecutive lines that share one indentation, joined by spaces.

    Blank lines end a paragraph, and a change of indentation marks a code sample,
    an argument table or a hanging definition; splitting there stops a prose
    sentence from being glued to the code that follows it.
    """
    block: list[str] = []
    block_indent: int | None = None
    for line in docstring.split("\n"):
        stripped = line.strip()
        if not stripped:
            if block:
                yield " ".join(block)
            block, block_indent = [], None
            continue
        indent = len(line) - len(line.lstrip())
        if block and indent != block_indent:
            yield " ".join(block)
            block = []
        block_indent = indent
        block.append(stripped)
    if block:
        yield " ".join(block)


def normalise_whitespace(text: str) -> str:
    """Collapse every whitespace run (tabs, newlines, double spaces) to one space."""
    return " ".join(text.split())


def split_sentences(docstring: str) -> Iterator[str]:
    """Yield whitespace-normalised candidate sentences of a (cleaned) docstring."""
    for block in text_blocks(docstring):
        for sentence in SENTENCE_BOUNDARY.split(normalise_whitespace(block)):
            if sentence:
                yield sentence


def is_prose_sentence(sentence: str) -> bool:
    """True if `sentence` looks like a plain English sentence rather than code or a fragment."""
    if not sentence or not sentence[0].isupper():
        return False
    # "..." endings are elided fragments; "." is the only ending we accept.
    if not sentence.endswith(".") or sentence.endswith(".."):
        return False
    # Non-ASCII in stdlib docstrings is mostly codec tables and symbols.
    if not sentence.isascii():
        return False
    if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
        return False
    if any(marker in sentence for marker in CODE_MARKERS):
        return False
    if IDENTIFIER_PATTERN.search(sentence):
        return False
    visible = sentence.replace(" ", "")
    letters = sum(character.isalpha() for character in visible)
    return letters >= MIN_LETTER_SHARE * len(visible)


def prose_sentences(docstring: str) -> Iterator[str]:
    """The sentences of `docstring` that pass is_prose_sentence."""
    return (s for s in split_sentences(docstring) if is_prose_sentence(s))
