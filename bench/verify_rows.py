"""What a step of r rows costs, as a verifying step runs it: one sequence, r tokens, every row's
logits wanted (so the matmuls take the arithmetic of a one-token step, WeightView::row_invariant),
after a 200-token prompt; median over rounds of 5 steps each, the row counts alternating.

    python bench/verify_rows.py TARGET.gguf --rows 1,2,3,4,6,8 -r 5
    python bench/verify_rows.py DRAFT.gguf --rows 1 -r 5        # a draft guess: a step of one row

With alpha (the share of guesses kept) it prints the best speculative rate these costs allow,
(1 - alpha^(k+1)) / (1 - alpha) tokens per k guesses + a step of k + 1 rows, and the same with
verification free (every step costing one row's), against plain decoding (one row a token).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def step_costs(model: str, rows: list[int], rounds: int, threads: int) -> dict[int, float]:
    from pocketlm import _core
    from pocketlm.engine import Engine

    engine = Engine(model, threads=threads)
    s = engine.create_session()
    program = engine.compiled.program
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 1000, 200).astype(np.int32)
    _core.run_batch(program, [(s._state, prompt, 0)])
    s._advance(prompt, 0)
    pos = s.cached_tokens
    times: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(rounds):
        for r in rows:
            t = rng.integers(0, 1000, r).astype(np.int32)
            t0 = time.perf_counter()
            for _ in range(5):  # the same positions each time: the cache rows are overwritten
                _core.run_batch(program, [(s._state, t, pos, r)])
            times[r].append((time.perf_counter() - t0) / 5)
    return {r: statistics.median(v) for r, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", default="1,2,3,4,6,8")
    ap.add_argument("-r", type=int, default=5, help="rounds")
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("--guess-ms", type=float, default=None, help="a draft guess's cost, for the bound")
    ap.add_argument("--alpha", type=float, default=None, help="share of guesses kept, for the bound")
    a = ap.parse_args()
    rows = sorted({int(x) for x in a.rows.split(",")} | {1})
    cost = step_costs(a.model, rows, a.r, a.t)
    print(Path(a.model).name, " ".join(f"{r} rows: {cost[r] * 1e3:.1f} ms" for r in rows))
    if a.alpha is not None and a.guess_ms is not None:
        g, one, al = a.guess_ms / 1e3, cost[1], a.alpha
        tokens = lambda k: (1 - al ** (k + 1)) / (1 - al)  # noqa: E731
        best = max((tokens(k) / (k * g + cost[k + 1]) * one, k) for k in range(1, max(rows)) if k + 1 in cost)
        free = max((tokens(k) / (k * g + one) * one, k) for k in range(1, 33))
        print(f"alpha {al}, guess {a.guess_ms} ms: best {best[0]:.2f}x plain (k = {best[1]}); "
              f"with verification free {free[0]:.2f}x (k = {free[1]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
