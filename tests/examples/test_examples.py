"""Every script in ``examples/`` runs cleanly, quickly, and prints its result.

Each script runs in a fresh ``python -W error`` subprocess from the repository root, as a
user would run it (``python examples/NAME.py``), with one thread. It must exit with status
0, write nothing to stderr (no warning, no traceback), and print a line matching its
entry in ``EXPECTED``: the result the script exists to show (a loss that went down, a
gradient check that passed, ...), not just that it ran. A new script is picked up by the
glob and fails until it has an entry here; every script is also kept short.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
MAX_LINES = 60
TIMEOUT_S = 120
# The same exception as pyproject.toml's filterwarnings: torch's forward-AD decompositions
# call the deprecated torch.jit.script on the first torch.func.jvp of a process.
WARNING_FILTERS = ["-W", "error", "-W", "ignore:`torch.jit.script` is deprecated:DeprecationWarning"]
NUM = r"(\d+(?:\.\d*)?(?:e[-+]?\d+)?)"

# name -> (regex over stdout, check of the captured numbers); the check says what "worked" means.
EXPECTED = {
    "imaml_sinusoid": (rf"query MSE after adaptation: {NUM} before meta-training, {NUM} after",
                       lambda before, after: after < 0.6 * before),
    "per_feature_regularisation": (
        rf"validation MSE: {NUM} before, {NUM} after; median λ: informative features {NUM}, "
        rf"irrelevant {NUM}",
        lambda before, after, informative, irrelevant: after < 0.5 * before and irrelevant > 10 * informative),
    "external_solver": (rf"vs finite differences through SciPy: OK \(max relative error {NUM}\)",
                        lambda err: err < 1e-4),
    "fixed_point_layer": (rf"fixed-point residual {NUM} after \d+ iterations; implicit vs unrolled gradient: "
                          rf"max relative difference {NUM}",
                          lambda residual, diff: residual < 1e-10 and diff < 1e-8),
    "learning_lambda": (rf"s = 0.1: λ 1.00 -> {NUM} after meta-training \(Bayes-optimal 2σ²/\(k s²\) = {NUM}\)\n"
                        rf".*s = 1.0: λ 1.00 -> {NUM} after meta-training \(Bayes-optimal 2σ²/\(k s²\) = {NUM}\)",
                        lambda l1, b1, l2, b2: abs(l1 / b1 - 1) < 0.3 and abs(l2 / b2 - 1) < 0.3),
    "check_your_layer": (rf"Ridge: passes \(0 of \d+ comparisons off, max relative error {NUM}\)\n"
                         rf"BuggyRidge: FAILS \((\d+) of (\d+) comparisons off",
                         lambda err, failed, total: err < 1e-6 and failed == total),
    "torch_func": (rf"torch.func.grad vs loss.backward\(\): max difference {NUM}; "
                   rf"torch.func.jvp vs <grad, t>: (-?{NUM[1:-1]}) vs (-?{NUM[1:-1]})",
                   lambda diff, jvp, ref: diff < 1e-10 and abs(jvp - ref) < 1e-9 * max(1.0, abs(ref))),
}


def test_every_script_has_an_expected_result() -> None:
    assert SCRIPTS, "no scripts found in examples/"
    assert sorted(EXPECTED) == sorted(p.stem for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_is_short_and_documented(script: pathlib.Path) -> None:
    text = script.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_LINES, f"{script.name}: {len(text.splitlines())} lines"
    assert text.startswith('"""'), f"{script.name}: no module docstring"
    assert not re.search(r"bilevel\._|from \.|^(?:import|from) applications", text, re.M), (
        f"{script.name}: uses private modules or the applications"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_script_runs_and_prints_its_result(script: pathlib.Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""}
    proc = subprocess.run([sys.executable, *WARNING_FILTERS, str(script.relative_to(ROOT))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    pattern, check = EXPECTED[script.stem]
    match = re.search(pattern, proc.stdout)
    assert match, f"{script.name} printed:\n{proc.stdout}\nexpected a match of:\n{pattern}"
    assert check(*map(float, match.groups())), f"{script.name}: result out of range:\n{proc.stdout}"
