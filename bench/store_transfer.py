"""Push and pull of one bundle through a real registry on 127.0.0.1 (Debian's docker-registry), timed
for pocketlm against oras-py (the ORAS project's Python client, PyPI `oras`) and skopeo (Debian's Go
client of containers/image), the same blob each time, in alternating order, each command a fresh
process; prints each run and the medians, and the ratios to pocketlm.

    python bench/store_transfer.py [--model BUNDLE.plm] [--runs 5]

Default model: Qwen2.5-Coder-0.5B's bundle from the conversion cache. The issue's target: pocketlm's
time at most 1/0.8 of oras's (docs/performance.md "Model store transfers")."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "store"))
from registries import REGISTRY, Registry  # noqa: E402


def default_model() -> Path:
    cache = Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")) / "bundles"
    found = sorted(cache.glob("qwen2.5-coder-0.5b-instruct-q4_k_m-*.plm"))
    if not found:
        sys.exit("no Qwen2.5-Coder-0.5B bundle cached: pocketlm run it once, or pass --model")
    return found[0]


def timed(cmd: list[str], env: dict) -> float:
    os.sync()  # the last run's dirty pages written back first: each run starts from the same state
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode:
        sys.exit(f"{' '.join(cmd[:4])}... failed: {p.stderr[-2000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-skopeo", action="store_true")
    a = ap.parse_args()
    if REGISTRY is None:
        sys.exit("needs docker-registry (apt-get install docker-registry)")
    model = a.model or default_model()
    work = Path(tempfile.mkdtemp(prefix="plm-transfer-"))
    reg = Registry(work / "registry")
    py = sys.executable
    env = dict(os.environ, POCKETLM_STORE=str(work / "store"), PYTHONPATH=os.pathsep.join(sys.path))
    tools = ["pocketlm", "oras"] + ([] if a.no_skopeo or not shutil.which("skopeo") else ["skopeo"])
    try:
        subprocess.run([py, "-m", "pocketlm", "tag", str(model), "src"], env=env, check=True, capture_output=True)
        layout = work / "layout"
        subprocess.run([py, "-m", "pocketlm", "push", "src", f"oci:{layout}:v1", "-q"], env=env, check=True,
                       capture_output=True)
        times: dict[str, list[float]] = {f"{t} {d}": [] for d in ("push", "pull") for t in tools}
        print(f"model {model.name}: {model.stat().st_size / 1e6:.1f} MB; registry {reg.host}; {a.runs} runs")
        for i in range(a.runs):
            order = tools if i % 2 == 0 else tools[::-1]
            for t in order:
                ref = f"{reg.host}/{t}{i}/model:v1"
                if t == "pocketlm":
                    subprocess.run([py, "-m", "pocketlm", "tag", "src", ref], env=env, check=True, capture_output=True)
                    cmd = [py, "-m", "pocketlm", "push", ref, "--plain-http", "-q"]
                elif t == "oras":
                    cmd = [py, "-c", "import sys, oras.client; c = oras.client.OrasClient(insecure=True); "
                           f"c.push(target={ref!r}, files=[{str(model)!r}], disable_path_validation=True)"]
                else:  # skopeo remembers where blobs were and mounts them from there: forget, so it uploads
                    for cache in (Path.home() / ".local/share/containers/cache", Path("/var/lib/containers/cache")):
                        shutil.rmtree(cache, ignore_errors=True)
                    cmd = ["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{ref}"]
                times[f"{t} push"].append(timed(cmd, env))
            for t in order:
                ref = f"{reg.host}/{t}{i}/model:v1"
                out = work / f"pull-{t}"
                if t == "pocketlm":
                    penv = dict(env, POCKETLM_STORE=str(out))
                    cmd = [py, "-m", "pocketlm", "pull", ref, "--plain-http", "-q"]
                elif t == "oras":
                    penv = env
                    cmd = [py, "-c", "import oras.client; c = oras.client.OrasClient(insecure=True); "
                           f"c.pull(target={ref!r}, outdir={str(out)!r})"]
                else:
                    penv = env
                    cmd = ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:v1"]
                times[f"{t} pull"].append(timed(cmd, penv))
                shutil.rmtree(out, ignore_errors=True)
            print(f"run {i + 1}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
        print("medians (s) and pocketlm's time as a share of each peer's (<= 1.25 meets 'at >= 80% of oras'):")
        for d in ("push", "pull"):
            ours = statistics.median(times[f"pocketlm {d}"])
            line = f"  {d}: pocketlm {ours:.2f}"
            for t in tools[1:]:
                theirs = statistics.median(times[f"{t} {d}"])
                line += f"  {t} {theirs:.2f} (pocketlm/{t} {ours / theirs:.2f}x)"
            mb = model.stat().st_size / 1e6
            print(line + f"  [pocketlm {mb / ours:.0f} MB/s]")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
