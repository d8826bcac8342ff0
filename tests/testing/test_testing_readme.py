"""The documentation's section "Testing your own implicit layer" (docs/testing.md) runs as written.

Every ```python block of that section of docs/testing.md is executed as-is, in a fresh
namespace; the test functions it defines (``test_*``) are then called, as pytest would.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[2] / "docs" / "testing.md"
HEADING = "## Testing your own implicit layer"


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(HEADING)
    nxt = text.find("\n## ", start + len(HEADING))
    return text[start:] if nxt < 0 else text[start : nxt + 1]

pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")



def _blocks(lang: str) -> list[str]:
    text = _section()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def test_section_has_the_documented_parts() -> None:
    text = _section()
    assert text.startswith("## Testing your own implicit layer")
    assert "BILEVEL_HYPOTHESIS_PROFILE=thorough python -m pytest tests/testing" in text
    assert "re-solve its inner problem tightly" in text
    assert len(_blocks("python")) == 2


@pytest.mark.parametrize("index", [0, 1])
def test_python_examples_run_as_is(index: int) -> None:
    code = _blocks("python")[index]
    namespace: dict = {"__name__": f"readme_example_{index}"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"docs/testing.md:{HEADING}:block{index}", "exec"), namespace)
        tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
        for t in tests:
            t()
    if index == 0:
        printed = out.getvalue()
        assert "check_implicit_grad: OK (3 checks)" in printed
        assert "check_implicit_grad: FAILED" in printed
        # The page shows the printed tables; they must match what runs (up to the last
        # digits of the errors, which depend on the platform's rounding).
        shown = _blocks("text")[0].splitlines()
        actual = printed.splitlines()
        assert len(shown) == len(actual)
        for s, a in zip(shown, actual):
            if s.startswith("inputs["):
                s_f, a_f = s.split(), a.split()
                assert s_f[:4] == a_f[:4] and s_f[-1] == a_f[-1]  # input, dir, kind, result
                for x, y in zip(s_f[4:6], a_f[4:6]):  # analytic and reference values
                    assert float(x) == pytest.approx(float(y), rel=1e-6)
            elif s.startswith("check_implicit_grad") or s.startswith("tol ="):
                assert s.split(";")[0] == a.split(";")[0]
            else:
                assert s == a
    else:
        assert tests, "the second example defines a hypothesis test"
