"""The documentation's relative links: every file a Markdown page links to exists, and every ``#anchor`` names a
heading of the page it points to (as GitHub makes anchors from headings). A newcomer follows these links
from the README to the results and the commands that made them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: folders whose Markdown is not the project's (environments, installed data)
SKIP = {".venv", ".data", ".git", "node_modules"}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (word characters, hyphens and spaces
    kept), spaces as hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of ``page``; a repeated heading gets ``-1``, ``-2`` ... as on GitHub. Headings in
    fenced code blocks do not count."""
    out: set[str] = set()
    seen: dict[str, int] = {}
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6} (.*)", line)
        if match:
            slug = github_anchor(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def pages() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md") if not SKIP & set(p.relative_to(ROOT).parts))


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target} (no such heading)")
    return broken


def test_anchor_rule_matches_github():
    assert github_anchor("Tried: 2.5D input") == "tried-25d-input"
    assert github_anchor("`mismatch segment` end to end (what users run)") == "mismatch-segment-end-to-end-what-users-run"


def test_every_relative_link_of_the_documentation_resolves():
    found = pages()
    assert ROOT / "README.md" in found and len(found) > 5
    broken = {str(p.relative_to(ROOT)): b for p in found if (b := broken_links(p))}
    assert not broken, broken


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A heading\n\n[ok](#a-heading) [gone](#another) [file](missing.md)\n", encoding="utf-8")
    assert broken_links(page) == ["#another (no such heading)", "missing.md (no such file)"]
