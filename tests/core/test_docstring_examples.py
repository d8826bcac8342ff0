"""Every public name has a docstring with an example, and the examples run and print what
they say (doctest).

The public names are the ``__all__`` of the modules the API reference documents
(``docs/api/``): ``bilevel``, ``bilevel.solvers``, ``bilevel.linsolve``,
``bilevel.testing``, ``bilevel.distributed`` and ``bilevel.tree``, plus those modules'
own docstrings.  Constants and type aliases carry their docstring as a string literal
after the assignment (what mkdocstrings renders); it is read from the source, since it
does not exist at runtime.  A few public methods whose examples matter are checked too.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import re
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import bilevel

MODULES = (
    "bilevel",
    "bilevel.solvers",
    "bilevel.linsolve",
    "bilevel.testing",
    "bilevel.distributed",
    "bilevel.tree",
)

# Public methods with examples of their own (not in any ``__all__``).
METHODS = {
    "bilevel.Proximal.strategy_state": bilevel.Proximal.strategy_state,
}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
EXAMPLES_SECTION = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)
PACKAGE = Path(bilevel.__file__).parent


def _attribute_docstrings() -> dict[str, tuple[str, str, int]]:
    """``name -> (docstring, file, line)`` of every module-level assignment in the package
    followed by a string literal (the attribute docstrings griffe reads)."""
    found: dict[str, list[tuple[str, str, int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        for stmt, nxt in zip(body, body[1:]):
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
                target = stmt.targets[0]
            elif isinstance(stmt, ast.AnnAssign):
                target = stmt.target
            else:
                continue
            if (
                isinstance(target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                found.setdefault(target.id, []).append((nxt.value.value, str(path), nxt.lineno))
    return {k: v[0] for k, v in found.items() if len(v) == 1}


ATTRIBUTE_DOCS = _attribute_docstrings()


def _public() -> dict[str, tuple[str, str | None, int | None]]:
    """``qualified name -> (docstring, file, line)`` of every public name and module."""
    out: dict[str, tuple[str, str | None, int | None]] = {}
    for modname in MODULES:
        mod = importlib.import_module(modname)
        out[modname] = (mod.__doc__ or "", mod.__file__, 0)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, (types.ModuleType, type, types.FunctionType)):
                try:
                    file: str | None = inspect.getsourcefile(obj)
                    line: int | None = inspect.getsourcelines(obj)[1] if not inspect.ismodule(obj) else 0
                except (OSError, TypeError):
                    file, line = None, None
                out[f"{modname}.{name}"] = (obj.__doc__ or "", file, line)
            else:  # a constant or a type alias: its docstring is in the source only
                doc, file, line = ATTRIBUTE_DOCS.get(name, ("", None, None))
                out[f"{modname}.{name}"] = (doc, file, line)
    for qualname, meth in METHODS.items():
        out[qualname] = (meth.__doc__ or "", inspect.getsourcefile(meth), inspect.getsourcelines(meth)[1])
    return out


PUBLIC = _public()


def test_the_public_api_is_enumerated() -> None:
    # Guards the enumeration itself: every module's __all__ is there, nothing is empty.
    for modname in MODULES:
        mod = importlib.import_module(modname)
        assert mod.__all__, modname
        for name in mod.__all__:
            assert f"{modname}.{name}" in PUBLIC
    assert "bilevel.hessian_extremes" in PUBLIC and "bilevel.tree.tree_norm" in PUBLIC
    assert "bilevel.OnFailure" in PUBLIC and "bilevel.solvers.SCIPY_METHODS" in PUBLIC


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_name_has_a_docstring_with_an_example(name: str) -> None:
    doc, _, _ = PUBLIC[name]
    assert doc.strip(), f"{name} has no docstring"
    assert EXAMPLES_SECTION.search(doc), f"{name}'s docstring has no 'Example:' / 'Examples:' section"
    assert ">>>" in doc, f"{name}'s example is not in doctest (>>>) form"


def _run(name: str, doc: str, file: str | None, line: int | None) -> doctest.DocTestRunner:
    test = doctest.DocTestParser().get_doctest(inspect.cleandoc(doc), {}, name, file, line)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    # The examples may draw random numbers; the test suite's generator state is kept.
    with torch.random.fork_rng(devices=[]):
        runner.run(test)
    return runner


@pytest.mark.parametrize("name", list(PUBLIC))
def test_docstring_example_runs_and_prints_what_it_says(name: str) -> None:
    doc, file, line = PUBLIC[name]
    runner = _run(name, doc, file, line)
    assert runner.tries > 0, f"{name} has no example to run"
    assert runner.failures == 0, f"{name}: {runner.failures} failing example(s) (see the output above)"


API_PAGES = Path(__file__).resolve().parents[2] / "docs" / "api"
DIRECTIVE = re.compile(r"^::: (\S+)\s*$", re.MULTILINE)


@pytest.mark.skipif(not API_PAGES.is_dir(), reason="no docs/api in this checkout")
def test_the_api_reference_renders_every_public_name_once() -> None:
    # docs/api/*.md: one mkdocstrings directive (``::: bilevel.Proximal``) per public name,
    # written where users import it; the subpackages named in bilevel.__all__ are pages.
    rendered = [m for page in sorted(API_PAGES.glob("*.md")) for m in DIRECTIVE.findall(page.read_text())]
    twice = sorted({r for r in rendered if rendered.count(r) > 1})
    assert not twice, f"rendered more than once: {twice}"
    public = {n for n in PUBLIC if n not in METHODS}
    missing = sorted(n for n in public if n not in rendered)
    assert not missing, f"public names missing from docs/api: {missing}"


def test_a_failing_example_is_reported() -> None:
    # The check itself: a docstring whose output differs fails.
    bad: Any = ">>> 1 + 1\n3\n"
    assert _run("bad", bad, None, None).failures == 1
