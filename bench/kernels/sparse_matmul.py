"""One matmul of a 2:4-sparse type against its dense twin on the same weights, one thread, through
pocketlm._core.kernels: the time per call (median of alternating rounds) over 16 copies of the
weights, so that each call reads them cold from memory (docs/performance.md "Sparse weights").

    python bench/kernels/sparse_matmul.py [--type q4_0_24_x16|i8_24_x16] [--variant avx512] [-T 1]
                                          [--levels 1|2] [--rows 4864 --cols 896]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from pocketlm._core import kernels  # noqa: E402
from pocketlm.dtypes import DType  # noqa: E402
from pocketlm.quant import quantize  # noqa: E402

DENSE = {DType.Q4_0_24_X16: DType.Q4_0_X16, DType.I8_24_X16: DType.I8_X16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--type", default="q4_0_24_x16", choices=[d.label for d in DENSE])
    ap.add_argument("--variant", default="avx512")
    ap.add_argument("-T", type=int, default=1, help="tokens per call")
    ap.add_argument("--levels", type=int, default=1, choices=[1, 2], help="activation levels (matmul / matmul2)")
    ap.add_argument("--rows", type=int, default=4864)
    ap.add_argument("--cols", type=int, default=896)
    ap.add_argument("-r", type=int, default=15, help="rounds")
    a = ap.parse_args()
    sparse = DType.from_label(a.type)
    dense = DENSE[sparse]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.rows, a.cols)).astype(np.float32)
    g = w.reshape(a.rows, a.cols // 4, 4)
    np.put_along_axis(g, np.argsort(np.abs(g), axis=-1)[..., :2], 0.0, axis=-1)  # 2:4 by magnitude
    copies = 16
    raws = {dt: [quantize(w, dt).copy() for _ in range(copies)] for dt in (dense, sparse)}
    x = rng.standard_normal((a.T, a.cols)).astype(np.float32)
    fn = kernels.matmul if a.levels == 1 else kernels.matmul2
    times: dict[DType, list[float]] = {dense: [], sparse: []}
    for _ in range(a.r):
        for dt in (dense, sparse):
            t0 = time.perf_counter()
            for raw in raws[dt]:
                fn(a.variant, int(dt), raw, a.rows, a.cols, x, 0, a.rows)
            times[dt].append((time.perf_counter() - t0) / copies)
    td, ts = statistics.median(times[dense]), statistics.median(times[sparse])
    bd, bs = raws[dense][0].size, raws[sparse][0].size
    print(f"{a.variant}, {a.levels} level(s), T={a.T}, [{a.rows} x {a.cols}]: {dense.label} {td * 1e3:.3f} ms "
          f"({bd / td / 1e9:.1f} GB/s), {sparse.label} {ts * 1e3:.3f} ms ({bs / ts / 1e9:.1f} GB/s): "
          f"{td / ts:.2f}x the speed for {bd / bs:.2f}x fewer bytes")


if __name__ == "__main__":
    main()
