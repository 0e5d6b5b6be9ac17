"""Decode speed deep in the context for two KV cache types, interleaved step by step (the machine is
noisy: each pair of steps sees the same load), on the same prompt. Prints the median time per token of
each and their ratio.

    python bench/kv_decode.py MODEL [--depth 4096] [--steps 200] [--types f16,q8_0] [-t 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from pocketlm import Engine, quality  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--types", default="f16,q8_0")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    types = a.types.split(",")
    text = "".join(open(p, encoding="utf-8").read() for p in quality.shakespeare_plays().values())
    sessions, engines = [], []
    for kv in types:
        engine = Engine(a.model, threads=a.threads, max_context=a.depth + a.steps + 8, kv_type=kv,
                        prefix_cache_mb=0)
        ids = engine.tokenizer.encode(text)[:a.depth]
        s = engine.create_session()
        t0 = time.perf_counter()
        logits = s.prefill(ids)
        print(f"{kv}: prefilled {len(ids)} tokens in {time.perf_counter() - t0:.1f} s, KV {s.kv_bytes / 2**20:.1f} MiB",
              file=sys.stderr)
        engines.append(engine)
        sessions.append([s, int(logits.argmax())])
    times = [[] for _ in types]
    for _ in range(a.steps):
        for i, entry in enumerate(sessions):
            s, token = entry
            t0 = time.perf_counter()
            logits = s.decode(token)
            times[i].append(time.perf_counter() - t0)
            entry[1] = int(logits.argmax())
    med = [statistics.median(t) for t in times]
    for kv, m in zip(types, med):
        print(f"{kv}: {1 / m:.2f} tok/s (median of {a.steps} steps at depth {a.depth}..{a.depth + a.steps})")
    for kv, m in zip(types[1:], med[1:]):
        print(f"{kv} / {types[0]} speed: {med[0] / m:.3f}")


if __name__ == "__main__":
    main()
