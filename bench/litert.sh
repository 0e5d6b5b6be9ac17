#!/usr/bin/env bash
# LiteRT-LM (Google's on-device LLM runtime) for bench/compare.py --litert, from PyPI only.
#
#   bash bench/litert.sh [HF_FOLDER]      # default ~/.cache/pocketlm/models/qwen05-shape/hf
#
# Builds, idempotently and resumably, under $LITERT_CACHE (default ~/.cache/pocketlm/litert):
#   venv-lm/       litert-lm 0.18.1 (the `litert-lm` CLI: run, benchmark, describe)
#   venv-export/   torch 2.13.0 (CPU), litert-torch 0.10.0, transformers 5.23.0 (the HF exporter)
#   shims/         see step 3
#   qwen05-shape-int4.litertlm   weights int4 (dynamic_wi4_afp32), prefill signature 256, KV cache 1024
#   qwen05-shape-int8.litertlm   weights int8 (dynamic_wi8_afp32), same signatures
# from the same Hugging Face folder that bench/make_qwen05_shape.py turned into the pocketlm
# bundles and the llama.cpp GGUFs, so that all three runtimes run the same weights.
#
# The HF folder is exported as it is: litert-torch reads its config.json, f16 safetensors,
# tokenizer.json and the ChatML template in tokenizer_config.json (bundled as the model's prompt
# template; `litert-lm benchmark` does not use it: it feeds p tokens, its prompt padded with zeros).
# The first `litert-lm benchmark` of a model writes its packed weights next to it
# (MODEL.litertlm_<mtime>_<size>.xnnpack_cache, about the model's size) and reuses them afterwards.
#
# Each export takes ~7 GB of RAM and several minutes on 2 cores. A step whose result exists is
# skipped; an interrupted one is redone from its start (results are renamed into place last).
# Nothing is fetched from a model hub (HF_HUB_OFFLINE=1).
set -euo pipefail

HF="$(realpath "${1:-$HOME/.cache/pocketlm/models/qwen05-shape/hf}")"
ROOT="${LITERT_CACHE:-$HOME/.cache/pocketlm/litert}"
NAME="${NAME:-qwen05-shape}"
PREFILL="${PREFILL:-256}"
KV="${KV:-1024}"
PYTHON="${PYTHON:-python3}"

LITERT_LM=0.18.1
LITERT_TORCH=0.10.0
TORCH=2.13.0
TRANSFORMERS=5.23.0

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$ROOT/tmp"
export TMPDIR="$ROOT/tmp"  # the exporter's intermediate .tflite files (~GBs) stay in the cache
step() { echo "[litert] $*" >&2; }
pip_install() {  # VENV PACKAGE...; without the warnings pip prints for every index that lacks a package
  local venv="$1" rc=0
  shift
  "$venv/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } || rc=$?
  return $rc
}
[ -f "$HF/config.json" ] && [ -f "$HF/model.safetensors" ] || { echo "no HF checkpoint in $HF (run bench/make_qwen05_shape.py)" >&2; exit 1; }

# 1) The runtime. A venv counts as done only once its marker exists (pip may have been interrupted).
if [ ! -f "$ROOT/venv-lm/.done" ]; then
  step "venv-lm: litert-lm $LITERT_LM ..."
  rm -rf "$ROOT/venv-lm"
  "$PYTHON" -m venv "$ROOT/venv-lm"
  pip_install "$ROOT/venv-lm" "litert-lm==$LITERT_LM" "litert-lm-api==$LITERT_LM" "litert-lm-builder==$LITERT_LM"
  touch "$ROOT/venv-lm/.done"
fi
step "venv-lm: $("$ROOT/venv-lm/bin/pip" show litert-lm | grep ^Version)"

# 2) The exporter. torch first and pinned, so that litert-torch's requirement is already met by the
# CPU wheel and pip does not pull a CUDA build. transformers is pinned because newer ones together
# with the `kernels` package break litert-torch's model imports (`apply_rotary_pos_emb is not
# decorated with @use_kernel_forward_from_hub`); for the same reason `kernels` is removed.
if [ ! -f "$ROOT/venv-export/.done" ]; then
  step "venv-export: torch $TORCH, litert-torch $LITERT_TORCH, transformers $TRANSFORMERS ..."
  rm -rf "$ROOT/venv-export"
  "$PYTHON" -m venv "$ROOT/venv-export"
  pip_install "$ROOT/venv-export" "torch==$TORCH"
  pip_install "$ROOT/venv-export" "torch==$TORCH" "litert-torch==$LITERT_TORCH" "transformers==$TRANSFORMERS"
  "$ROOT/venv-export/bin/pip" uninstall -y -q kernels 2>/dev/null || true
  touch "$ROOT/venv-export/.done"
fi

# 3) litert-torch 0.10.0 imports tensorflow.lite.python.schema_py_generated when it loads its model
# registry, but does not depend on TensorFlow. ai-edge-litert (one of its dependencies) ships the
# same flatbuffer schema module: a two-line package on PYTHONPATH re-exports it under that name.
SHIM="$ROOT/shims/tensorflow/lite/python"
mkdir -p "$SHIM"
: > "$SHIM/__init__.py"
echo "from ai_edge_litert.schema_py_generated import *  # noqa: F401,F403" > "$SHIM/schema_py_generated.py"

# 4) Export and quantize. export_hf writes <out>/model.litertlm (TFLite graphs with a prefill
# signature of $PREFILL tokens and a decode signature, the tokenizer and metadata in one file).
export_model() {  # quant-tag recipe
  local tag="$1" recipe="$2"
  local dst="$ROOT/$NAME-$tag.litertlm" out="$ROOT/export-$tag"
  if [ -f "$dst" ]; then
    step "$dst exists ($(du -h "$dst" | cut -f1))"
    return
  fi
  step "export $HF -> $dst ($recipe, prefill $PREFILL, KV $KV): several minutes, ~7 GB RAM ..."
  rm -rf "$out"
  local t0=$SECONDS
  PYTHONPATH="$ROOT/shims" "$ROOT/venv-export/bin/litert-torch" export_hf \
      --model="$HF" --output_dir="$out" --prefill_lengths="[$PREFILL]" --cache_length="$KV" \
      --quantization_recipe="$recipe" > "$out.log" 2>&1 \
    || { tail -30 "$out.log" >&2; echo "export failed: $out.log" >&2; exit 1; }
  [ -f "$out/model.litertlm" ] || { tail -30 "$out.log" >&2; echo "no model.litertlm in $out" >&2; exit 1; }
  mv "$out/model.litertlm" "$dst"  # same file system: atomic
  rm -rf "$out"
  step "$dst: $(du -h "$dst" | cut -f1) in $((SECONDS - t0)) s"
}
export_model int4 dynamic_wi4_afp32
export_model int8 dynamic_wi8_afp32
rm -rf "$ROOT/tmp"

for tag in int4 int8; do
  "$ROOT/venv-lm/bin/litert-lm" describe "$ROOT/$NAME-$tag.litertlm" > "$ROOT/$NAME-$tag.describe.txt" 2>&1 || true
done
step "done: $(ls "$ROOT"/*.litertlm | tr '\n' ' ')"
step "compare: python bench/compare.py MODEL.gguf --plm MODEL.plm --litert $ROOT/$NAME-int4.litertlm"
