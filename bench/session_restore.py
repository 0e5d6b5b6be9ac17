"""Restoring a session from disk against prefilling it again (issue 14's target: >= 30x).

    python bench/session_restore.py MODEL [-n 4000] [-t 2] [-r 3]

Prefills n random tokens, saves the session, loads it back (Engine.load_session: the file read,
both checksums and the KV copy), and checks that the next token's logits are equal bit for bit;
medians of r rounds."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from pocketlm import Engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-n", type=int, default=4000)
    p.add_argument("-t", type=int, default=2)
    p.add_argument("-r", type=int, default=3)
    a = p.parse_args()
    engine = Engine(a.model, threads=a.t, max_context=a.n + 16)
    ids = np.random.default_rng(0).integers(100, min(20000, engine.vocab_size), a.n).tolist()
    prefill, load = [], []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.plms")
        for _ in range(a.r):
            s = engine.create_session()
            t0 = time.perf_counter()
            s.prefill(ids)
            prefill.append(time.perf_counter() - t0)
            s.save(path)
            t0 = time.perf_counter()
            r = engine.load_session(path)
            load.append(time.perf_counter() - t0)
            assert np.array_equal(s.decode(42), r.decode(42)), "the restored session's logits differ"
        size = os.path.getsize(path)
    p_med, l_med = statistics.median(prefill), statistics.median(load)
    print(f"{a.n} tokens, file {size / 1e6:.1f} MB: prefill {p_med:.3f} s, load {l_med * 1000:.1f} ms "
          f"({p_med / l_med:.0f}x; medians of {a.r}); the next logits are equal")


if __name__ == "__main__":
    main()
