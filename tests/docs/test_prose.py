"""Every Python code block of the documentation runs, and prints what the page says.

The pages are the README files and everything under ``docs/``. On each page, the fenced
```` ```python ```` blocks run in order, in one fresh namespace per page (a later block may use
what an earlier one defined), with the repository root as the working directory. A block
that says what it prints is followed by an ```` ```output ```` block (prose may stand
between them); what the code printed must match it, compared as doctest compares (``...``
matches anything, runs of whitespace are equal), so a page marks the digits that depend on
the CPU with ``...``. (The README's Fifteen lines show their output in a plain fence: it is
checked by ``tests/core/test_readme_fifteen_lines.py``, under ``python -W error``, with the
backward's rounding-level residual compared by magnitude.) Test functions a block defines (``test_*``) are called, as pytest
would. Other languages (bash, text) are not run.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PAGES = sorted(
    [ROOT / "README.md", *ROOT.glob("applications/**/README.md"), *ROOT.glob("benchmarks/README.md"),
     *ROOT.glob("examples/README.md"), *(ROOT / "docs").rglob("*.md")]
)
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
CHECKER = doctest.OutputChecker()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, code, line) of every fenced block, in order."""
    out = []
    for m in FENCE.finditer(text):
        info = m.group("info").strip().split()
        lang = info[0] if info else ""
        indent = m.group("indent")
        body = "".join(line[len(indent):] if line.startswith(indent) else line
                       for line in m.group("body").splitlines(keepends=True))
        out.append((lang, body, text.count("\n", 0, m.start()) + 1))
    return out


def runnable_pages() -> list[pathlib.Path]:
    return [p for p in PAGES if any(lang == "python" for lang, _, _ in blocks(p.read_text(encoding="utf-8")))]


def test_fence_parser_pairs_code_and_output() -> None:
    page = "Text\n\n```python\nprint(1 + 1)\n```\n\nprints\n\n```output\n2\n```\n\n```bash\nls\n```\n"
    assert [(lang, code) for lang, code, _ in blocks(page)] == [
        ("python", "print(1 + 1)\n"), ("output", "2\n"), ("bash", "ls\n")]


def test_every_page_with_code_is_collected() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in runnable_pages()}
    assert "README.md" in names and "docs/getting-started.md" in names


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_runs_and_prints_what_it_says(page: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    rel = page.relative_to(ROOT).as_posix()
    namespace: dict = {"__name__": f"docs_page_{re.sub(r'[^0-9a-zA-Z]', '_', rel)}"}
    last_printed: str | None = None
    last_line = 0
    for lang, code, line in blocks(page.read_text(encoding="utf-8")):
        if lang == "python":
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile("\n" * (line) + code, f"{rel}", "exec"), namespace)
                for name, fn in list(namespace.items()):
                    if name.startswith("test_") and callable(fn) and not getattr(fn, "_prose_ran", False):
                        fn()
                        with contextlib.suppress(AttributeError, TypeError):
                            fn._prose_ran = True
            last_printed, last_line = out.getvalue(), line
        elif lang == "output":
            assert last_printed is not None, f"{rel}:{line}: an output block with no Python block before it"
            if not CHECKER.check_output(code, last_printed, FLAGS):
                pytest.fail(f"{rel}:{last_line}: the block printed\n{last_printed}\nbut the page says (line {line})\n{code}")
            last_printed = None
