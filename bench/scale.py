"""The scale-out targets (docs/scale.md, docs/performance.md "Scale-out on Ray"): SmolLM2-135M, 64
chat prompts x 64 tokens.

    python bench/scale.py replicas [--runs 3]   # 2-node simulated cluster, 2 CPUs a node: 1 vs 2 one-thread replicas
    python bench/scale.py overhead [--runs 3]   # pocketlm batch vs pocketlm batch --ray, one node, equal threads
    python bench/scale.py serve [--seconds 120] [--kill-at 40]  # 16 streaming clients vs serve --ray --replicas 2
    python bench/scale.py driver [--rows 100000]   # the driver's own work a row: read and check, journal, OUTPUT

`replicas` and `overhead` alternate the configurations in one run and print each run and the
medians; the timed part is the job (the cluster is up, as on a real cluster; Ray's start is
reported apart). Both also run Ray's floor: the same Ray Data job (the same rows, blocks, actor
pool and CPUs) with an actor that answers every row at once without an engine (`FloorActor`):
its time is what Ray itself costs a job of these rows (the actor's worker process and imports,
scheduling, the rows' way there and back), whatever the actor does. From it each mode prints an
estimated ceiling for its target's ratio (docs/scale.md says how); `replicas` also times the same
prompts on one and two one-thread engines outside Ray. Each configuration starts after a 1 s pause
(settle()), so that none overlaps the exit of the previous job's actors. `serve` starts `pocketlm serve --ray --replicas 2` (a local Ray), runs 16 clients
that stream chat answers back to back, kills one replica's process at --kill-at seconds (0: never)
and prints the errors and the tokens/s per 5 s window, and how long after the kill the rate was
back to 90 % of its rate before."""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scale"))
from ray_processes import replica_pids  # noqa: E402
PROMPTS = 64
TOKENS = 64
TOPICS = ["the sea", "a lighthouse", "bread", "winter", "a violin", "the moon", "trains", "a garden"]


def prompts(n: int = PROMPTS) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": f"Write a short story about {TOPICS[i % 8]} "
                                                              f"and the number {i}."}],
             "max_tokens": TOKENS, "temperature": 0} for i in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_input(folder: Path, n: int = PROMPTS) -> Path:
    return write_rows(folder / "prompts.jsonl", prompts(n))


class FloorActor:
    """`batch --ray`'s actor without the engine: every row answered at once with an empty answer.
    Defined in __main__, so Ray ships it by value: no pocketlm import in the actor."""

    def __init__(self, **_):
        self.ready = time.time()

    def __call__(self, batch):
        import pyarrow as pa

        keys = batch.column("_row").to_pylist()
        return pa.table({"_row": pa.array(keys, pa.int64()), "_out": pa.array(['{}'] * len(keys), pa.string()),
                         "_ready": pa.array([self.ready] * len(keys), pa.float64())})


def floor_job(src: Path, *, replicas: int, threads: int, batch_size: int, address=None) -> tuple[float, float]:
    """Ray's floor for the job of `src` (FloorActor in `batch --ray`'s pipeline): (seconds for the
    whole job, seconds until the first actor was ready)."""
    from pocketlm import batch as _batch
    from pocketlm.ray.data import _run_on_ray

    started = time.time()  # where batch --ray starts its clock for startup_seconds (before its rows)
    t = time.perf_counter()
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    items = [{"_row": key, "_job": json.dumps(job)} for key, job in _batch.jobs(enumerate(rows), {}, False)]
    answered = list(_run_on_ray(items, "unused", address=address, replicas=replicas, threads=threads,
                                batch_size=batch_size, embed=False, engine_kwargs=None, window=None,
                                actor=FloorActor))
    dt = time.perf_counter() - t
    assert sorted(key for key, _, _ in answered) == list(range(len(items))), "the floor job lost rows"
    return dt, min(ready for _, _, ready in answered) - started


ENGINE_ALONE = """
import sys, time
from pocketlm.batch import run_batch
from pocketlm.engine import Engine
engine = Engine(sys.argv[1], threads=1, max_context=512)
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
run_batch(sys.argv[2], sys.argv[3], engine=engine, progress=False)
print(time.perf_counter() - t, flush=True)
"""


