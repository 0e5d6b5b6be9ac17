#!/usr/bin/env bash
# Reproduces the tables of docs/performance.md: builds the peer and the models if needed, then runs
# bench/compare.py on SmolLM2-135M (one Q4_1 GGUF for both runtimes) and on the Qwen2.5-0.5B shape
# (pocketlm int4 vs llama.cpp Q4_0, pocketlm int8 vs Q8_0), then batched decoding on the Qwen shape
# (int4 vs Q4_0, B = 1..16: pocketlm bench --batch vs llama-batched-bench). About 50 minutes on
# 2 cores, plus ~15 minutes the first time for llama.cpp. Results go to $OUT (default /tmp/pocketlm-perf).
#   bench/run_performance.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-$HOME/.cache/pocketlm/venv}"
PY="$VENV/bin/python"
ROUNDS="${1:-5}"
OUT="${OUT:-/tmp/pocketlm-perf}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

bench/build_llamacpp.sh
"$PY" bench/make_qwen05_shape.py
M="$HOME/.cache/pocketlm/models/qwen05-shape"
SMOL="$("$PY" -c 'from pocketlm.hub import resolve_alias; print(resolve_alias("smollm2"))')"

run() {  # name, compare.py arguments...
  local name="$1"; shift
  "$PY" bench/compare.py "$@" -p 256 -n 128 -t 2 -r "$ROUNDS" --json "$OUT/$name.json" | tee "$OUT/$name.md"
}
run smollm2 "$SMOL"
run qwen05-q4 "$M/qwen05-shape-Q4_0.gguf" --plm "$M/qwen05-shape-int4.plm"
run qwen05-q8 "$M/qwen05-shape-Q8_0.gguf" --plm "$M/qwen05-shape-int8.plm"
run qwen05-q4-batched "$M/qwen05-shape-Q4_0.gguf" --plm "$M/qwen05-shape-int4.plm" --batch 1,2,4,8,16
echo "results in $OUT" >&2
