"""The documentation holds together: a short README, and no link to a missing file or heading."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_BYTES = 12 * 1024

# [text](target) outside code: inline Markdown links.  Code blocks and code
# spans are removed first, so a curl session's brackets are not taken as links.
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INDENTED = re.compile(r"^(?: {4}|\t).*$", re.M)
SPAN = re.compile(r"`[^`\n]*`")


def prose(text: str) -> str:
    """Return text without fenced blocks, indented blocks and code spans."""
    return SPAN.sub("", INDENTED.sub("", FENCE.sub("", text)))


def anchors(path: Path) -> set[str]:
    """Return the #fragments that GitHub makes of path's headings."""
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", path.read_text("utf-8")), re.M):
        text = heading.lower().replace("`", "")
        found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text(encoding="utf-8")))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def test_readme_is_a_landing_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/"


def test_the_docs_this_repository_promises_exist():
    names = {path.name for path in DOCS}
    for name in (
        "api.md",
        "configuration.md",
        "guarantees.md",
        "security.md",
        "data-tools.md",
        "deployment.md",
        "performance.md",
        "design.md",
        "development.md",
    ):
        assert name in names
        assert f"(docs/{name})" in README.read_text(encoding="utf-8"), f"README lacks {name}"


def test_every_relative_link_points_at_a_file_and_heading_that_exist():
    broken = []
    for page in [README, *DOCS]:
        for target in relative_links(page):
            file_part, _, fragment = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_link_check_sees_links(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\nSee [there](other.md#a-page), [web](https://example.com),"
        " `[not](code.md)`.\n\n    [indented](code.md)\n\n```\n[fenced](code.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["other.md#a-page"]
    assert anchors(page) == {"a-page"}
