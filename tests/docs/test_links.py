"""Every relative link of the repository's Markdown (README files and ``docs/``) names a file
that exists, relative to the page -- so the pages work in a repository browser as well as
on the built site (where ``docs/_hooks/repo_files.py`` maps them; ``mkdocs build --strict``
checks that side)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = sorted({*ROOT.glob("*.md"), *ROOT.glob("applications/**/README.md"), *ROOT.glob("benchmarks/README.md"),
                *ROOT.glob("examples/README.md"), *(ROOT / "docs").rglob("*.md")})
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_name_existing_files(page: pathlib.Path) -> None:
    missing = [t for t in LINK.findall(page.read_text(encoding="utf-8"))
               if "://" not in t and not t.startswith("mailto:") and not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to files that do not exist: {missing}"
