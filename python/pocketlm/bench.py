"""`pocketlm bench`: how fast a model runs here, in the spirit of llama-bench.

What one repetition measures, on one Engine in this process (after one untimed warm-up):

  pp   prefill of p random token ids (fixed seed) on top of d tokens of context -> p / seconds
  tg   n decode steps of fixed random token ids at depth d (no sampling)         -> n / seconds
  ttft session.generate() on the d + p tokens until its first token (prefill + first sample)
  loop the same generate() continued for n tokens with the model's sampling defaults: its time
       per token against the raw decode steps (Session.decode) at the very same positions and
       tokens; loop_overhead_pct = (generate - raw) / raw * 100 = sampling + detokenizing + the
       generator's bookkeeping

and in a fresh subprocess per repetition (after one untimed probe that warms the page cache):

  load the time from Engine(...) to a ready Session (imports excluded; a .gguf is converted into
       the cache once, before any timing, so this is the load of the cached .plm)
  rss  that process's peak RSS (VmHWM; ru_maxrss elsewhere) after loading, prefilling d + p and decoding
       min(n, PROBE_DECODE_STEPS) tokens: what one such run costs in memory, Python included

With --batch B1,B2,... (in the spirit of llama-batched-bench) it measures instead, for each batch
size B, B sequences on one Engine run together in batched executor steps (`_core.run_batch`, what
the scheduler runs):

  pp   the B prompts of p random ids (different per sequence) prefilled together, in steps of at
       most the engine's prefill chunk rows in all                 -> B * p / seconds (aggregate)
  ttft that same time: every sequence's first logits are ready when its prompt's last chunk ran
  tg   n steps of one fixed random id per sequence (no sampling)  -> B * n / seconds (aggregate),
       and n / seconds per sequence

With --draft MODEL (or --lookup) it measures speculative decoding instead: each prompt of a set
(built in: code completion for --draft, rewriting code for --lookup; or one prompt per paragraph of
--prompts FILE) is answered greedily, n tokens at most, through the chat template, by one Engine
without and one with the drafter, alternating within each repetition:

  tg   decode tok/s of the answers (GenerationStats: after the first token), each engine's own, and
       speedup = with / without, per repetition, then the median
  acceptance  guesses kept / guesses offered; same_output: whether every answer was identical

Results are means and sample standard deviations over the repetitions; the raw samples and the
medians are kept in the JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROBE_DECODE_STEPS = 16
# The metrics the JSON reports as mean + sd (+ median); the keys are `<name>` and `<name>_sd`.
METRICS = ("pp_tok_s", "tg_tok_s", "ttft_s", "load_s", "peak_rss_mb", "loop_overhead_pct")


@dataclasses.dataclass
class BenchConfig:
    model: str = "smollm2"
    n_prompt: int = 256      # -p
    n_gen: int = 128         # -n
    depth: int = 0           # -d: tokens already in the context
    reps: int = 5            # -r
    threads: int | None = None
    kernels: str = ""        # force a kernel variant ("" = the best for this CPU)
    activations: str = ""    # "int8x2" / "int8" ("" = the engine's default)
    kv_type: str = ""        # "f16" / "f32" ("" = the engine's default, f16)
    seed: int = 42
    load_probe: bool = True  # measure load time and peak RSS in fresh subprocesses
    batch: tuple[int, ...] = ()  # --batch: batch sizes of the batched measurement (instead of the single stream)
    draft: str = ""          # --draft: measure speculative decoding with this draft model
    lookup: bool = False     # --lookup: ... with prompt lookup
    draft_max: int | None = None
    prompts: str = ""        # --prompts FILE: one prompt per paragraph (blank-line separated)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    """Peak resident set of this process in MB. On Linux, VmHWM: ru_maxrss survives fork + exec, so a
    child started from a big parent would report the parent's size; VmHWM belongs to the new image."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def summarize(values: list[float]) -> dict:
    """mean, sample sd (0 for a single value) and median of the finite values."""
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return {"mean": None, "sd": None, "median": None}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "median": statistics.median(vals)}


