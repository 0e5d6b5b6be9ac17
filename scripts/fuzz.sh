#!/usr/bin/env bash
# Runs one fuzz target for SECONDS: scripts/fuzz.sh TARGET SECONDS [libFuzzer options]
#   bundle  .plm files through read_bundle, describe, Engine and one token (atheris; re-signing mutator)
#   gguf    .gguf files through convert, then the bundle it wrote (atheris)
#   chat    chat templates and messages through render_chat (atheris)
#   signature  detached signatures of a fixed file through pocketlm.signing.verify (atheris; re-signing mutator)
#   session  session files of the seed model through Engine.load_session and one token (atheris; re-checksumming mutator)
#   server  JSON requests to the server's POST routes through the ASGI app (atheris; JSON mutator; a 500 is a finding)
#   manifest  a model in an OCI layout folder through pocketlm.store.pull and the store entry (atheris; re-digesting mutator)
#   reader  the C++ bundle reader alone, libFuzzer with AddressSanitizer and UBSan (needs clang++)
# Seeds: fuzz/corpus/chat, and for bundle, gguf and reader a tiny random llama and the recipes of
# fuzz/corpus/{bundle,gguf} that fuzz/make_seeds.py writes into ~/.cache/pocketlm/fuzz/seeds (model
# files stay out of git). New inputs and crashes go to ~/.cache/pocketlm/fuzz/TARGET/ (POCKETLM_FUZZ_DIR),
# never into the tree; once a crash is fixed, add it to fuzz/corpus/TARGET (a recipe for bundle and
# gguf) and tests/fuzz/test_corpus_replay.py replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then sed -n '2,15p' "$0" >&2; exit 2; fi
target=$1 seconds=$2
shift 2
VENV="${POCKETLM_VENV:-.venv}"
fuzz_root="${POCKETLM_FUZZ_DIR:-$HOME/.cache/pocketlm/fuzz}"
case "$target" in
  bundle|gguf|reader|session|server)
    PYTHONPATH=python "$VENV/bin/python" fuzz/make_seeds.py "$fuzz_root/seeds" >/dev/null
    export POCKETLM_FUZZ_SEEDS="$fuzz_root/seeds"
    seeds="$fuzz_root/seeds/$([ "$target" = reader ] && echo bundle || echo "$target")"
    [ "$target" = server ] && seeds=fuzz/corpus/server ;;
  *) seeds="fuzz/corpus/$target" ;;
esac
work="$fuzz_root/$target"
mkdir -p "$work/corpus" "$work/crashes"
common=(-max_total_time="$seconds" -artifact_prefix="$work/crashes/" -print_final_stats=1 -rss_limit_mb=3072)

case "$target" in
  bundle|gguf|chat|signature|manifest|session|server)
    "$VENV/bin/python" -c "import atheris" 2>/dev/null || "$VENV/bin/python" -m pip install -q atheris
    case "$target" in chat|signature|manifest|server) max_len=16384 ;; *) max_len=400000 ;; esac
    PYTHONPATH=python exec "$VENV/bin/python" fuzz/run.py "$target" "${common[@]}" -timeout=30 -max_len="$max_len" \
      "$@" "$work/corpus" "$seeds"
    ;;
  reader)
    CXX="${CXX:-$(command -v clang++ || command -v clang++-14 || echo clang++)}"  # Debian: clang-14, libclang-rt-14-dev
    bin="$work/bundle_reader_fuzzer"
    sources=(fuzz/bundle_reader_fuzzer.cpp csrc/format/bundle_reader.cpp csrc/format/sha256.cpp)
    if [ ! -x "$bin" ] || [ -n "$(find "${sources[@]}" csrc/format/*.h csrc/common.h -newer "$bin")" ]; then
      echo "building $bin" >&2
      "$CXX" -std=c++17 -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined \
        -fno-sanitize-recover=undefined -Icsrc "${sources[@]}" -o "$bin"
    fi
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 exec "$bin" "${common[@]}" -timeout=10 -max_len=400000 \
      "$@" "$work/corpus" "$seeds"
    ;;
  *) echo "unknown target $target (bundle, gguf, chat, reader)" >&2; exit 2 ;;
esac
