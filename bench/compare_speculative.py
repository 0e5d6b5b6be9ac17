"""Speculative decoding side by side: pocketlm vs llama.cpp's llama-speculative on the same GGUF pair.

    python bench/compare_speculative.py TARGET.gguf DRAFT.gguf [-n 128] [-t 2] [-r 3] [--draft-max 16] [--json FILE]

Each round answers pocketlm's built-in code prompts (`pocketlm.bench.CODE_PROMPTS`, each through the
target's chat template), greedily, n tokens at most:

  pocketlm   `pocketlm bench TARGET --draft DRAFT -r 1`: plain and speculative decode tok/s of the
             answers (after their first token), the acceptance, whether the outputs were identical
  llama.cpp  `llama-speculative -m TARGET -md DRAFT -f PROMPT -n N --temp 0 -t T` per prompt, at its
             default draft length (3 in this version) and at --draft-max: "decoded N tokens in S
             seconds" summed over the prompts; its acceptance from "accept" lines

The runtimes alternate which goes first, round by round; the table gives medians over rounds.
llama-speculative comes from bench/build_llamacpp.sh (LLAMACPP_CACHE, default ~/.cache/pocketlm/llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from compare import (  # bench/compare.py, beside this file
    CACHE,
    REPO,
    env_with_pocketlm,
    log,
)


def run_pocketlm(a) -> dict:
    cmd = [sys.executable, "-m", "pocketlm", "bench", str(a.target), "--draft", str(a.draft), "-n", str(a.n),
           "-t", str(a.t), "-r", "1", "--draft-max", str(a.draft_max), "--json", "-", "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env_with_pocketlm(), check=False)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout)


def chat_prompts(target: Path) -> list[str]:
    """The built-in prompts rendered by the target's chat template (as pocketlm's bench feeds them)."""
    sys.path.insert(0, str(REPO / "python"))
    from pocketlm.bench import CODE_PROMPTS
    from pocketlm.engine import Engine

    engine = Engine(target, threads=1, max_context=512)
    return [engine.apply_chat_template([{"role": "user", "content": p}]) for p in CODE_PROMPTS]


def run_llama(a, prompts: list[str], draft_max: int | None) -> dict:
    exe = CACHE / "build/bin/llama-speculative"
    tokens = seconds = 0.0
    accepted = drafted = 0
    for text in prompts:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        cmd = [str(exe), "-m", str(a.target), "-md", str(a.draft), "-f", f.name, "-n", str(a.n), "--temp", "0",
               "-t", str(a.t), "-td", str(a.t), "-c", "2048", "--seed", "1"]
        if draft_max is not None:
            cmd += ["--spec-draft-n-max", str(draft_max)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        finally:
            os.unlink(f.name)
        out = r.stdout + r.stderr
        m = re.search(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+) seconds", out)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}")
        tokens += int(m.group(1))
        seconds += float(m.group(2))
        acc, dr = re.search(r"n_accept\s*=\s*(\d+)", out), re.search(r"n_drafted\s*=\s*(\d+)", out)
        accepted += int(acc.group(1)) if acc else 0
        drafted += int(dr.group(1)) if dr else 0
    return {"tg_tok_s": tokens / seconds if seconds else 0.0, "tokens": tokens, "seconds": seconds,
            "acceptance": accepted / drafted if drafted else None, "draft_max": draft_max}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pocketlm vs llama-speculative on one GGUF pair (alternating rounds)")
    ap.add_argument("target", type=Path)
    ap.add_argument("draft", type=Path)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    prompts = chat_prompts(a.target)
    rounds = []
    for i in range(a.r):
        row = {}
        order = ["pocketlm", "llama", "llama_max"] if i % 2 == 0 else ["llama_max", "llama", "pocketlm"]
        for who in order:
            log(f"round {i + 1}/{a.r}: {who}")
            row[who] = run_pocketlm(a) if who == "pocketlm" else run_llama(a, prompts, None if who == "llama" else a.draft_max)
        rounds.append(row)
        pk = row["pocketlm"]
        log(f"  pocketlm plain {pk['plain_tg_tok_s']:.1f}, speculative {pk['spec_tg_tok_s']:.1f} tok/s; "
            f"llama-speculative {row['llama']['tg_tok_s']:.1f} (default draft), {row['llama_max']['tg_tok_s']:.1f} "
            f"(draft max {a.draft_max})")
    med = lambda f: statistics.median(f(r) for r in rounds)  # noqa: E731
    res = {
        "target": a.target.name, "draft": a.draft.name, "n": a.n, "threads": a.t, "rounds": a.r,
        "pocketlm_plain_tg_tok_s": med(lambda r: r["pocketlm"]["plain_tg_tok_s"]),
        "pocketlm_spec_tg_tok_s": med(lambda r: r["pocketlm"]["spec_tg_tok_s"]),
        "pocketlm_speedup": med(lambda r: r["pocketlm"]["speedup"]),
        "pocketlm_acceptance": med(lambda r: r["pocketlm"]["acceptance"]),
        "pocketlm_same_output": all(r["pocketlm"]["same_output"] for r in rounds),
        "llama_spec_tg_tok_s": med(lambda r: r["llama"]["tg_tok_s"]),
        "llama_spec_max_tg_tok_s": med(lambda r: r["llama_max"]["tg_tok_s"]),
        "ratio_vs_llama": med(lambda r: r["pocketlm"]["spec_tg_tok_s"] / max(r["llama"]["tg_tok_s"], r["llama_max"]["tg_tok_s"])),
        "samples": rounds,
    }
    print(f"| | decode tok/s (median of {a.r}) |\n|---|---:|\n"
          f"| pocketlm, plain | {res['pocketlm_plain_tg_tok_s']:.1f} |\n"
          f"| pocketlm, --draft (max {a.draft_max}) | {res['pocketlm_spec_tg_tok_s']:.1f} "
          f"({res['pocketlm_speedup']:.2f}x plain, {100 * res['pocketlm_acceptance']:.0f} % kept, same output: "
          f"{res['pocketlm_same_output']}) |\n"
          f"| llama-speculative, default draft | {res['llama_spec_tg_tok_s']:.1f} |\n"
          f"| llama-speculative, draft max {a.draft_max} | {res['llama_spec_max_tg_tok_s']:.1f} |\n"
          f"| pocketlm / best llama-speculative | {res['ratio_vs_llama']:.2f}x |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
