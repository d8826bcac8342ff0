#!/usr/bin/env bash
# Release hygiene: `python -m build` makes an sdist and a wheel; each installs in a fresh
# venv (with its dependencies, torch pinned to the machine's local CPU wheel) and imports,
# reporting the version written in bilevel/_version.py. Run from the repository root with
# the project's venv active (it has `build`).
set -euo pipefail
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m build -q -o "$work/dist" . >/dev/null
expected="$(python -c 'import runpy; print(runpy.run_path("bilevel/_version.py")["__version__"])')"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q torch==2.13.0
for artefact in "$work"/dist/bilevel-"$expected".tar.gz "$work"/dist/bilevel-"$expected"-py3-none-any.whl; do
    "$work/venv/bin/python" -m pip install -q --force-reinstall --no-deps "$artefact"
    "$work/venv/bin/python" -m pip install -q "$artefact"      # its dependencies
    got="$(cd "$work" && "$work/venv/bin/python" -c '
import bilevel, bilevel.solvers, bilevel.linsolve, bilevel.testing, bilevel.distributed, bilevel.tree
assert "site-packages" in bilevel.__file__, bilevel.__file__
print(bilevel.__version__)')"
    [ "$got" = "$expected" ] || { echo "$(basename "$artefact"): imports as version $got, expected $expected" >&2; exit 1; }
    echo "package: $(basename "$artefact") installs in a fresh venv and imports (bilevel $got)"
done
