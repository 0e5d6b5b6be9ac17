"""pocketlm and llama.cpp (and LiteRT-LM) side by side on one model, on this machine.

    python bench/compare.py MODEL.gguf [-p 256 -n 128 -t 2 -r 5] [--plm MODEL.plm] [--litert MODEL.litertlm]
                            [--json FILE]

For each of r rounds it runs `pocketlm bench -r 1` and `llama-bench -r 1` (each with its own
warm-up), alternating which goes first, so that the machine's noise reaches both; the table shows
medians over the rounds, their spread, and the ratio pocketlm / llama.cpp. pocketlm runs the GGUF
itself (converted losslessly into the cache) unless --plm names a bundle of another quantization,
e.g. `--plm model-int4.plm` against a llama.cpp Q4_0 GGUF.

With --litert, Google's LiteRT-LM is a third runtime in each round (the order rotates, so each
runtime goes first equally often): `litert-lm benchmark MODEL.litertlm -p P -d N --backend cpu
--cpu-thread-count T --max-num-tokens 1024 --runs 1` (after its own warm-up run), and the table gets
LiteRT-LM columns and the ratio pocketlm / LiteRT-LM. LiteRT-LM and the .litertlm models, exported
from the same Hugging Face checkpoint as the bundles and GGUFs, come from bench/litert.sh
(LITERT_CACHE, default ~/.cache/pocketlm/litert). LiteRT-LM has no context depth (-d) and no batched
benchmark (--batch). Its decode roofline is not given: its bytes per token are not read from the file.

It also reports:
  peak RSS   /usr/bin/time -v around one comparable end-to-end run of each: `pocketlm run` and
             `llama-completion` on the same prompt of ~p tokens, n tokens, same threads; for
             LiteRT-LM (whose `run` cannot stop after n tokens) `litert-lm benchmark --runs 1
             --skip-warmup`: one engine, p prompt tokens, n decoded tokens, same threads
  roofline   memory read bandwidth measured now (a 2-thread streaming read of a 1 GiB buffer,
             compiled C), the bytes of weights each runtime reads per decoded token (every tensor
             but the embedding table, one embedding row, and the whole table again when the output
             head is tied to it) and tok/s = bandwidth / bytes; the fraction of it each reaches

With --batch 1,2,4,8 it compares batched decoding instead (and only that): each round runs
`pocketlm bench --batch` and `llama-batched-bench` (prompts not shared: B sequences of p random
tokens each are prefilled together, then decode n tokens together), alternating as above. The table
gives, per batch size B, the aggregate decode tok/s of all B sequences in each runtime (llama.cpp's
S_TG), their ratio, each runtime's scaling against its own B=1 (taken within each round, then the
median) and the tok/s each sequence sees; a second table gives the aggregate prefill tok/s and the
time until all B prompts are prefilled.

    python bench/compare.py MODEL.gguf --batch 1,2,4,8 [-p 256 -n 128 -t 2 -r 5] [--plm MODEL.plm] [--json FILE]

llama.cpp comes from bench/build_llamacpp.sh (LLAMACPP_CACHE, default ~/.cache/pocketlm/llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLAMACPP_CACHE", Path.home() / ".cache/pocketlm/llama.cpp")).expanduser()
TOOLS = Path.home() / ".cache/pocketlm/bench-tools"
LLAMA_BUILD = "build"  # build-avx2 with --isa avx2 (bench/build_llamacpp.sh, LLAMACPP_ISA=avx2)
LITERT_CACHE = Path(os.environ.get("LITERT_CACHE", Path.home() / ".cache/pocketlm/litert")).expanduser()
LITERT_KV = 1024  # the KV cache length bench/litert.sh exports with; LiteRT-LM's default is slower
QUIET = 0.10  # a run is "quiet" when other work used less than this share of the CPUs meanwhile

MEMBW_C = r"""
// Streaming read bandwidth: every thread sums its share of a buffer much larger than the caches.
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char** argv) {
  size_t bytes = (size_t)atol(argv[1]) << 20; int threads = atoi(argv[2]); int reps = atoi(argv[3]);
  size_t n = bytes / sizeof(uint64_t);
  uint64_t* a = aligned_alloc(64, n * sizeof(uint64_t));
  omp_set_num_threads(threads);
  #pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i++) a[i] = i;  // first touch by the thread that reads it later
  uint64_t sink = 0;
  for (int r = 0; r < reps; r++) {
    double t0 = now(); uint64_t s = 0;
    #pragma omp parallel for schedule(static) reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += a[i];
    double dt = now() - t0; sink += s;
    printf("%.3f\n", bytes / dt / 1e9);
  }
  fprintf(stderr, "%llu\n", (unsigned long long)sink);
  free(a);
  return 0;
}
"""


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread_pct(xs) -> float | None:
    """(max - min) / median in percent: how much the rounds disagreed."""
    xs = [x for x in xs if x is not None]
    return (max(xs) - min(xs)) / statistics.median(xs) * 100 if len(xs) > 1 else None


# ---- a shared machine -------------------------------------------------------------------------


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds (from /proc/stat): other people's work."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total
    i0, t0 = read()
    time.sleep(interval)
    i1, t1 = read()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def _cpu_seconds_total() -> float:
    """Busy CPU-seconds of the whole machine since boot (all CPUs, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class OthersMeter:
    """Share of the CPUs other people's work used while our child process ran: busy CPU time of the
    machine minus our children's CPU time, over wall time x CPUs."""

    def __enter__(self):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.t0, self.busy0, self.own0 = time.time(), _cpu_seconds_total(), ru.ru_utime + ru.ru_stime
        return self

    def __exit__(self, *exc):
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.time() - self.t0
        others = (_cpu_seconds_total() - self.busy0) - (ru.ru_utime + ru.ru_stime - self.own0)
        self.share = max(0.0, others / max(wall * (os.cpu_count() or 1), 1e-9))
        return False


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Waits (up to max_wait s) until the machine is at most `threshold` busy; returns the last
    measured busy fraction, which the report keeps next to each run."""
    deadline = time.time() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.time() < deadline:
        busy = cpu_busy()
    return busy


# ---- memory bandwidth -------------------------------------------------------------------------


def membw(threads: int, mib: int = 1024, reps: int = 7) -> dict:
    """GB/s of a streaming read (best and median of reps) from a small OpenMP C program."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    exe = TOOLS / "membw"
    if not exe.exists():
        src = TOOLS / "membw.c"
        src.write_text(MEMBW_C)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src)], check=True)
    r = subprocess.run([str(exe), str(mib), str(threads), str(reps)], capture_output=True, text=True, check=True)
    vals = [float(x) for x in r.stdout.split()][1:]  # the first pass also faults pages into the TLB
    return {"best_gb_s": max(vals), "median_gb_s": statistics.median(vals), "samples": vals,
            "buffer_mib": mib, "threads": threads}