def decode_weight_bytes(bundle) -> int:
    """Bytes of weights one decode step reads: every tensor except the embedding table, plus one
    embedding row. With tied embeddings the output head is the embedding table, read whole."""
    total = 0
    for t in bundle.tensors:
        if t.name != "token_embd.weight":
            total += t.nbytes
            continue
        total += t.nbytes // t.shape[0]   # the looked-up row
        if "output.weight" not in bundle:  # tied: the head reads every row
            total += t.nbytes
    return total


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1m": os.getloadavg()[0]}


# ---- one repetition (in process) ------------------------------------------------------------


class _Workload:
    """Fixed random token ids for every phase: the same numbers every repetition and every run."""

    def __init__(self, vocab: int, cfg: BenchConfig):
        rng = np.random.default_rng(cfg.seed)
        self.context = rng.integers(0, vocab, cfg.depth).tolist()
        self.prompt = rng.integers(0, vocab, cfg.n_prompt).tolist()
        self.gen = rng.integers(0, vocab, cfg.n_gen).tolist()


def _rewind_untimed(session, position: int) -> None:
    """Rewinds to `position`; if a sliding-window ring no longer holds what that needs, rebuilds the
    cache now, so that the timed step after it measures only itself."""
    session.rewind(position)
    if session.cached_tokens < position:
        kept = session.tokens
        session.reset()
        session.prefill(kept)


def _rep(engine, session, w: _Workload, cfg: BenchConfig, rep_seed: int) -> dict:
    d, p = cfg.depth, cfg.n_prompt
    out: dict = {}
    session.reset()
    if d:
        session.prefill(w.context)  # untimed: the depth the measured steps start from

    # pp: prefill p tokens at depth d
    _rewind_untimed(session, d)
    t0 = time.perf_counter()
    session.prefill(w.prompt)
    out["pp_tok_s"] = p / (time.perf_counter() - t0)

    # tg: n decode steps at depth d, fixed tokens (no sampling)
    if cfg.n_gen:
        _rewind_untimed(session, d)
        t0 = time.perf_counter()
        for tok in w.gen:
            session.decode(tok)
        out["tg_tok_s"] = cfg.n_gen / (time.perf_counter() - t0)

    # ttft and the token loop: generate() from depth d + p with the model's sampling defaults,
    # then the raw decode steps over the very tokens generate() fed back, at the same positions.
    gen_s = raw_s = 0.0
    steps = 0
    ttft = None
    for attempt in range(4):  # a random model may sample EOS early: top up with other seeds
        _rewind_untimed(session, d)
        pieces = session.generate(w.context + w.prompt, max_tokens=max(cfg.n_gen, 1),
                                  seed=rep_seed * 101 + attempt)
        for _ in pieces:
            pass
        st = session.last_stats
        if ttft is None:
            ttft = st.ttft_seconds
        fed = session.tokens[d + p:]
        if fed:
            gen_s += st.decode_seconds
            _rewind_untimed(session, d + p)
            t0 = time.perf_counter()
            for tok in fed:
                session.decode(tok)
            raw_s += time.perf_counter() - t0
            steps += len(fed)
        if steps >= cfg.n_gen - 1:
            break
    out["ttft_s"] = ttft
    out["loop_overhead_pct"] = (gen_s - raw_s) / raw_s * 100 if raw_s > 0 else None
    out["loop_steps"] = steps
    return out


# ---- load time and peak RSS (fresh process) ---------------------------------------------------


def _engine_kwargs(kernels: str, activations: str, kv_type: str = "") -> dict:
    return {"kernels": kernels, **({"activations": activations} if activations else {}),
            **({"kv_type": kv_type} if kv_type else {})}


