"""Prefill and decode of bundles side by side, alternating, one fresh process per run: for a
sparse bundle against its dense twin (docs/performance.md "Sparse weights").

    python bench/sparse_ab.py DENSE.plm SPARSE.plm [SPARSE.plm@in-place ...] [-r 4] [-t 2]

Each run: Engine(MODEL), a 64-token warm-up prefill, then a 256-token prefill and 128 decode steps
of fixed random ids, timed. MODEL@LAYOUT loads with Engine(sparse_layout=LAYOUT) (auto, in-place,
dense). Prints every run (with the process's peak RSS) and the medians; PLM_KERNELS=avx2 forces a
kernel variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

RUN = r"""
import json, resource, sys, time, numpy as np
from pocketlm.engine import Engine
e = Engine(sys.argv[1], threads=int(sys.argv[2]), max_context=1024, sparse_layout=sys.argv[3])
rng = np.random.default_rng(0)
p = rng.integers(0, 1000, 256).tolist()
e.create_session().prefill(p[:64])
s = e.create_session()
t0 = time.perf_counter(); s.prefill(p); pp = 256 / (time.perf_counter() - t0)
toks = rng.integers(0, 1000, 128).tolist()
t0 = time.perf_counter()
for t in toks: s.decode(t)
print(json.dumps({"pp": pp, "tg": 128 / (time.perf_counter() - t0), "expanded": e.sparse_expanded,
                  "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("-r", type=int, default=4, help="rounds")
    ap.add_argument("-t", type=int, default=2, help="threads")
    a = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "python"),
                                                         os.environ.get("PYTHONPATH", "")])}
    res: dict[str, list[dict]] = {m: [] for m in a.models}
    for r in range(a.r):
        for m in a.models:
            path, _, layout = m.partition("@")
            out = subprocess.run([sys.executable, "-c", RUN, path, str(a.t), layout or "auto"], capture_output=True,
                                 text=True, env=env, check=True).stdout
            res[m].append(json.loads(out.strip().splitlines()[-1]))
            x = res[m][-1]
            print(f"round {r + 1}: {Path(m).name}: pp {x['pp']:.1f} tok/s, tg {x['tg']:.1f} tok/s, "
                  f"{x['expanded']} tensors expanded, peak RSS {x['rss']:.0f} MB", flush=True)
    base = a.models[0]
    for m in a.models:
        pp = statistics.median(x["pp"] for x in res[m])
        tg = statistics.median(x["tg"] for x in res[m])
        pp0 = statistics.median(x["pp"] for x in res[base])
        tg0 = statistics.median(x["tg"] for x in res[base])
        rss = statistics.median(x["rss"] for x in res[m])
        print(f"{Path(m).name}: pp256 {pp:.1f} tok/s ({pp / pp0:.2f}x), tg128 {tg:.1f} tok/s ({tg / tg0:.2f}x), "
              f"file {Path(m.partition('@')[0]).stat().st_size / 1e6:.1f} MB, peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