# ---- bytes per decoded token ------------------------------------------------------------------


def gguf_decode_bytes(path: Path) -> tuple[int, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    total, types = 0, {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
        if t.name != "token_embd.weight":
            total += int(t.n_bytes)
            continue
        rows = int(t.shape[1]) if len(t.shape) > 1 else 1  # GGUF shapes list the row length first
        total += int(t.n_bytes) // rows
        if "output.weight" not in names:
            total += int(t.n_bytes)
    return total, types


def plm_decode_bytes(path: Path) -> tuple[int, dict]:
    from pocketlm.bench import decode_weight_bytes
    from pocketlm.bundle import read_bundle

    b = read_bundle(path)
    types: dict = {}
    for t in b.tensors:
        types[t.dtype.label] = types.get(t.dtype.label, 0) + t.nbytes
    return decode_weight_bytes(b), types


# ---- the two runtimes -------------------------------------------------------------------------


def build_command() -> str:
    return ("LLAMACPP_ISA=avx2 " if LLAMA_BUILD == "build-avx2" else "") + "bench/build_llamacpp.sh"


def env_with_pocketlm() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "python")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_pocketlm_bench(model: str, a) -> dict:
    cmd = [sys.executable, "-m", "pocketlm", "bench", model, "-p", str(a.p), "-n", str(a.n), "-t", str(a.t),
           "-r", "1", "--json", "-", "-q"] + (["-d", str(a.d)] if a.d else []) + \
        (["--activations", a.activations] if a.activations else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_with_pocketlm(), check=True)
    return json.loads(r.stdout)


def run_llama_bench(gguf: Path, a) -> dict:
    cmd = [str(CACHE / LLAMA_BUILD / "bin/llama-bench"), "-m", str(gguf), "-p", str(a.p), "-n", str(a.n), "-t", str(a.t),
           "-r", "1", "-o", "json"] + (["-d", str(a.d)] if a.d else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = {}
    for rec in json.loads(r.stdout):
        key = "pp_tok_s" if rec["n_prompt"] and not rec["n_gen"] else "tg_tok_s"
        out[key] = rec["avg_ts"]
        out.setdefault("info", {k: rec.get(k) for k in ("build_commit", "cpu_info", "type_k", "n_batch",
                                                           "n_ubatch", "flash_attn", "use_mmap", "model_type")})
    return out


def litert_bin() -> Path:
    return LITERT_CACHE / "venv-lm/bin/litert-lm"


def env_for_litert() -> dict:
    # The CLI keeps its config and model registry in LITERT_LM_DIR (default ~/.litert-lm): keep them
    # in the cache too. Nothing is fetched from a hub.
    return {**os.environ, "LITERT_LM_DIR": str(LITERT_CACHE / "cli"), "HF_HUB_OFFLINE": "1"}


def litert_cmd(model: Path, a, warmup: bool = True) -> list[str]:
    return [str(litert_bin()), "benchmark", str(model), "-p", str(a.p), "-d", str(a.n), "--backend", "cpu",
            "--cpu-thread-count", str(a.t), "--max-num-tokens", str(LITERT_KV), "--runs", "1"] + \
        ([] if warmup else ["--skip-warmup"])


def parse_litert(out: str) -> dict:
    """The "----- Results -----" lines of `litert-lm benchmark`. The CLI catches its own errors and
    exits 0 after printing a traceback, so missing lines are the failure signal."""
    keys = {"pp_tok_s": r"Prefill speed:\s*([\d.]+)", "tg_tok_s": r"Decode speed:\s*([\d.]+)",
            "init_s": r"Init time:\s*([\d.]+) s", "ttft_s": r"Time to first token:\s*([\d.]+) s"}
    found = {k: re.search(rx, out) for k, rx in keys.items()}
    if not found["pp_tok_s"] or not found["tg_tok_s"]:
        raise RuntimeError(f"litert-lm benchmark printed no results:\n{out[-2000:]}")
    return {k: float(m.group(1)) if m else None for k, m in found.items()}


def run_litert_bench(model: Path, a) -> dict:
    cmd = litert_cmd(model, a)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_for_litert(), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-2000:]}")
    return parse_litert(r.stdout + r.stderr)


