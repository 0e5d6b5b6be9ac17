"""What encryption at rest costs: Engine() time and resident memory of a bundle and of the same bundle
sealed with `pocketlm encrypt`, each in a fresh process, alternating, medians.

    python bench/encryption_cost.py [--model BUNDLE.plm] [--runs 5]

Prints per run: load seconds, RSS after load, RSS after 16 generated tokens (VmRSS, and its file-
backed and shared-memory parts: a plain bundle's weights are file pages, a decrypted one's are in
anonymous shared memory). Default model: Qwen2.5-Coder-0.5B's bundle from the conversion cache."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
t = time.perf_counter()
from pocketlm import Engine
e = Engine(sys.argv[1], threads=2, decryption_key=sys.argv[2] if len(sys.argv) > 2 else None)
load = time.perf_counter() - t
def rss():
    f = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmRSS", "RssFile", "RssShmem", "RssAnon"))}
    return {k: v / 1024 for k, v in f.items()}
after_load = rss()
"".join(e.generate("def quicksort(arr):", max_tokens=16, temperature=0))
print(json.dumps({"load": load, "after_load": after_load, "after_gen": rss()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    cache = Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")) / "bundles"
    model = a.model or sorted(cache.glob("qwen2.5-coder-0.5b-instruct-q4_k_m-*.plm"))[0]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text(os.urandom(32).hex())
        sealed = Path(tmp) / "model.plm.enc"
        subprocess.run([sys.executable, "-m", "pocketlm", "encrypt", str(model), "-o", str(sealed), "--key",
                        f"file:{key}"], env=env, check=True, capture_output=True)
        runs: dict[str, list[dict]] = {"plain": [], "encrypted": []}
        print(f"model {model.name} ({model.stat().st_size / 1e6:.1f} MB); {a.runs} runs, alternating")
        for i in range(a.runs):
            for kind in (("plain", "encrypted") if i % 2 == 0 else ("encrypted", "plain")):
                args = [str(model)] if kind == "plain" else [str(sealed), f"file:{key}"]
                p = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
                if p.returncode:
                    sys.exit(p.stderr[-2000:])
                r = json.loads(p.stdout.strip().splitlines()[-1])
                runs[kind].append(r)
                print(f"run {i + 1} {kind:9s} load {r['load']:.3f} s  RSS after load {r['after_load']['VmRSS']:.0f} MB "
                      f"(file {r['after_load']['RssFile']:.0f}, shmem {r['after_load']['RssShmem']:.0f})  after 16 tokens "
                      f"{r['after_gen']['VmRSS']:.0f} MB", flush=True)
        med = {k: {"load": statistics.median(x["load"] for x in v),
                   "rss_load": statistics.median(x["after_load"]["VmRSS"] for x in v),
                   "rss_gen": statistics.median(x["after_gen"]["VmRSS"] for x in v)} for k, v in runs.items()}
        for k, v in med.items():
            print(f"median {k:9s} load {v['load']:.3f} s  RSS after load {v['rss_load']:.0f} MB  after 16 tokens "
                  f"{v['rss_gen']:.0f} MB")
        print(f"encrypted / plain: load {med['encrypted']['load'] / med['plain']['load']:.2f}x, RSS after load "
              f"{med['encrypted']['rss_load'] / med['plain']['rss_load']:.2f}x, after 16 tokens "
              f"{med['encrypted']['rss_gen'] / med['plain']['rss_gen']:.2f}x")


if __name__ == "__main__":
    main()