def engines_without_ray(folder: Path, model: str, engines: int, n: int) -> float:
    """The n prompts split over `engines` one-thread engines in as many processes, outside Ray (the
    cluster's processes stay up beside them), all loaded before any starts: the longest of their
    times from the start to their last row. What the engines themselves reach on this machine."""
    procs = []
    per = -(-n // engines)
    try:
        for e in range(engines):
            part = write_rows(folder / f"alone{e}-in.jsonl", prompts(n)[e * per:(e + 1) * per])
            procs.append(subprocess.Popen([sys.executable, "-c", ENGINE_ALONE, model, str(part),
                                           str(folder / f"alone{e}-out.jsonl")],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("an engine outside Ray did not load")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        times = [float(p.stdout.readline()) for p in procs]
        for p in procs:
            p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if sum(tokens_of(folder / f"alone{e}-out.jsonl") for e in range(engines)) != n * TOKENS:
        raise RuntimeError("the engines outside Ray did not generate every token")
    return max(times)


def settle(seconds: float = 1.0) -> None:
    """A pause before each measured configuration, so that it does not overlap the exit of the
    previous one's processes (a Ray job's actors exit after it)."""
    time.sleep(seconds)


def compile_package() -> None:
    """Byte-compile pocketlm as `pip install` does, so that actors do not compile its sources on
    import (this tree may be used without __pycache__, under PYTHONDONTWRITEBYTECODE)."""
    import compileall

    import pocketlm

    compileall.compile_dir(str(Path(pocketlm.__file__).parent), quiet=1)


def tokens_of(output: Path) -> int:
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return sum(r["num_generated_tokens"] for r in rows)


def cmd_replicas(a) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pocketlm.ray.data import run_batch_on_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    print(f"two-node cluster up in {time.perf_counter() - t0:.1f} s")
    compile_package()
    alone: dict[int, list[float]] = {1: [], 2: []}
    rates: dict[int, list[float]] = {1: [], 2: []}
    engine_rates: dict[int, list[float]] = {1: [], 2: []}
    times: dict[int, list[float]] = {1: [], 2: []}
    floors: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as d:
        src = write_input(Path(d), a.prompts)
        # untimed: a driver's first Ray Data job also starts Ray Data's own actors (its stats actor,
        # autoscaling coordinator...), ~1 s more, once per driver
        floor_job(src, replicas=1, threads=1, batch_size=a.batch_size, address=cluster.address)
        for run in range(a.runs):
            for engines in ((1, 2) if run % 2 == 0 else (2, 1)):
                settle()
                alone[engines].append(engines_without_ray(Path(d), a.model, engines, a.prompts))
                print(f"run {run + 1}: {engines} engine(s) x 1 thread outside Ray: {alone[engines][-1]:.2f} s "
                      f"(from all loaded to the last row)")
            for replicas in ((1, 2) if run % 2 == 0 else (2, 1)):
                settle()
                dt, ready = floor_job(src, replicas=replicas, threads=1, batch_size=a.batch_size,
                                      address=cluster.address)
                floors[replicas].append(dt)
                print(f"run {run + 1}: {replicas} replica(s), Ray's floor (no engine): {dt:.2f} s "
                      f"(first actor ready at {ready:.2f} s)")
            for replicas in ((1, 2) if run % 2 == 0 else (2, 1)):
                out = Path(d) / f"out{replicas}.jsonl"
                settle()
                t = time.perf_counter()
                summary = run_batch_on_ray(src, out, a.model, address=cluster.address, replicas=replicas, threads=1,
                                           batch_size=a.batch_size, progress=False,
                                           engine_kwargs={"max_context": 512})
                dt = time.perf_counter() - t
                n = tokens_of(out)
                out.unlink()
                start = summary["startup_seconds"]
                rates[replicas].append(n / dt)
                times[replicas].append(dt)
                engine_rates[replicas].append(n / (dt - start))
                print(f"run {run + 1}: {replicas} replica(s) x 1 thread: {n} tokens in {dt:.2f} s = {n / dt:.1f} tok/s; "
                      f"Ray's start-up {start:.2f} s, then {n / (dt - start):.1f} tok/s")
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    e1, e2 = statistics.median(engine_rates[1]), statistics.median(engine_rates[2])
    paired = statistics.median(t1 / t2 for t1, t2 in zip(times[1], times[2]))
    print(f"median, whole job: 1 replica {one:.1f} tok/s, 2 replicas {two:.1f} tok/s: {two / one:.2f}x; median of "
          f"the runs' own ratios {paired:.2f}x (target >= 1.6x)")
    print(f"median, first engine loaded to last row: 1 replica {e1:.1f} tok/s, 2 replicas {e2:.1f} tok/s: {e2 / e1:.2f}x")
    t1, t2 = statistics.median(times[1]), statistics.median(times[2])
    f1, f2 = statistics.median(floors[1]), statistics.median(floors[2])
    a1, a2 = statistics.median(alone[1]), statistics.median(alone[2])
    print(f"median, Ray's floor (the same job, actors without an engine): 1 replica {f1:.2f} s, 2 replicas {f2:.2f} s; "
          f"whole jobs {t1:.2f} s and {t2:.2f} s; above the floor: {t1 - f1:.2f} s vs {t2 - f2:.2f} s = "
          f"{(t1 - f1) / (t2 - f2):.2f}x; engines outside Ray: 1 engine {a1:.2f} s, 2 engines {a2:.2f} s = "
          f"{a1 / a2:.2f}x")
    # were the replicas' work above the floor to scale as two engines outside Ray do, run by run
    ceilings = [r1 / (g2 + (r1 - g1) * b2 / b1) for r1, g1, g2, b1, b2 in
                zip(times[1], floors[1], floors[2], alone[1], alone[2])]
    print(f"estimated ceiling of the whole-job ratio (the 2-replica job = its floor + the 1-replica job's work above "
          f"its floor, sped up as much as engines outside Ray): {f2 + (t1 - f1) * a2 / a1:.2f} s = "
          f"{t1 / (f2 + (t1 - f1) * a2 / a1):.2f}x from the medians; run by run "
          f"{' '.join(f'{c:.2f}' for c in ceilings)}, median {statistics.median(ceilings):.2f}x")
    ray.shutdown()
    cluster.shutdown()


def cmd_overhead(a) -> None:
    from pocketlm.batch import run_batch
    from pocketlm.engine import Engine
    from pocketlm.ray.data import init_ray, run_batch_on_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t = time.perf_counter()
    init_ray(None)
    print(f"local Ray started in {time.perf_counter() - t:.1f} s (not in the times below)")
    compile_package()
    times: dict[str, list[float]] = {"local": [], "ray": [], "floor": []}
    start: dict[str, list[float]] = {"local": [], "ray": [], "floor": []}  # engine load; Ray's start-up
    tokens = {}
    with tempfile.TemporaryDirectory() as d:
        src = write_input(Path(d), a.prompts)
        floor_job(src, replicas=1, threads=a.threads, batch_size=a.batch_size)  # untimed, as in cmd_replicas
        for run in range(a.runs):
            for kind in (("local", "ray", "floor") if run % 2 == 0 else ("floor", "ray", "local")):
                out = Path(d) / f"{kind}.jsonl"
                settle()
                if kind == "floor":
                    dt, ready = floor_job(src, replicas=1, threads=a.threads, batch_size=a.batch_size)
                    times[kind].append(dt)
                    start[kind].append(ready)
                    print(f"run {run + 1}: floor {dt:.2f} s: Ray alone, the actor answering without an engine "
                          f"(ready at {ready:.2f} s)")
                    continue
                t = time.perf_counter()
                if kind == "local":  # the whole job, engine load included, as the Ray job's actor loads one
                    engine = Engine(a.model, threads=a.threads, max_context=512, max_batch=a.batch_size)
                    start[kind].append(time.perf_counter() - t)
                    run_batch(src, out, engine=engine, progress=False)
                    dt = time.perf_counter() - t  # OUTPUT written; the engine's teardown is not timed,
                    engine.scheduler.close()      # as the Ray job does not wait for its actor's
                    del engine
                else:
                    summary = run_batch_on_ray(src, out, a.model, replicas=1, threads=a.threads,
                                               batch_size=a.batch_size, progress=False,
                                               engine_kwargs={"max_context": 512, "max_batch": a.batch_size})
                    dt = time.perf_counter() - t
                    start[kind].append(summary["startup_seconds"])
                tokens[kind] = tokens_of(out)
                out.unlink()
                times[kind].append(dt)
                print(f"run {run + 1}: {kind:5s} {tokens[kind]} tokens in {dt:.2f} s = {tokens[kind] / dt:.1f} tok/s "
                      f"(start-up {start[kind][-1]:.2f} s)")
    local, on_ray = statistics.median(times["local"]), statistics.median(times["ray"])
    s_local, s_ray = statistics.median(start["local"]), statistics.median(start["ray"])
    rows = a.prompts
    paired = statistics.median(lo / r for lo, r in zip(times["local"], times["ray"]))
    print(f"median, whole job: batch {local:.2f} s, batch --ray {on_ray:.2f} s: --ray reaches "
          f"{local / on_ray:.2f}x of the tokens/s without Ray; median of the runs' own ratios {paired:.2f}x "
          f"(target >= 0.85x)")
    print(f"start-up: engine load {s_local:.2f} s without Ray; Ray's {s_ray:.2f} s (actor process, imports, engine); "
          f"after it: {(local - s_local) / (on_ray - s_ray):.2f}x, Ray's overhead "
          f"{((on_ray - s_ray) - (local - s_local)) / rows * 1000:.1f} ms a row; whole job: "
          f"{(on_ray - local) / rows * 1000:.1f} ms a row")
    floor, s_floor = statistics.median(times["floor"]), statistics.median(start["floor"])
    ceilings = [lo / (lo + f) for lo, f in zip(times["local"], start["floor"])]
    print(f"Ray's floor: {floor:.2f} s a job, its actor ready at {s_floor:.2f} s. Estimated ceiling, were the actor's "
          f"work (engine load and rows) to take no longer than `batch`'s and start when the floor's actor is ready: "
          f"{local + s_floor:.2f} s = {local / (local + s_floor):.2f}x from the medians; run by run "
          f"{' '.join(f'{c:.2f}' for c in ceilings)}, median {statistics.median(ceilings):.2f}x (0.85x needs the actor "
          f"ready within {local / 0.85 - local:.2f} s)")


def cmd_serve(a) -> None:
    import openai

    from pocketlm.ray.serve import free_port

    port = free_port("127.0.0.1")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", a.model, "--ray", "--replicas", "2", "-t", "1",
                             "-c", "1024", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while "listening on" not in Path(log.name).read_text():
            if proc.poll() is not None:
                sys.exit(Path(log.name).read_text())
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        start = time.monotonic()
        stop_at = start + a.seconds
        events: list[tuple[float, int]] = []  # (time, 1) per token received
        results: list[tuple[float, float, str]] = []  # (start, end, "ok" | error text)
        lock = threading.Lock()

        def client_loop(c: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                t = time.monotonic()
                try:
                    stream = client.chat.completions.create(
                        model=a.model, max_tokens=TOKENS, temperature=0, stream=True,
                        messages=[{"role": "user", "content": f"Story {c}-{i} about {TOPICS[(c + i) % 8]}."}])
                    for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            with lock:
                                events.append((time.monotonic(), 1))
                    outcome = "ok"
                except openai.APIError as e:
                    outcome = f"{type(e).__name__}: {e}"
                with lock:
                    results.append((t, time.monotonic(), outcome))
                i += 1

        threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        killed_at = None
        if a.kill_at:
            time.sleep(max(0.0, start + a.kill_at - time.monotonic()))
            pids = replica_pids()
            os.kill(pids[0], signal.SIGKILL)
            killed_at = time.monotonic()
            print(f"killed replica pid {pids[0]} at {killed_at - start:.1f} s")
        for t in threads:
            t.join(a.seconds + 180)
        hung = sum(t.is_alive() for t in threads)
        errors = [r for r in results if r[2] != "ok"]
        print(f"{len(results)} requests, {len(errors)} errors, {hung} clients hung")
        for r in errors[:5]:
            print(f"  error at {r[0] - start:.1f}-{r[1] - start:.1f} s: {r[2][:160]}")
        if killed_at is not None:
            in_flight = [r for r in results if r[0] <= killed_at <= r[1]]
            print(f"requests in flight at the kill: {len(in_flight)} (all replicas); failed: {len(errors)}, "
                  f"all of them in flight at the kill: {all(r[0] <= killed_at <= r[1] for r in errors)}")
        window = 5.0
        bins: dict[int, int] = {}
        for t, n in events:
            bins[int((t - start) // window)] = bins.get(int((t - start) // window), 0) + n
        rates = [bins.get(b, 0) / window for b in range(int(a.seconds // window))]
        print("tokens/s per 5 s window: " + " ".join(f"{r:.0f}" for r in rates))
        if killed_at is not None:
            k = int((killed_at - start) // window)
            before = statistics.median(rates[1:k]) if k > 1 else rates[0]
            back = next((b for b in range(k + 1, len(rates)) if rates[b] >= 0.9 * before), None)
            after = "never" if back is None else f"{(back * window) - (killed_at - start):.0f}-" \
                                                 f"{(back + 1) * window - (killed_at - start):.0f} s"
            print(f"rate before the kill {before:.0f} tok/s; back to 90 % of it: {after} after the kill")
        else:
            print(f"median rate {statistics.median(rates[1:]):.0f} tok/s")
    finally:
        proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        status = proc.wait(120)
        print(f"serve exited {status} {time.monotonic() - t:.1f} s after SIGTERM; replicas left: {replica_pids()}")
        os.unlink(log.name)


def cmd_driver(a) -> None:
    """The driver's work per row, no model: read and check INPUT, journal an answer, write OUTPUT."""
    from pocketlm import batch

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        src = write_input(folder, a.rows)
        t0 = time.perf_counter()
        plan = batch.Plan(src, folder / "out.jsonl", False)
        items = [{"_row": k, "_job": json.dumps(j)} for k, j in batch.jobs(plan.todo, {}, False)]
        t1 = time.perf_counter()
        journal = batch.Journal(folder / "out.jsonl", [])
        answer = {"id": 0, "generated_text": "x" * 300, "finish_reason": "length", "num_input_tokens": 40,
                  "num_generated_tokens": TOKENS, "error": None}
        for k in range(len(items)):
            journal.write(k, json.loads(json.dumps({**answer, "id": k})))  # as an answer comes back from Ray
        journal.close()
        t2 = time.perf_counter()
        batch.finish_output(folder / "out.jsonl", batch.GENERATE_COLUMNS)
        t3 = time.perf_counter()
    n = a.rows
    print(f"{n} rows: read and check {1e6 * (t1 - t0) / n:.1f} us a row, journal {1e6 * (t2 - t1) / n:.1f} us, "
          f"OUTPUT {1e6 * (t3 - t2) / n:.1f} us: {n / (t3 - t0):.0f} rows/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for name in ("replicas", "overhead"):
        s = sub.add_parser(name)
        s.add_argument("--runs", type=int, default=3)
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--model", default="smollm2")
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--prompts", type=int, default=PROMPTS)
    s = sub.add_parser("serve")
    s.add_argument("--seconds", type=float, default=120)
    s.add_argument("--kill-at", type=float, default=0)
    s.add_argument("--model", default="smollm2")
    s = sub.add_parser("driver")
    s.add_argument("--rows", type=int, default=100_000)
    a = p.parse_args()
    {"replicas": cmd_replicas, "overhead": cmd_overhead, "serve": cmd_serve, "driver": cmd_driver}[a.what](a)


if __name__ == "__main__":
    main()