def litert_version() -> str:
    r = subprocess.run([str(litert_bin()), "--version"], capture_output=True, text=True, env=env_for_litert(),
                       check=False)
    return (r.stdout.strip().split() or ["?"])[-1]


def _time_v(cmd: list[str], env=None, keep_stdout: bool = False) -> tuple[float, str]:
    """Peak RSS in MB of a command, from /usr/bin/time -v; also its standard error, after its
    standard output when keep_stdout (for a tool that prints its results there)."""
    # Otherwise the generated text goes nowhere (a random model's bytes need not even be valid UTF-8).
    r = subprocess.run(["/usr/bin/time", "-v"] + cmd, stdout=subprocess.PIPE if keep_stdout else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, encoding="utf-8", errors="replace", env=env, check=False)
    out = (r.stdout or "") + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return kb / 1024, out


def prompt_text(plm_or_gguf: str, n_tokens: int) -> str:
    """English-like text cut to about n_tokens of the model's own tokenizer."""
    from pocketlm.bundle import read_bundle
    from pocketlm.engine import resolve_model_path
    from pocketlm.tokenizer import Tokenizer

    meta = read_bundle(resolve_model_path(plm_or_gguf)).metadata
    tok = Tokenizer(meta["tokenizer"]["json"])
    words = ("the river ran past the old mill where the miller kept his books of accounts and a small "
             "garden of herbs that his daughter tended every morning before the market opened ").split()
    text, i = "", 0
    while len(tok.encode(text, add_special_tokens=False)) < n_tokens:
        text += ("" if not text else " ") + words[i % len(words)]
        i += 1
    return text


def rss_runs(gguf: Path, pocket_model: str, a, rounds: int = 2) -> dict:
    """Peak RSS of `pocketlm run` and of `llama-completion`, same prompt, n tokens, threads; with
    --litert also of one `litert-lm benchmark` without warm-up (p prompt tokens, n decoded)."""
    completion = CACHE / LLAMA_BUILD / "bin/llama-completion"
    text = prompt_text(pocket_model, a.p)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
        prompt = f.name
    ctx = str(a.p + a.n + 64)
    pocket_cmd = [sys.executable, "-m", "pocketlm", "run", pocket_model, "-f", prompt, "-n", str(a.n), "--temp", "0",
                  "-t", str(a.t), "-c", ctx, "--no-echo"] + (["--activations", a.activations] if a.activations else [])
    llama_cmd = [str(completion), "-m", str(gguf), "-f", prompt, "-n", str(a.n), "--temp", "0", "-t", str(a.t),
                 "-c", ctx, "-no-cnv", "--ignore-eos", "--no-display-prompt"]
    out: dict = {"pocketlm_mb": [], "llamacpp_mb": [], "llamacpp_load_s": [],
                 "pocketlm_cmd": " ".join(pocket_cmd), "llamacpp_cmd": " ".join(llama_cmd)}
    if a.litert:
        litert_rss_cmd = litert_cmd(a.litert, a, warmup=False)
        out.update(litert_mb=[], litert_init_s=[], litert_cmd=" ".join(litert_rss_cmd))
    try:
        for i in range(rounds):
            mb, _ = _time_v(pocket_cmd, env=env_with_pocketlm())
            out["pocketlm_mb"].append(mb)
            if completion.exists():
                mb, err = _time_v(llama_cmd)
                out["llamacpp_mb"].append(mb)
                m = re.search(r"load time\s*=\s*([\d.]+) ms", err)
                if m:
                    out["llamacpp_load_s"].append(float(m.group(1)) / 1000)
            if a.litert:
                mb, err = _time_v(litert_rss_cmd, env=env_for_litert(), keep_stdout=True)
                out["litert_mb"].append(mb)
                out["litert_init_s"].append(parse_litert(err)["init_s"])
    finally:
        os.unlink(prompt)
    return out


# ---- batched decoding -------------------------------------------------------------------------
# One run of either runtime becomes a list of rows, one per batch size B, with the keys of the
# `pocketlm bench --batch --json` contract: batch, tg_tok_s (aggregate over the B sequences),
# tg_tok_s_per_seq, pp_tok_s (aggregate prefill of the B prompts), ttft_s (until all B are prefilled).
BATCH_KEYS = ("tg_tok_s", "tg_tok_s_per_seq", "pp_tok_s", "ttft_s")


