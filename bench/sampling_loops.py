"""How often a model's answers loop under sampling settings: for each setting and prompt, N seeds of
`chat` with max_tokens 512; an answer loops when it runs to max_tokens without ending, or repeats an
n-gram of 8 tokens 4 times. Prints the loop rate per setting (what pocketlm's defaults are chosen by).

    python bench/sampling_loops.py [MODEL] [-n 20] [--settings 'rep=1.0;rep=1.1;rep=1.05']
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from pocketlm import Engine  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "Write a short poem about autumn.", "Tell me a story about a cat.",
           "What is the capital of France? Answer in one sentence.", "Explain what a CPU does."]


def loops(ids: list[int], finished: bool) -> bool:
    if not finished:
        return True
    grams = Counter(tuple(ids[i:i + 8]) for i in range(len(ids) - 7))
    return bool(grams) and max(grams.values()) >= 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-n", type=int, default=20, help="seeds per prompt")
    ap.add_argument("--settings", default="rep=1.0;rep=1.1;rep=1.05",
                    help="';'-separated settings, each ','-separated key=value (rep, temp, min_p, top_p, top_k)")
    a = ap.parse_args()
    engine = Engine(a.model, threads=2, prefix_cache_mb=0)
    names = {"rep": "repetition_penalty", "temp": "temperature", "min_p": "min_p", "top_p": "top_p", "top_k": "top_k"}
    for setting in a.settings.split(";"):
        kw = {}
        for part in setting.split(","):
            k, v = part.split("=")
            kw[names[k]] = int(v) if k == "top_k" else float(v)
        looped, total = 0, 0
        for prompt in PROMPTS:
            for seed in range(a.n):
                s = engine.create_session()
                list(s.chat([{"role": "user", "content": prompt}], max_tokens=512, seed=seed, **kw))
                looped += loops(s.last_text_ids[-s.last_stats.generated_tokens:], s.last_stats.finish_reason == "stop")
                total += 1
        print(f"{setting}: {looped}/{total} answers loop ({100 * looped / total:.0f} %)", flush=True)


if __name__ == "__main__":
    main()