def _probe(path: str, threads: int, max_context: int, kernels: str, activations: str, kv_type: str, depth: int,
           n_prompt: int, n_gen: int, seed: int) -> dict:
    """Runs in a fresh interpreter: import, load, a short run; reports times and memory."""
    t_import = time.perf_counter()
    from pocketlm.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(path, threads=threads, max_context=max_context, **_engine_kwargs(kernels, activations, kv_type))
    session = engine.create_session()
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_mb()
    rng = np.random.default_rng(seed)
    session.prefill(rng.integers(0, engine.vocab_size, depth + n_prompt).tolist())
    for tok in rng.integers(0, engine.vocab_size, min(n_gen, PROBE_DECODE_STEPS)).tolist():
        session.decode(tok)
    return {"load_s": load_s, "import_s": t0 - t_import, "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _peak_rss_mb()}


def _run_probe(path: Path, threads: int, max_context: int, cfg: BenchConfig) -> dict:
    import pocketlm

    pkg_root = str(Path(pocketlm.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    args = json.dumps([str(path), threads, max_context, cfg.kernels, cfg.activations, cfg.kv_type, cfg.depth, cfg.n_prompt,
                       cfg.n_gen, cfg.seed])
    code = ("import json, sys; from pocketlm.bench import _probe; "
            "print(json.dumps(_probe(*json.loads(sys.argv[1]))))")
    r = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"load probe failed (exit {r.returncode}):\n{r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the whole benchmark --------------------------------------------------------------------


def run_bench(cfg: BenchConfig, quiet: bool = False) -> dict:
    """Runs the benchmark described in the module docstring; returns the JSON-ready result."""
    import pocketlm
    from pocketlm.bundle import read_bundle
    from pocketlm.engine import Engine, resolve_model_path

    if cfg.n_prompt < 1 or cfg.n_gen < 0 or cfg.depth < 0 or cfg.reps < 1:
        raise ValueError("bench needs -p >= 1, -n >= 0, -d >= 0 and -r >= 1")
    if cfg.batch:
        return run_batched(cfg, quiet)
    if cfg.draft or cfg.lookup:
        return run_speculative(cfg, quiet)
    path = resolve_model_path(cfg.model)  # a .gguf is converted into the cache here, untimed
    bundle = read_bundle(path)
    trained = int((bundle.metadata.get("config") or {}).get("max_position") or 0)
    need = cfg.depth + cfg.n_prompt + max(cfg.n_gen, 1) + 1  # generate() after d + p tokens
    if trained and need > trained:
        raise ValueError(f"-d {cfg.depth} -p {cfg.n_prompt} -n {cfg.n_gen} need {need} positions; "
                         f"the model's context is {trained}")
    max_context = need
    engine = Engine(path, threads=cfg.threads, max_context=max_context,
                    **_engine_kwargs(cfg.kernels, cfg.activations, cfg.kv_type))
    activations = getattr(engine, "activations", "int8")
    threads = engine.threads
    session = engine.create_session()
    w = _Workload(engine.vocab_size, cfg)
    n_params = sum(t.n_elements for t in bundle.tensors)
    _log(f"bench: {path.name} | {engine.kernel_name}, {activations} activations, {engine.kv_type} KV cache | "
         f"{threads} threads | pp{cfg.n_prompt} tg{cfg.n_gen}"
         f"{f' @ d{cfg.depth}' if cfg.depth else ''} | {cfg.reps} reps + 1 warm-up", quiet)

    machine = machine_info()  # before the run: its load average says how busy the machine was
    samples: dict[str, list] = {k: [] for k in METRICS}
    samples["import_s"], samples["rss_after_load_mb"], samples["loop_steps"] = [], [], []
    if cfg.load_probe:
        _run_probe(path, threads, max_context, cfg)  # warm-up: page cache, pyc files
    _rep(engine, session, w, cfg, rep_seed=0)          # warm-up: caches, thread pool, arena commit
    for i in range(cfg.reps):
        # Alternate the in-process and the subprocess measurements so noise reaches both.
        res = _rep(engine, session, w, cfg, rep_seed=i + 1)
        if cfg.load_probe:
            res.update(_run_probe(path, threads, max_context, cfg))
        for k, v in res.items():
            samples.setdefault(k, []).append(v)
        _log(f"  rep {i + 1}/{cfg.reps}: pp {res['pp_tok_s']:.1f} tok/s"
             + (f", tg {res['tg_tok_s']:.1f} tok/s" if "tg_tok_s" in res else "")
             + f", ttft {res['ttft_s'] * 1000:.1f} ms"
             + (f", load {res['load_s'] * 1000:.0f} ms, peak RSS {res['peak_rss_mb']:.0f} MB"
                if cfg.load_probe else ""), quiet)

    result: dict = {
        "model": str(cfg.model), "bundle": str(path), "bundle_bytes": bundle.file_bytes,
        "n_params": n_params, "architecture": bundle.metadata.get("architecture"),
        "decode_weight_bytes": decode_weight_bytes(bundle),
        "threads": threads, "kernels": engine.kernel_name, "activations": activations, "kv_type": engine.kv_type,
        "p": cfg.n_prompt, "n": cfg.n_gen, "d": cfg.depth, "r": cfg.reps, "seed": cfg.seed,
        "pocketlm_version": pocketlm.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
    }
    for k in METRICS + ("import_s", "rss_after_load_mb"):
        s = summarize(samples.get(k, []))
        result[k], result[f"{k}_sd"], result[f"{k}_median"] = s["mean"], s["sd"], s["median"]
    result["bench_process_peak_rss_mb"] = _peak_rss_mb()
    result["loadavg_1m_end"] = os.getloadavg()[0]  # other work on the machine during the run
    result["samples"] = samples
    result["notes"] = {
        "pp": "prefill of p random token ids at depth d, one Session.prefill call",
        "tg": "n Session.decode steps of fixed random ids at depth d, no sampling",
        "ttft_s": "Session.generate on d+p token ids (d reused from the cache) to its first token",
        "load_s": "fresh process: Engine(.plm) + create_session; imports excluded; warm page cache",
        "peak_rss_mb": f"fresh process: peak RSS (VmHWM) after load, prefill d+p, {PROBE_DECODE_STEPS} decode steps",
        "loop_overhead_pct": "Session.generate per token (model sampling defaults, detokenizing) vs the raw "
                             "Session.decode steps over the same tokens at the same positions",
    }
    return result


# ---- batched (--batch) -----------------------------------------------------------------------------


def _run_steps(program, sessions, feeds: list, max_rows: int) -> None:
    """Feeds every session its array of ids in batched steps of at most max_rows rows, planned as
    the scheduler plans them (scheduler.plan_step)."""
    from pocketlm import _core
    from pocketlm.scheduler import plan_step

    feeds = list(feeds)
    while any(f.size for f in feeds):
        step = [(i, n, sessions[i].cached_tokens) for i, n in plan_step([int(f.size) for f in feeds], max_rows)]
        _core.run_batch(program, [(sessions[i]._state, feeds[i][:n], pos) for i, n, pos in step])
        for i, n, pos in step:
            sessions[i]._advance(feeds[i][:n], pos)
            feeds[i] = feeds[i][n:]


def _batched_rep(engine, sessions: list, cfg: BenchConfig, b: int, rng_seed: int) -> dict:
    program = engine.compiled.program
    rng = np.random.default_rng(rng_seed)
    vocab = engine.vocab_size
    seqs = sessions[:b]
    for s in seqs:
        s.reset()
    if cfg.depth:  # untimed: the context every sequence starts from
        _run_steps(program, seqs, [rng.integers(0, vocab, cfg.depth).astype(np.int32) for _ in seqs],
                   engine.prefill_chunk)
    prompts = [rng.integers(0, vocab, cfg.n_prompt).astype(np.int32) for _ in seqs]
    t0 = time.perf_counter()
    _run_steps(program, seqs, prompts, engine.prefill_chunk)
    pp_s = time.perf_counter() - t0
    out = {"pp_tok_s": b * cfg.n_prompt / pp_s, "ttft_s": pp_s}
    if cfg.n_gen:
        tokens = rng.integers(0, vocab, (cfg.n_gen, b)).astype(np.int32)
        from pocketlm import _core

        t0 = time.perf_counter()
        for step in range(cfg.n_gen):
            pos = seqs[0].cached_tokens
            _core.run_batch(program, [(s._state, tokens[step, i:i + 1], pos) for i, s in enumerate(seqs)])
            for i, s in enumerate(seqs):
                s._advance(tokens[step, i:i + 1], pos)
        tg_s = time.perf_counter() - t0
        out["tg_tok_s"] = b * cfg.n_gen / tg_s
        out["tg_tok_s_per_seq"] = cfg.n_gen / tg_s
    return out


def run_batched(cfg: BenchConfig, quiet: bool = False) -> dict:
    """--batch: the batched measurement of the module docstring, for each batch size."""
    import pocketlm
    from pocketlm.bundle import read_bundle
    from pocketlm.engine import MAX_BATCH, Engine, resolve_model_path

    sizes = tuple(cfg.batch)
    if not sizes or any(b < 1 or b > MAX_BATCH for b in sizes):
        raise ValueError(f"--batch takes batch sizes in 1..{MAX_BATCH}, got {','.join(map(str, sizes))}")
    path = resolve_model_path(cfg.model)
    bundle = read_bundle(path)
    trained = int((bundle.metadata.get("config") or {}).get("max_position") or 0)
    need = cfg.depth + cfg.n_prompt + cfg.n_gen + 1
    if trained and need > trained:
        raise ValueError(f"-d {cfg.depth} -p {cfg.n_prompt} -n {cfg.n_gen} need {need} positions; "
                         f"the model's context is {trained}")
    engine = Engine(path, threads=cfg.threads, max_context=need, max_batch=max(sizes),
                    **_engine_kwargs(cfg.kernels, cfg.activations, cfg.kv_type))
    if engine.max_batch < max(sizes):
        raise ValueError(f"--batch {max(sizes)} needs a prefill chunk of at least {max(sizes)} rows")
    sessions = [engine.create_session() for _ in range(max(sizes))]
    _log(f"bench --batch: {path.name} | {engine.kernel_name}, {engine.activations} activations, {engine.kv_type} KV "
         f"cache | {engine.threads} threads | B = {','.join(map(str, sizes))} | pp{cfg.n_prompt} tg{cfg.n_gen}"
         f"{f' @ d{cfg.depth}' if cfg.depth else ''} per sequence | {cfg.reps} reps + 1 warm-up", quiet)
    machine = machine_info()
    for b in sizes:  # warm-up: pages of every session's cache, the arena at its widest
        _batched_rep(engine, sessions, cfg, b, rng_seed=cfg.seed)
    samples: dict[int, dict[str, list]] = {b: {} for b in sizes}
    for r in range(cfg.reps):
        for b in sizes:  # every repetition goes through every size, so noise reaches them all
            res = _batched_rep(engine, sessions, cfg, b, rng_seed=cfg.seed + r + 1)
            for k, v in res.items():
                samples[b].setdefault(k, []).append(v)
            _log(f"  rep {r + 1}/{cfg.reps} B={b}: pp {res['pp_tok_s']:.1f} tok/s"
                 + (f", tg {res['tg_tok_s']:.1f} tok/s ({res['tg_tok_s_per_seq']:.1f} per sequence)"
                    if "tg_tok_s" in res else ""), quiet)
    rows = []
    for b in sizes:
        row: dict = {"batch": b}
        for k in ("pp_tok_s", "tg_tok_s", "tg_tok_s_per_seq", "ttft_s"):
            st = summarize(samples[b].get(k, []))
            row[k], row[f"{k}_sd"], row[f"{k}_median"] = st["mean"], st["sd"], st["median"]
        row["samples"] = samples[b]
        rows.append(row)
    base = rows[0]["tg_tok_s_median"] if sizes[0] == 1 else None
    for row in rows:
        row["tg_speedup_vs_b1"] = row["tg_tok_s_median"] / base if base and row["tg_tok_s_median"] else None
    return {
        "model": str(cfg.model), "bundle": str(path), "bundle_bytes": bundle.file_bytes,
        "n_params": sum(t.n_elements for t in bundle.tensors), "architecture": bundle.metadata.get("architecture"),
        "threads": engine.threads, "kernels": engine.kernel_name, "activations": engine.activations,
        "kv_type": engine.kv_type, "p": cfg.n_prompt, "n": cfg.n_gen, "d": cfg.depth, "r": cfg.reps,
        "seed": cfg.seed, "pocketlm_version": pocketlm.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine, "loadavg_1m_end": os.getloadavg()[0],
        "batched": rows,
        "notes": {
            "batched": "per batch size B: B sequences on one engine in batched executor steps (_core.run_batch)",
            "pp_tok_s": "B prompts of p random ids prefilled together (steps of at most the prefill chunk rows): B*p/s",
            "ttft_s": "the same prefill's time: the first logits of every sequence are ready at its end",
            "tg_tok_s": "n steps of one fixed random id per sequence, no sampling: B*n/s (aggregate)",
            "tg_tok_s_per_seq": "n/s: what each sequence sees",
            "tg_speedup_vs_b1": "median aggregate tg at B over median at B=1",
        },
    }


def format_batched_markdown(res: dict) -> str:
    at = f" @ d{res['d']}" if res["d"] else ""
    head = (f"{Path(res['bundle']).name} | {res['kernels']} | {res['threads']} threads | pp{res['p']} tg{res['n']}{at} "
            f"per sequence\n\n| B | pp t/s (all) | tg t/s (all) | tg t/s per sequence | tg vs B=1 | ttft ms |\n"
            "|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for row in res["batched"]:
        speed = f"{row['tg_speedup_vs_b1']:.2f}x" if row.get("tg_speedup_vs_b1") else "n/a"
        ttft = row["ttft_s"]
        rows.append(f"| {row['batch']} | {_pm(row['pp_tok_s'], row['pp_tok_s_sd'])} | "
                    f"{_pm(row['tg_tok_s'], row['tg_tok_s_sd'])} | {_pm(row['tg_tok_s_per_seq'], row['tg_tok_s_per_seq_sd'])} "
                    f"| {speed} | {'n/a' if ttft is None else f'{ttft * 1000:.1f}'} |")
    return head + "\n".join(rows) + f"\n\npocketlm {res['pocketlm_version']}, {res['r']} reps, medians in the JSON\n"


# ---- output ---------------------------------------------------------------------------------


def _pm(mean, sd, fmt: str = "{:.2f}") -> str:
    if mean is None:
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.format(sd or 0.0)}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_markdown(res: dict) -> str:
    """A llama-bench style table of pp and tg, then the other measurements."""
    at = f" @ d{res['d']}" if res["d"] else ""
    name = Path(res["bundle"]).name
    params = f"{res['n_params'] / 1e6:.2f} M"
    head = "| model | size | params | kernels | threads | test | t/s |\n|---|---:|---:|---|---:|---:|---:|\n"
    rows = [f"| {name} | {_human(res['bundle_bytes'])} | {params} | {res['kernels']} | {res['threads']} | "
            f"pp{res['p']}{at} | {_pm(res['pp_tok_s'], res['pp_tok_s_sd'])} |"]
    if res["n"]:
        rows.append(f"| {name} | {_human(res['bundle_bytes'])} | {params} | {res['kernels']} | {res['threads']} | "
                    f"tg{res['n']}{at} | {_pm(res['tg_tok_s'], res['tg_tok_s_sd'])} |")
    extra = "\n\n| measurement | mean ± sd | median |\n|---|---:|---:|\n"
    lines = [
        ("time to first token (ms)", "ttft_s", 1000, "{:.1f}"),
        ("load time (ms)", "load_s", 1000, "{:.1f}"),
        ("peak RSS (MB)", "peak_rss_mb", 1, "{:.1f}"),
        ("token loop overhead (%)", "loop_overhead_pct", 1, "{:.2f}"),
    ]
    out = []
    for label, key, scale, fmt in lines:
        m = res.get(key)
        if m is None:
            out.append(f"| {label} | n/a | n/a |")
            continue
        out.append(f"| {label} | {_pm(m * scale, (res[key + '_sd'] or 0) * scale, fmt)} | "
                   f"{fmt.format(res[key + '_median'] * scale)} |")
    return head + "\n".join(rows) + extra + "\n".join(out) + f"\n\npocketlm {res['pocketlm_version']}, {res['r']} reps\n"


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return plt


def plot(res: dict, path: str | os.PathLike) -> None:
    """A PNG with two bar charts (pp and tg tok/s, with the repetitions' sd as error bars)."""
    plt = require_matplotlib()
    at = f" @ d{res['d']}" if res["d"] else ""
    tests = [(f"pp{res['p']}{at}", "pp_tok_s")] + ([(f"tg{res['n']}{at}", "tg_tok_s")] if res["n"] else [])
    fig, axes = plt.subplots(1, len(tests), figsize=(4 * len(tests), 4), squeeze=False)
    for ax, (label, key) in zip(axes[0], tests):
        ax.bar([label], [res[key]], yerr=[res[key + "_sd"] or 0], capsize=6, color="#3b7dd8")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{label}: {res[key]:.1f} tok/s")
    fig.suptitle(f"{Path(res['bundle']).name} | {res['kernels']} | {res['threads']} threads | "
                 f"{res['r']} reps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- speculative decoding ---------------------------------------------------------------------

CODE_PROMPTS = (
    "Complete this Python function and return only code:\n\ndef quicksort(items: list[int]) -> list[int]:\n"
    "    \"\"\"Sort items with quicksort and return a new list.\"\"\"",
    "Complete this Python function and return only code:\n\ndef is_palindrome(text: str) -> bool:\n"
    "    \"\"\"True if text reads the same backwards, ignoring case and spaces.\"\"\"",
    "Complete this Python class and return only code:\n\nclass Stack:\n    \"\"\"A LIFO stack with push, pop, "
    "peek and __len__.\"\"\"",
    "Write a Python function `word_counts(path)` that reads a text file and returns a dict of word frequencies.",
    "Complete this JavaScript function and return only code:\n\nfunction debounce(fn, ms) {",
    "Write a SQL query that returns the ten customers with the highest total order amount from tables "
    "customers(id, name) and orders(id, customer_id, amount).",
)

REWRITE_PROMPTS = (
    "Rewrite this code with type hints and a docstring, keeping everything else the same:\n\n"
    "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i])\n            i += 1\n        else:\n"
    "            out.append(b[j])\n            j += 1\n    out.extend(a[i:])\n    out.extend(b[j:])\n"
    "    return out\n",
    "Rename the variable `data` to `records` in this code and change nothing else:\n\n"
    "def summarize(data):\n    total = 0\n    for row in data:\n        total += row['amount']\n"
    "    count = len(data)\n    mean = total / count if count else 0\n    return {'total': total, "
    "'count': count, 'mean': mean}\n",
    "Add a comment above each line of this function, keeping the code unchanged:\n\n"
    "def fizzbuzz(n):\n    for i in range(1, n + 1):\n        if i % 15 == 0:\n            print('FizzBuzz')\n"
    "        elif i % 3 == 0:\n            print('Fizz')\n        elif i % 5 == 0:\n            print('Buzz')\n"
    "        else:\n            print(i)\n",
)


def run_speculative(cfg: BenchConfig, quiet: bool = False) -> dict:
    """Plain vs speculative greedy decoding on a prompt set (module docstring); returns the JSON."""
    import pocketlm
    from pocketlm.engine import Engine

    if cfg.prompts:
        text = Path(cfg.prompts).read_text(encoding="utf-8")
        prompts = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not prompts:
            raise ValueError(f"{cfg.prompts}: no prompt (one per paragraph)")
    else:
        prompts = list(REWRITE_PROMPTS if cfg.lookup else CODE_PROMPTS)
    kw = dict(threads=cfg.threads, max_context=4096, **_engine_kwargs(cfg.kernels, cfg.activations, cfg.kv_type))
    plain = Engine(cfg.model, **kw)
    spec = Engine(cfg.model, draft=cfg.draft or None, lookup=cfg.lookup, draft_max=cfg.draft_max, **kw)
    how = f"draft {Path(cfg.draft).name}" if cfg.draft else "prompt lookup"
    _log(f"bench --{'draft' if cfg.draft else 'lookup'}: {Path(plain.path).name} | {how}, draft_max "
         f"{spec.draft_max} | {plain.kernel_name}, {plain.threads} threads | {len(prompts)} prompts, "
         f"n {cfg.n_gen}, greedy", quiet)

    def answer(engine, prompt):
        s = engine.create_session()
        out = "".join(s.chat([{"role": "user", "content": prompt}], max_tokens=cfg.n_gen, temperature=0))
        st = s.last_stats
        return out, st

    answer(plain, prompts[0]), answer(spec, prompts[0])  # warm-up (and the draft's calibration)
    reps = []
    same = True
    for rep in range(cfg.reps):
        row = {"plain_s": 0.0, "plain_tokens": 0, "spec_s": 0.0, "spec_tokens": 0, "offered": 0, "kept": 0}
        for i, prompt in enumerate(prompts):
            order = (plain, spec) if (rep + i) % 2 == 0 else (spec, plain)
            got = {}
            for engine in order:
                got[engine is spec] = answer(engine, prompt)
            (a, sa), (b, sb) = got[False], got[True]
            same &= a == b
            row["plain_s"] += sa.decode_seconds
            row["plain_tokens"] += max(sa.generated_tokens - 1, 0)
            row["spec_s"] += sb.decode_seconds
            row["spec_tokens"] += max(sb.generated_tokens - 1, 0)
            row["offered"] += sb.draft_tokens
            row["kept"] += sb.accepted_tokens
        row["plain_tg_tok_s"] = row["plain_tokens"] / row["plain_s"] if row["plain_s"] else 0.0
        row["spec_tg_tok_s"] = row["spec_tokens"] / row["spec_s"] if row["spec_s"] else 0.0
        row["speedup"] = row["spec_tg_tok_s"] / row["plain_tg_tok_s"] if row["plain_tg_tok_s"] else 0.0
        reps.append(row)
        _log(f"  rep {rep + 1}/{cfg.reps}: plain {row['plain_tg_tok_s']:.1f} tok/s, speculative "
             f"{row['spec_tg_tok_s']:.1f} tok/s ({row['speedup']:.2f}x), kept {row['kept']}/{row['offered']}", quiet)
    med = lambda k: statistics.median(r[k] for r in reps)  # noqa: E731
    offered = sum(r["offered"] for r in reps)
    return {
        "pocketlm_version": pocketlm.__version__, "model": Path(plain.path).name,
        "drafter": Path(cfg.draft).name if cfg.draft else "lookup", "draft_max": spec.draft_max,
        "threads": plain.threads, "kernels": plain.kernel_name, "activations": plain.activation_spec,
        "prompts": len(prompts), "n_gen": cfg.n_gen, "reps": cfg.reps,
        "plain_tg_tok_s": med("plain_tg_tok_s"), "spec_tg_tok_s": med("spec_tg_tok_s"), "speedup": med("speedup"),
        "acceptance": sum(r["kept"] for r in reps) / offered if offered else 0.0,
        "same_output": same, "samples": reps, "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_speculative_markdown(res: dict) -> str:
    return (f"| model | drafter | plain tg tok/s | speculative tg tok/s | speedup | acceptance | same output |\n"
            f"|---|---|---:|---:|---:|---:|---|\n"
            f"| {res['model']} | {res['drafter']} (max {res['draft_max']}) | {res['plain_tg_tok_s']:.1f} | "
            f"{res['spec_tg_tok_s']:.1f} | {res['speedup']:.2f}x | {100 * res['acceptance']:.0f} % | "
            f"{'yes' if res['same_output'] else 'NO'} |")
