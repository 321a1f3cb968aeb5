"""The README fits a page and every link of the README and docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_the_readme_fits_a_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:") or target.startswith("../outputs/"):
                continue  # outputs/ exists after `bash run_all.sh`, not in a clone
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_every_docs_page_is_reachable_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / t).resolve() for t in LINK.findall(readme)}
    member_pages = ROOT / "docs" / "members"
    unlinked = [
        str(p.relative_to(ROOT))
        for p in sorted((ROOT / "docs").rglob("*.md"))
        if p.resolve() not in linked and not (p.parent == member_pages and member_pages.resolve() in linked)
    ]
    assert not unlinked, unlinked
