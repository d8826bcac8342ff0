"""The README's "Fifteen lines" example runs clean under ``python -W error`` and prints what
the README says it prints."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_fifteen_lines_run_clean_and_print_what_the_readme_says() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fifteen lines"):text.index("## Run the main job")]
    code, printed = re.findall(r"```(?:python)?\n(.*?)```", section, flags=re.S)[:2]
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == printed.strip()
