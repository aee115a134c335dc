"""The documentation's links: every relative link in README.md and docs/*.md resolves, to a
file or folder of the checkout and, for a #anchor, to a heading of the target page; the
README links every page of docs/.

Anchors follow GitHub's heading slugs (github-slugger): the heading's text as rendered
(code spans, emphasis and links reduced to their text), lowercased, every character that is
not a letter, digit, underscore, hyphen or space removed, each space made a hyphen; a
repeated slug gets -1, -2... Only ATX headings (``# Title``) are read, which is all the
docs use. Nothing is imported but the standard library; these tests take milliseconds.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target) and ![alt](target): the target up to whitespace or ')', an optional title.
INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def outside_fences(text: str) -> str:
    """The text with every fenced code block's lines blanked; line numbers are kept."""
    lines, fenced = [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if fenced is None and fence:
            fenced = fence.group(1)
            lines.append("")
        elif fenced is not None:
            if fence and fence.group(1) == fenced:
                fenced = None
            lines.append("")
        else:
            lines.append(line)
    return "\n".join(lines)


def prose(text: str) -> str:
    """The text outside fenced code blocks, each code span's brackets and parentheses
    blanked: a `[x](y)` in code is no link."""
    return CODE_SPAN.sub(lambda m: re.sub(r"[\[\]()]", " ", m.group(0)), outside_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text. Outside code spans, links and images
    become their text, inline HTML tags and emphasis markers go; code keeps its characters."""
    parts = []
    for i, part in enumerate(CODE_SPAN.split(heading)):
        if i % 3 == 1:
            continue  # the backticks CODE_SPAN captured
        if i % 3 == 0:  # outside code
            part = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", part)
            part = re.sub(r"<[^>]+>", "", part)
            part = re.sub(r"(?<!\w)_+(?=\S)|(?<=\S)_+(?!\w)", "", part)  # _emphasis_, not snake_case
        parts.append(part)
    text = "".join(parts).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in outside_fences(page.read_text(encoding="utf-8")).splitlines():
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(page: Path) -> list[str]:
    text = prose(page.read_text(encoding="utf-8"))
    return [m.group(1) for m in INLINE_LINK.finditer(text)] + REFERENCE_DEFINITION.findall(text)


def broken(page: Path, target: str) -> str | None:
    """Why a link from page to target does not resolve, or None when it does."""
    if not target or SCHEME.match(target):
        return None  # http(s), mailto...: not checked here
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part.split("?", 1)[0])
    if path_part:
        base = ROOT if path_part.startswith("/") else page.parent
        resolved = (base / path_part.lstrip("/")).resolve()
        if ROOT not in (resolved, *resolved.parents):
            return f"{target}: outside the checkout"
        if not resolved.exists():
            return f"{target}: no such file or folder"
    else:
        resolved = page
    if anchor:
        if resolved.suffix != ".md" or resolved.is_dir():
            return f"{target}: an anchor into something that is not a markdown page"
        if unquote(anchor) not in anchors(resolved):
            return f"{target}: {resolved.relative_to(ROOT)} has no heading with the slug #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path):
    problems = [why for target in links(page) if (why := broken(page, target))]
    assert problems == [], f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(readme.parent / unquote(t.partition("#")[0])).resolve() for t in links(readme) if not SCHEME.match(t)}
    pages = set(DOCS.glob("*.md"))
    assert pages, "docs/ has no pages"
    assert sorted(p.name for p in pages if p.resolve() not in linked) == [], "docs pages the README does not link"


def test_the_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; the reference belongs in docs/"


@pytest.mark.parametrize(("heading", "expected"), [
    ("What the numbers mean", "what-the-numbers-mean"),
    ("Predict before you run: `estimate` and `fit`", "predict-before-you-run-estimate-and-fit"),
    ("Will an 8B model fit my 24 GiB card, and how?", "will-an-8b-model-fit-my-24-gib-card-and-how"),
    ("Look, don't read: plots, repeats, noise, comparisons, HTML", "look-dont-read-plots-repeats-noise-comparisons-html"),
    ("Modelled, not traced: `fsdp-offload` and `qlora`", "modelled-not-traced-fsdp-offload-and-qlora"),
    ("The seed's four, and adapters", "the-seeds-four-and-adapters"),
    ("**Bold** and [a link](x.md)", "bold-and-a-link"),
    ("`model.vocab_rows` — a  gap", "modelvocab_rows--a--gap"),
])
def test_slugs_follow_github(heading: str, expected: str):
    assert slug(heading) == expected


def links_in(text: str) -> list[str]:
    return [m.group(1) for m in INLINE_LINK.finditer(prose(text))]


def test_a_broken_link_or_anchor_is_caught():
    readme = ROOT / "README.md"
    assert broken(readme, "docs/no-such-page.md")
    assert broken(readme, "docs/numbers.md#no-such-heading")
    assert broken(readme, "#no-such-heading")
    assert broken(readme, "docs/numbers.md#what-the-numbers-mean") is None
    assert broken(readme, "https://example.org/anything") is None
    assert links_in("see [`estimate`](docs/a.md#b) and ![x](img.png \"t\")\n```\n[no](link.md)\n```") == [
        "docs/a.md#b", "img.png"]
