"""MkDocs hook: serve repository files that the pages show from where they live.

The benchmarks and applications write their pictures and tables under ``*/results/``; the
examples live in ``examples/``. Rather than copying them into ``docs/`` (two copies that
drift), this hook adds them to the site at their repository path, so a page links to them
as if ``docs/`` were the repository root: ``benchmarks/results/fig2b.png`` from a page at
the top of ``docs/``, ``../benchmarks/results/fig2b.png`` from ``docs/api/``.
"""

from __future__ import annotations

import pathlib
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
