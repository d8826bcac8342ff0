"""MkDocs hook: serve repository files that the pages show from where they live.

The benchmarks and applications write their pictures and tables under ``*/results/``; the
examples live in ``examples/``. Rather than copying them into ``docs/`` (two copies that
drift), this hook adds them to the site at their repository path. Pages link to them by
their path in the repository, relative to the page's source file
(``../benchmarks/results/fig2b.png`` from ``docs/performance.md``), so that the links also
work on a repository browser; before MkDocs resolves links, :func:`on_page_markdown`
rewrites each such link to the file's place in the site.
"""

from __future__ import annotations

import pathlib
import posixpath
import re
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = pathlib.Path(__file__).resolve().parents[2]
PATTERNS = (
    "benchmarks/results/**/*.png",
    "benchmarks/results/**/*.csv",
    "benchmarks/results/**/*.txt",
    "applications/*/results/**/*.png",
    "applications/*/results/**/*.csv",
    "applications/*/results/**/*.json",
    "applications/*/results/**/*.txt",
    "examples/*.py",
)


def on_files(files: Files, config: Any) -> Files:
    for pattern in PATTERNS:
        for path in sorted(ROOT.glob(pattern)):
            rel = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(rel) is None:
                files.append(
                    File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"],
                         use_directory_urls=config["use_directory_urls"])
                )
    return files


# A Markdown link or image target: ](target) or ](target#anchor).
_LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Point links to repository files outside ``docs/`` at their place in the site."""
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target:
            return m.group(0)
        repo = posixpath.normpath(posixpath.join("docs", page_dir, target))
        if repo.startswith(("docs/", "../")) or files.get_file_from_path(repo) is None:
            return m.group(0)
        return m.group(1) + posixpath.relpath(repo, page_dir or ".") + m.group(3)

    return _LINK.sub(rewrite, markdown)
