"""Every relative link in the README and the docs resolves: the file exists and, for a link to a
heading, the heading is there (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "datasets").glob("*.md")),
    ROOT / "benchmarks" / "README.md",
    ROOT / "launchers" / "README.md",
]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings (lower case, punctuation dropped, spaces to -)."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
        found.add(slug)
    return found


def broken_links(page: Path) -> list[str]:
    out = []
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        name, _, anchor = target.partition("#")
        path = (page.parent / name).resolve() if name else page
        if not path.exists():
            out.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            out.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    return out


def test_every_link_resolves() -> None:
    assert [p for p in PAGES if not p.is_file()] == []
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_the_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading, with punctuation!\n")
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-punctuation) [web](https://x.org)\n"
        "[gone](missing.md) [no heading](there.md#nowhere)\n"
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert broken_links(page) == [
            "page.md: missing.md (no such file)",
            "page.md: there.md#nowhere (no such heading)",
        ]
    finally:
        ROOT = saved
