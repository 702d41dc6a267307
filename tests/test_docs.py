"""The README and the docs/ pages promise only what a clone holds: every relative link and image
points to a file in the repository, and every #anchor to a heading of its page."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "data/raw/README.md",
         *sorted((REPO / "docs").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def tokens(page: Path) -> list:
    flat = []
    for token in MarkdownIt().parse(page.read_text(encoding="utf-8")):
        flat += [token, *(token.children or [])]
    return flat


def anchors(page: Path) -> set[str]:
    found, heading = set(), False
    for token in tokens(page):
        if token.type == "heading_open":
            heading = True
        elif heading and token.type == "inline":
            found.add(slug(re.sub(r"[`*]", "", token.content)))
            heading = False
    return found


def links(page: Path) -> list[str]:
    return [t.attrGet("href") or t.attrGet("src") for t in tokens(page)
            if t.type in ("link_open", "image")]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for link in links(page):
        if re.match(r"[a-z]+:", link):  # http(s), mailto: not checked (no network)
            continue
        path, _, anchor = unquote(link).partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading '#{anchor}' in {target.name}")
    assert not broken, "\n".join(broken)