def run_pocketlm_batched(model: str, a) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pocketlm", "bench", model, "--batch", ",".join(map(str, a.batch)),
               "-p", str(a.p), "-n", str(a.n), "-t", str(a.t), "-r", "1", "--json", str(out), "-q", "--no-load"] + \
            (["--activations", a.activations] if a.activations else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env=env_with_pocketlm(), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
        res = json.loads(out.read_text())
    rows = [{"batch": int(x["batch"]), **{k: x.get(k) for k in BATCH_KEYS}} for x in res["batched"]]
    return _check_batches(rows, a.batch, "pocketlm bench")


def batched_ctx(batches: list[int], p: int, n: int) -> int:
    """llama-batched-bench's -c: every B x (p + n) must fit, or it silently skips that B. Without a
    unified KV cache each of the max(B) sequences gets ctx / max(B) cells, so max(B) x (p + n) is
    enough; 256 more, rounded up to 256, for llama.cpp's padding."""
    need = max(batches) * (p + n) + 256
    return (need + 255) // 256 * 256


def llama_batched_cmd(gguf: Path, a) -> list[str]:
    # The rest is llama.cpp's defaults: f16 KV, flash attention "auto" (on for the CPU backend), one
    # KV stream per sequence (no -kvu), prompts not shared (no -pps), a 16-token warm-up.
    return [str(CACHE / LLAMA_BUILD / "bin/llama-batched-bench"), "-m", str(gguf), "-c", str(batched_ctx(a.batch, a.p, a.n)),
            "-b", "2048", "-ub", "512", "-npp", str(a.p), "-ntg", str(a.n), "-npl", ",".join(map(str, a.batch)),
            "-t", str(a.t), "--output-format", "jsonl"]


def parse_llama_batched(stdout: str) -> tuple[list[dict], dict]:
    """llama-batched-bench --output-format jsonl: one JSON object per B on standard output, among
    blank lines (and logs, with -lv). S_TG = speed_tg = B x tg / t_tg; S_PP = speed_pp = B x pp / t_pp."""
    rows, info = [], {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        rows.append({"batch": int(rec["pl"]), "tg_tok_s": rec["speed_tg"], "tg_tok_s_per_seq": rec["speed_tg"] / rec["pl"],
                     "pp_tok_s": rec["speed_pp"], "ttft_s": rec["t_pp"]})
        info = {k: rec.get(k) for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn", "is_pp_shared",
                                         "n_threads", "n_threads_batch")}
    return rows, info


def run_llama_batched(gguf: Path, a) -> tuple[list[dict], dict]:
    cmd = llama_batched_cmd(gguf, a)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rows, info = parse_llama_batched(r.stdout)
    return _check_batches(rows, a.batch, "llama-batched-bench"), info


def _check_batches(rows: list[dict], batches: list[int], who: str) -> list[dict]:
    got = sorted(r["batch"] for r in rows)
    if got != sorted(batches):
        raise RuntimeError(f"{who} reported batch sizes {got}, asked for {sorted(batches)}")
    return rows


def batched_rows(pk_runs: list[list[dict]], lc_runs: list[list[dict]]) -> list[dict]:
    """The batched table's numbers from both runtimes' runs (each run: one row per B). Per B and
    runtime: median, spread and samples over the runs of aggregate and per-sequence decode tok/s,
    aggregate prefill tok/s and ttft_s; `scaling`: tg at B / tg at B=1 of the same run (None without
    B=1), so that a slow round does not mix with a fast one; `ratio`: pocketlm / llama.cpp medians."""
    def by_batch(runs):
        return [{r["batch"]: r for r in run} for run in runs]

    pk, lc = by_batch(pk_runs), by_batch(lc_runs)
    batches = sorted({b for run in pk + lc for b in run})
    out = []
    for b in batches:
        row: dict = {"batch": b}
        for who, runs in (("pocketlm", pk), ("llamacpp", lc)):
            side = {}
            for key in BATCH_KEYS:
                xs = [run[b].get(key) for run in runs if b in run]
                side[key] = {"median": median(xs), "spread_pct": spread_pct(xs), "samples": xs}
            xs = [run[b]["tg_tok_s"] / run[1]["tg_tok_s"] for run in runs
                  if b in run and 1 in run and run[b].get("tg_tok_s") and run[1].get("tg_tok_s")]
            side["scaling"] = {"median": median(xs), "spread_pct": spread_pct(xs), "samples": xs}
            row[who] = side
        p_, l_ = row["pocketlm"]["tg_tok_s"]["median"], row["llamacpp"]["tg_tok_s"]["median"]
        row["ratio"] = p_ / l_ if p_ is not None and l_ else None
        out.append(row)
    return out


def batched_table(rows: list[dict], p: int, n: int) -> str:
    """Markdown tables of batched_rows(): decode, then prefill."""
    def cell(m, spec=".1f", suffix=""):
        if m["median"] is None:
            return "n/a"
        sp = f" (±{m['spread_pct']:.0f}%)" if m["spread_pct"] is not None else ""
        return f"{m['median']:{spec}}{suffix}{sp}"

    lines = [(f"decode, tg{n} after pp{p} per sequence: aggregate tok/s of all B sequences (llama.cpp: S_TG), "
              "scaling = aggregate at B / at B=1, per sequence = aggregate / B; median (spread)"), "",
             ("| B | pocketlm tok/s | llama.cpp tok/s | pocketlm / llama.cpp | pocketlm scaling | llama.cpp scaling "
              "| pocketlm tok/s per seq | llama.cpp tok/s per seq |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pk, lc = r["pocketlm"], r["llamacpp"]
        lines.append(f"| {r['batch']} | {cell(pk['tg_tok_s'])} | {cell(lc['tg_tok_s'])} | "
                     f"{'n/a' if r['ratio'] is None else format(r['ratio'], '.2f') + 'x'} | "
                     f"{cell(pk['scaling'], '.2f', 'x')} | {cell(lc['scaling'], '.2f', 'x')} | "
                     f"{cell(pk['tg_tok_s_per_seq'])} | {cell(lc['tg_tok_s_per_seq'])} |")
    lines += ["", (f"prefill of B prompts of {p} tokens: aggregate tok/s (llama.cpp: S_PP) and seconds until all B "
                   "are prefilled (llama.cpp: T_PP); median (spread)"), "",
              "| B | pocketlm pp tok/s | llama.cpp pp tok/s | pocketlm / llama.cpp | pocketlm ttft s | llama.cpp T_PP s |",
              "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        pk, lc = r["pocketlm"], r["llamacpp"]
        lines.append(f"| {r['batch']} | {cell(pk['pp_tok_s'])} | {cell(lc['pp_tok_s'])} | "
                     f"{ratio(pk['pp_tok_s']['median'], lc['pp_tok_s']['median'])} | "
                     f"{cell(pk['ttft_s'], '.3f')} | {cell(lc['ttft_s'], '.3f')} |")
    return "\n".join(lines) + "\n"


def batched_report(res: dict) -> str:
    b = res["batched"]
    head = (f"pocketlm: {res['pocketlm_model']}\nllama.cpp: {res['gguf']} (llama-cpp-python {res['llamacpp_version']}, {res.get('llamacpp_build', 'build')}, "
            f"`{b['llamacpp_cmd']}`)\n{res['threads']} threads, {res['rounds']} alternating rounds, batch sizes "
            f"{','.join(map(str, res['batches']))}; spread = (max - min) / median over the rounds\n"
            f"load average: {res['loadavg_start']:.2f} at the start, {res['loadavg_end']:.2f} at the end; "
            f"CPUs busy with other work just before the runs: median {median(res['busy_before_runs']) * 100:.0f}%, "
            f"max {max(res['busy_before_runs']) * 100:.0f}%; during the runs (machine busy time minus ours): "
            f"pocketlm {_pcts(res['others_during_runs']['pocketlm'])}, "
            f"llama.cpp {_pcts(res['others_during_runs']['llamacpp'])}\n")
    text = head + "\nall runs\n\n" + batched_table(b["rows"], res["p"], res["n"])
    if b.get("quiet_rows"):
        text += (f"\nquiet runs only (other work < {QUIET * 100:.0f}% of the CPUs during the run: "
                 f"pocketlm {b['n_quiet']['pocketlm']}, llama.cpp {b['n_quiet']['llamacpp']} of {res['rounds']})\n\n"
                 + batched_table(b["quiet_rows"], res["p"], res["n"]))
    return text


def batched_result(pk_runs, lc_runs, others: dict) -> dict:
    """The "batched" key of --json: rows over all runs, and over the quiet runs when that is a
    different, non-empty subset on both sides."""
    quiet_pk = [r for r, o in zip(pk_runs, others["pocketlm"]) if o < QUIET]
    quiet_lc = [r for r, o in zip(lc_runs, others["llamacpp"]) if o < QUIET]
    out = {"rows": batched_rows(pk_runs, lc_runs), "quiet_rows": None,
           "n_quiet": {"pocketlm": len(quiet_pk), "llamacpp": len(quiet_lc)},
           "runs": {"pocketlm": pk_runs, "llamacpp": lc_runs}}
    if quiet_pk and quiet_lc and (len(quiet_pk), len(quiet_lc)) != (len(pk_runs), len(lc_runs)):
        out["quiet_rows"] = batched_rows(quiet_pk, quiet_lc)
    return out


def main_batched(a, gguf: Path, pocket_path: Path) -> int:
    if not (CACHE / LLAMA_BUILD / "bin/llama-batched-bench").exists():
        sys.exit(f"no llama-batched-bench in {CACHE}/{LLAMA_BUILD}/bin: run {build_command()} first")
    loadavg_start = os.getloadavg()[0]
    pk_runs, lc_runs, busy_before = [], [], []
    others: dict = {"pocketlm": [], "llamacpp": []}
    lc_info: dict = {}
    for i in range(a.r):
        order = ("pocketlm", "llamacpp") if i % 2 == 0 else ("llamacpp", "pocketlm")
        for who in order:
            busy = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else cpu_busy(0.2)
            t0 = time.time()
            with OthersMeter() as meter:
                if who == "pocketlm":
                    rows = run_pocketlm_batched(str(pocket_path), a)
                    pk_runs.append(rows)
                else:
                    rows, lc_info = run_llama_batched(gguf, a)
                    lc_runs.append(rows)
            busy_before.append(busy)
            others[who].append(meter.share)
            tg = ", ".join(f"B={r['batch']} {r['tg_tok_s']:.1f}" for r in sorted(rows, key=lambda r: r["batch"]))
            log(f"round {i + 1}/{a.r} {who}: aggregate tg tok/s {tg} ({time.time() - t0:.0f} s; other work: "
                f"{busy * 100:.0f}% of the CPUs before, {meter.share * 100:.0f}% during)")
    batched = batched_result(pk_runs, lc_runs, others)
    batched.update(llamacpp_cmd=" ".join(llama_batched_cmd(gguf, a)), llamacpp_info=lc_info)
    res = {"gguf": str(gguf), "pocketlm_model": str(pocket_path), "p": a.p, "n": a.n, "threads": a.t,
           "rounds": a.r, "batches": a.batch, "batched": batched,
           "llamacpp_version": (CACHE / "VERSION").read_text().strip() if (CACHE / "VERSION").exists() else "?",
           "llamacpp_build": LLAMA_BUILD,
           "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0], "busy_before_runs": busy_before,
           "others_during_runs": others, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    print(batched_report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


# ---- report -----------------------------------------------------------------------------------


def fmt(x, spec=".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _pcts(xs) -> str:
    return "/".join(f"{x * 100:.0f}" for x in xs) + "%"


def report(res: dict) -> str:
    pk, lc, lt = res["pocketlm"], res["llamacpp"], res.get("litert")
    at = f" @ d{res['d']}" if res["d"] else ""

    def row(label: str, pk_cell: str, lc_cell: str, lt_cell: str = "", vs_lc: str = "", vs_lt: str = "") -> str:
        """One table line; the LiteRT-LM cells exist only with --litert."""
        cells = [label, pk_cell, lc_cell] + ([lt_cell] if lt else []) + [vs_lc] + ([vs_lt] if lt else [])
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    def speed(m: dict, quiet: bool) -> str:
        if quiet:
            return f"{fmt(m['quiet_median'])} (±{fmt(m['quiet_spread_pct'], '.0f')}%, {m['n_quiet']})"
        return f"{fmt(m['median'])} (±{fmt(m['spread_pct'], '.0f')}%)"

    lines = [row("measurement", "pocketlm", "llama.cpp", "LiteRT-LM", "pocketlm / llama.cpp", "pocketlm / LiteRT-LM"),
             "|---|" + "---:|" * (5 if lt else 3)]
    for label, key in ((f"pp{res['p']}{at} tok/s", "pp_tok_s"), (f"tg{res['n']}{at} tok/s", "tg_tok_s")):
        p, l_, t = pk[key], lc[key], lt[key] if lt else None
        for quiet, what in ((True, "quiet runs: median (spread, runs)"), (False, "all runs: median (spread)")):
            if quiet and "quiet_median" not in p:
                continue
            stat = "quiet_median" if quiet else "median"
            lines.append(row(f"{label}, {what}", speed(p, quiet), speed(l_, quiet), speed(t, quiet) if t else "",
                             ratio(p[stat], l_[stat]), ratio(p[stat], t[stat]) if t else ""))
    rss = res.get("rss") or {}
    if rss:
        pk_mb, lc_mb, lt_mb = median(rss["pocketlm_mb"]), median(rss["llamacpp_mb"]), median(rss.get("litert_mb", []))
        lines.append(row("peak RSS MB (`pocketlm run` vs `llama-completion`" +
                         (" vs `litert-lm benchmark --skip-warmup`)" if lt else ")"),
                         fmt(pk_mb), fmt(lc_mb), fmt(lt_mb), ratio(pk_mb, lc_mb), ratio(pk_mb, lt_mb)))
    lt_init = median(rss.get("litert_init_s", [])) or (lt or {}).get("init_s")
    lines.append(row("load time s (pocketlm: Engine to Session, fresh process; llama.cpp: llama-completion's load time"
                     + ("; LiteRT-LM: litert-lm benchmark's engine init time)" if lt else ")"),
                     fmt(pk["load_s"], ".3f"), fmt(median(rss.get("llamacpp_load_s", [])), ".3f"), fmt(lt_init, ".3f")))
    if lt:
        lines.append(row("model file MB", fmt(pk.get("file_bytes", 0) / 1e6), fmt(lc.get("file_bytes", 0) / 1e6),
                         fmt(lt["model_bytes"] / 1e6)))
    lines.append(row("weights read per decoded token (MB)", fmt(pk["decode_bytes"] / 1e6), fmt(lc["decode_bytes"] / 1e6)))
    bw = res["bandwidth"]["best_gb_s"]
    lines.append(row(f"decode roofline tok/s ({bw:.1f} GB/s / bytes per token)", fmt(pk["roofline_tok_s"]),
                     fmt(lc["roofline_tok_s"])))
    lines.append(row("tg as a fraction of its roofline", f"{fmt(pk['roofline_fraction'] * 100, '.0f')}%",
                     f"{fmt(lc['roofline_fraction'] * 100, '.0f')}%"))
    lines.append(row("token loop overhead (generate vs raw decode)", f"{fmt(pk['loop_overhead_pct'], '.2f')}%", ""))
    lines.append(row(f"time to first token, pp{res['p']} (ms)", fmt(pk["ttft_s"] * 1000 if pk["ttft_s"] else None), "",
                     fmt(lt["ttft_s"] * 1000 if lt and lt["ttft_s"] else None),
                     "", ratio(pk["ttft_s"], lt["ttft_s"]) if lt else ""))
    during = res.get("others_during_runs")
    head = (f"pocketlm: {res['pocketlm_model']} ({pk['kernels']}, {pk.get('activations', '?')} activations)\nllama.cpp: {res['gguf']} "
            f"(llama-cpp-python {res['llamacpp_version']}, {res.get('llamacpp_build', 'build')})\n"
            + (f"LiteRT-LM: {lt['model']} (litert-lm {lt['version']}, `{lt['cmd']}`)\n" if lt else "")
            + f"{res['threads']} threads, {res['rounds']} alternating "
            f"rounds, medians; spread = (max - min) / median over the rounds; quiet runs: other work used "
            f"< {QUIET * 100:.0f}% of the CPUs during the run\n"
            f"memory read bandwidth: best {bw:.1f} GB/s, median {res['bandwidth']['median_gb_s']:.1f} GB/s "
            f"(2-thread streaming read of {res['bandwidth']['buffer_mib']} MiB)\n"
            f"load average: {res['loadavg_start']:.2f} at the start, {res['loadavg_end']:.2f} at the end; "
            f"CPUs busy with other work just before the runs: median {median(res['busy_before_runs']) * 100:.0f}%, "
            f"max {max(res['busy_before_runs']) * 100:.0f}%" + (
                f"; during the runs (machine busy time minus ours): "
                f"pocketlm {_pcts(during['pocketlm'])}, "
                f"llama.cpp {_pcts(during['llamacpp'])}" if during else "")
            + (f", LiteRT-LM {_pcts(during['litert'])}" if during and "litert" in during else "")
            + "\n")
    return head + "\n" + "\n".join(lines) + "\n"


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of batch sizes: {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be distinct integers >= 1: {text!r}")
    return sorted(sizes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pocketlm vs llama.cpp (and LiteRT-LM) on one model (alternating runs)")
    ap.add_argument("gguf", type=Path, help="the GGUF llama.cpp runs (and pocketlm too, unless --plm)")
    ap.add_argument("--plm", default=None, help="a pocketlm bundle to run instead of the GGUF (other quantization)")
    ap.add_argument("-p", type=int, default=256)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-d", type=int, default=0, help="context depth before pp/tg")
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=5, help="alternating rounds")
    ap.add_argument("--litert", type=Path, default=None, metavar="MODEL.litertlm",
                    help="add LiteRT-LM (from bench/litert.sh) as a third runtime running this model")
    ap.add_argument("--activations", default=None, metavar="SPEC",
                    help="pocketlm's activation precision (default: its own, auto; int8x2, int8 = llama.cpp's "
                         "kind, or per site: docs/quant.md)")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: both runtimes as on a CPU without AVX-512 or AVX-VNNI (pocketlm with "
                         "PLM_KERNELS=avx2, llama.cpp from LLAMACPP_ISA=avx2 bench/build_llamacpp.sh)")
    ap.add_argument("--no-rss", action="store_true", help="skip the /usr/bin/time -v runs")
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="S",
                    help="before each run, wait up to S seconds for the CPUs to be < 15%% busy with other "
                         "work (a shared machine); 0 = do not wait")
    ap.add_argument("--batch", type=_batch_sizes, default=None, metavar="1,2,4,8",
                    help="compare batched decoding (pocketlm bench --batch vs llama-batched-bench) at these "
                         "batch sizes instead of the single-sequence table")
    ap.add_argument("--json", default=None, help="write every number to this file")
    ap.add_argument("--from-json", action="store_true", help="print the table of a saved --json file (the "
                                                             "positional argument) and exit")
    a = ap.parse_args(argv)
    if a.from_json:
        res = json.loads(Path(a.gguf).read_text())
        if "pocketlm" not in res and "batched" in res:
            print(batched_report(res))
            return 0
        for who in ("pocketlm", "llamacpp", "litert"):  # recompute the quiet medians from the per-run samples
            if who not in res:  # no --litert
                continue
            during = res.get("others_during_runs", {}).get(who)
            for key in ("pp_tok_s", "tg_tok_s"):
                if during:
                    side = res[who][key]
                    quiet = [x for x, o in zip(side["samples"], during) if o < QUIET]
                    side.update(quiet_median=median(quiet), quiet_spread_pct=spread_pct(quiet), n_quiet=len(quiet))
        print(report(res))
        return 0
    sys.path.insert(0, str(REPO / "python"))

    gguf = a.gguf.expanduser().resolve()
    if a.isa == "avx2":
        # An AVX2-only CPU on an AVX-512 one: pocketlm's AVX2 kernels (PLM_KERNELS) against llama.cpp
        # compiled for AVX2 alone. Same cores and memory, so it shows the kernels, not the machine.
        global LLAMA_BUILD
        LLAMA_BUILD = "build-avx2"
        os.environ["PLM_KERNELS"] = "avx2"
        if a.litert:
            sys.exit("--isa avx2 with --litert: LiteRT-LM picks its own kernels from CPUID")
    if not (CACHE / LLAMA_BUILD / "bin/llama-bench").exists():
        sys.exit(f"no llama-bench in {CACHE}/{LLAMA_BUILD}/bin: run {build_command()} first")
    if not a.no_rss and not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time is missing: apt-get install time (or pass --no-rss)")
    if a.litert:
        a.litert = a.litert.expanduser().resolve()
        if a.batch or a.d:
            sys.exit("--litert compares single sequences at depth 0: not with --batch or -d")
        if not litert_bin().exists():
            sys.exit(f"no {litert_bin()}: run bench/litert.sh first")
        if not a.litert.is_file():
            sys.exit(f"no such model: {a.litert} (bench/litert.sh exports them)")
        if a.p + a.n > LITERT_KV:
            sys.exit(f"-p + -n must fit LiteRT-LM's KV cache of {LITERT_KV} tokens")
    pocket_model = str(Path(a.plm).expanduser().resolve()) if a.plm else str(gguf)
    from pocketlm.engine import resolve_model_path

    pocket_path = resolve_model_path(pocket_model)  # convert a GGUF once, before any timing
    if a.batch:
        if a.d:
            sys.exit("--batch with -d: llama-batched-bench has no depth")
        return main_batched(a, gguf, pocket_path)
    loadavg_start = os.getloadavg()[0]

    log("memory bandwidth ...")
    if a.wait_quiet > 0:
        wait_quiet(a.wait_quiet)
    bandwidth = membw(a.t)
    runtimes = ["pocketlm", "llamacpp"] + (["litert"] if a.litert else [])
    by_runtime: dict = {who: [] for who in runtimes}
    pk_runs, lc_runs, lt_runs = by_runtime["pocketlm"], by_runtime["llamacpp"], by_runtime.get("litert", [])
    for i in range(a.r):
        order = runtimes[i % len(runtimes):] + runtimes[:i % len(runtimes)]  # each goes first in turn
        for who in order:
            busy = wait_quiet(a.wait_quiet) if a.wait_quiet > 0 else cpu_busy(0.2)
            t0 = time.time()
            with OthersMeter() as others:
                if who == "pocketlm":
                    r = run_pocketlm_bench(str(pocket_path), a)
                elif who == "llamacpp":
                    r = run_llama_bench(gguf, a)
                else:
                    r = run_litert_bench(a.litert, a)
                by_runtime[who].append(r)
            r["busy_before"] = busy
            r["others_during"] = others.share
            log(f"round {i + 1}/{a.r} {who}: pp {r['pp_tok_s']:.1f} tok/s, tg {r.get('tg_tok_s', 0):.1f} tok/s "
                f"({time.time() - t0:.0f} s; other work: {busy * 100:.0f}% of the CPUs before, "
                f"{others.share * 100:.0f}% during)")
    rss = None
    if not a.no_rss:
        try:
            rss = rss_runs(gguf, str(pocket_path), a)
        except (RuntimeError, OSError, AttributeError) as e:  # keep the speed results regardless
            log(f"peak RSS runs failed: {e}")
    if a.wait_quiet > 0:
        wait_quiet(a.wait_quiet)
    bandwidth_after = membw(a.t)  # once more: the machine's load may have changed meanwhile

    pk_bytes, pk_types = plm_decode_bytes(pocket_path)
    lc_bytes, lc_types = gguf_decode_bytes(gguf)
    bw = max(bandwidth["best_gb_s"], bandwidth_after["best_gb_s"]) * 1e9
    bandwidth = {**bandwidth, "best_gb_s": bw / 1e9,
                 "median_gb_s": statistics.median(bandwidth["samples"] + bandwidth_after["samples"]),
                 "samples": bandwidth["samples"] + bandwidth_after["samples"]}

    def side(runs, key):
        xs = [r.get(key) for r in runs]
        quiet = [r.get(key) for r in runs if r["others_during"] < QUIET]
        return {"median": median(xs), "spread_pct": spread_pct(xs), "samples": xs,
                "quiet_median": median(quiet), "quiet_spread_pct": spread_pct(quiet), "n_quiet": len(quiet)}

    pk = {"pp_tok_s": side(pk_runs, "pp_tok_s"), "tg_tok_s": side(pk_runs, "tg_tok_s"),
          "load_s": median([r["load_s"] for r in pk_runs]), "ttft_s": median([r["ttft_s"] for r in pk_runs]),
          "loop_overhead_pct": median([r["loop_overhead_pct"] for r in pk_runs]),
          "bench_peak_rss_mb": median([r["peak_rss_mb"] for r in pk_runs]),
          "kernels": pk_runs[0]["kernels"], "activations": pk_runs[0].get("activations"), "decode_bytes": pk_bytes, "bytes_by_type": pk_types}
    lc = {"pp_tok_s": side(lc_runs, "pp_tok_s"), "tg_tok_s": side(lc_runs, "tg_tok_s"),
          "decode_bytes": lc_bytes, "bytes_by_type": lc_types, "info": lc_runs[0].get("info")}
    for s in (pk, lc):
        s["roofline_tok_s"] = bw / s["decode_bytes"]
        s["roofline_fraction"] = (s["tg_tok_s"]["median"] or 0) / s["roofline_tok_s"]
    lt = None
    if a.litert:
        lt = {"pp_tok_s": side(lt_runs, "pp_tok_s"), "tg_tok_s": side(lt_runs, "tg_tok_s"),
              "init_s": median([r["init_s"] for r in lt_runs]), "ttft_s": median([r["ttft_s"] for r in lt_runs]),
              "model": str(a.litert), "model_bytes": a.litert.stat().st_size, "version": litert_version(),
              "cmd": " ".join(litert_cmd(a.litert, a)), "runs": lt_runs}
    res = {"gguf": str(gguf), "pocketlm_model": str(pocket_path), "p": a.p, "n": a.n, "d": a.d, "threads": a.t,
           "rounds": a.r, "bandwidth": bandwidth, "pocketlm": pk, "llamacpp": lc, "rss": rss,
           "llamacpp_version": (CACHE / "VERSION").read_text().strip() if (CACHE / "VERSION").exists() else "?",
           "llamacpp_build": LLAMA_BUILD,
           "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0],
           "busy_before_runs": [r["busy_before"] for r in pk_runs + lc_runs + lt_runs],
           "others_during_runs": {who: [r["others_during"] for r in by_runtime[who]] for who in runtimes},
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if lt:
        res["litert"] = lt
        pk["file_bytes"], lc["file_bytes"] = pocket_path.stat().st_size, gguf.stat().st_size
    print(report(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
