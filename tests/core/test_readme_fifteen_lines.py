"""The README's "Fifteen lines" example runs clean under ``python -W error`` and prints what
the README says it prints."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: A converged backward's residual norm is rounding: its digits differ between CPUs (4.79e-11
#: on the Intel Xeon that wrote the README, 7.07e-12 on an AMD EPYC), so it is compared by
#: magnitude, not digit by digit.
ROUNDING = re.compile(r"(residual norm )(\d\.\d\de-(\d+))")


def _rounding_masked(text: str) -> str:
    def mask(m: re.Match) -> str:
        assert float(m.group(2)) < 1e-9, f"the residual norm {m.group(2)} is not at rounding level"
        return m.group(1) + "<1e-9"

    return ROUNDING.sub(mask, text.strip())


def test_fifteen_lines_run_clean_and_print_what_the_readme_says() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fifteen lines"):text.index("## Run the main job")]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert _rounding_masked(proc.stdout) == _rounding_masked(printed)
