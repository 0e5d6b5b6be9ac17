"""Instructions an aarch64 matmul executes, per kernel variant, counted under QEMU (speed cannot be
measured under emulation; executed instructions are the proxy issue 16 asks for). QEMU runs the
kernel tests' server (scripts/test-arm.sh builds it) with one instruction per translation block and
logs every block it executes (`-singlestep -d exec,nochain`): the log's lines are the
instructions. Each figure is a run with the call made twice minus a run with it made once, so
start-up and the protocol cancel out. What stays in besides the kernel: the copy of the weights off
the pipe (~1 % here) and the call's activation quantization (the reference's, the same on every
variant).

    python bench/arm_insn.py [--server ~/.cache/pocketlm/arm/kernel_server-*] [--rows 4864 --cols 896]

The x86 column is the same server built for this machine (`--x86`, with the CMake build's per-file
flags) counted by valgrind's callgrind (Ir), AVX2 variant: valgrind runs no AVX-512, so the
AVX-512 kernels are not counted.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "tests" / "kernels"))

from remote import RemoteKernels  # noqa: E402

from pocketlm.dtypes import DType  # noqa: E402
from pocketlm.quant import quantize  # noqa: E402


def run_calls(command: str, calls: int, variant: str, dtype: DType, raw, rows: int, cols: int, x) -> None:
    """The server under `command` makes the matmul call `calls` times, then exits."""
    k = RemoteKernels(command)
    try:
        for _ in range(calls):
            k.matmul(variant, int(dtype), raw, rows, cols, x)
    finally:
        k.close()


def count_arm(server, calls: int, *call) -> int:
    """aarch64 instructions executed: QEMU logs one line per instruction with -singlestep -d exec."""
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "exec.log"
        run_calls(f"qemu-aarch64-static -cpu max -singlestep -d exec,nochain -D {log} {server}", calls, *call)
        with open(log, "rb") as f:
            return sum(chunk.count(b"\nTrace ") for chunk in iter(lambda: f.read(1 << 24), b""))


def count_x86(server, calls: int, *call) -> int:
    """x86 instructions executed: callgrind's total Ir."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "callgrind.out"
        run_calls(f"valgrind -q --tool=callgrind --callgrind-out-file={out} {server}", calls, *call)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in callgrind's output")


def per_call(counter, server, *call) -> int:
    """One call's instructions: a run making it twice minus a run making it once."""
    return counter(server, 2, *call) - counter(server, 1, *call)


X86_FLAGS = ["-O3", "-std=c++17", f"-I{REPO / 'csrc'}", "-DPLM_X86=1", "-fno-math-errno"]
AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]


def build_x86_server(out: Path) -> Path:
    """tests/kernels/kernel_server.cpp with the x86 kernels, each file with its CMake flags."""
    out.mkdir(parents=True, exist_ok=True)
    k = REPO / "csrc" / "kernels"
    units = [(REPO / "tests" / "kernels" / "kernel_server.cpp", []), (k / "ref" / "kernels_ref.cpp", []),
             (k / "dispatch.cpp", [])]
    for name in ("kernels_avx2", "gemm_avx2", "x16_avx2", "sparse_avx2"):
        units.append((k / "x86" / f"{name}.cpp", AVX2))
        for vnni, flags in ((1, AVX2 + ["-mavxvnni"]), (2, AVX2 + ["-mavx512f", "-mavx512vl", "-mavx512vnni"])):
            wrapper = out / f"vnni{vnni}_{name}.cpp"
            wrapper.write_text(f'#define PLM_AVX2_VNNI {vnni}\n#include "kernels/x86/{name}.cpp"\n')
            units.append((wrapper, flags))
    for name in ("kernels_avx512", "gemm_avx512", "x16_avx512"):
        units.append((k / "x86" / f"{name}.cpp", AVX512))
    units.append((k / "x86" / "sparse_avx512.cpp", AVX512 + ["-mavx512vbmi", "-mavx512vbmi2"]))
    procs, objects = [], []
    for i, (src, flags) in enumerate(units):
        obj = out / f"{i}.o"
        objects.append(str(obj))
        procs.append(subprocess.Popen(["g++", *X86_FLAGS, *flags, "-c", str(src), "-o", str(obj)]))
    if any(p.wait() for p in procs):
        sys.exit("building the x86 kernel server failed")
    subprocess.run(["g++", *objects, "-o", str(out / "kernel_server"), "-lpthread"], check=True)
    return out / "kernel_server"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = sorted(glob.glob(os.path.expanduser("~/.cache/pocketlm/arm/kernel_server-*")))
    ap.add_argument("--server", default=default[-1] if default else None)
    ap.add_argument("--rows", type=int, default=4864)
    ap.add_argument("--cols", type=int, default=896)
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--types", default="q4_0_x16,q8_0_x16")
    ap.add_argument("--x86", action="store_true", help="add this machine's AVX2 kernels, counted by callgrind")
    a = ap.parse_args()
    if not a.server:
        sys.exit("no kernel server: run scripts/test-arm.sh first")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((a.rows, a.cols)).astype(np.float32)
    print(f"# executed aarch64 instructions per matmul call, [{a.rows} x {a.cols}] weights (qemu -cpu max)")
    x86 = build_x86_server(Path(tempfile.mkdtemp())) if a.x86 else None
    print("| type | tokens | neon | dotprod | i8mm |" + (" x86 avx2 |" if x86 else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if x86 else ""))
    for label in a.types.split(","):
        dtype = DType.from_label(label)
        if dtype.sparse:  # 2:4 by magnitude
            g = w.copy().reshape(a.rows, a.cols // 4, 4)
            np.put_along_axis(g, np.argsort(np.abs(g), axis=-1)[..., :2], 0.0, axis=-1)
            raw = quantize(g.reshape(a.rows, a.cols), dtype)
        else:
            raw = quantize(w, dtype)
        for T in (int(t) for t in a.tokens.split(",")):
            x = rng.standard_normal((T, a.cols)).astype(np.float32)
            cells = []
            runs = [(count_arm, a.server, v) for v in ("neon", "dotprod", "i8mm")]
            runs += [(count_x86, x86, "avx2")] if x86 else []
            for counter, server, variant in runs:
                n = per_call(counter, server, variant, dtype, raw, a.rows, a.cols, x)
                cells.append(f"{n / 1e6:.2f} M")
            print(f"| {label} | {T} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
