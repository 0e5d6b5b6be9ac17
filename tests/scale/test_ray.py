"""pocketlm on a real Ray cluster of two simulated nodes (ray.cluster_utils.Cluster, 2 CPUs each):
`pocketlm batch --ray`, a node lost mid-job, the ray.data.llm processor shape, and `pocketlm serve
--ray` driven by the official openai client and by Ray Data's HttpRequestProcessorConfig, with a
replica killed under load and SIGTERM tearing it down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from batch_rows import alone, read_jsonl, write_jsonl
from ray_processes import replica_pids
from testutil import child_env

ray = pytest.importorskip("ray", reason="Ray is the optional extra pocketlm[ray] (scripts/test.sh installs it)")
pytest.importorskip("ray.data")

N_TOKENS = 10
CTX = 512


@pytest.fixture(scope="module")
def cluster(smollm2_gguf, tmp_path_factory):
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback
    # the nodes' model store (their workers inherit this environment): models pulled by a test go there
    os.environ["POCKETLM_STORE"] = str(tmp_path_factory.mktemp("node-store"))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()
    del os.environ["POCKETLM_STORE"]


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    from pocketlm import Engine

    return Engine("smollm2", threads=1, max_context=CTX)


def _alone(engine, row: dict) -> str:
    return alone(engine, row, N_TOKENS)


def _rows(n: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": f"Give {i % 7 + 2} words that rhyme with cat."}]}
            if i % 2 else {"id": f"r{i}", "prompt": f"Chapter {i}. The ship left the harbour and"} for i in range(n)]


def test_batch_on_two_nodes_equals_each_prompt_alone(cluster, reference, tmp_path):
    from pocketlm.ray.data import run_batch_on_ray

    rows = _rows(12) + [{"id": "bad", "prompt": 3}, {"id": "long", "prompt": "word " * 1000}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_batch_on_ray(tmp_path / "in.jsonl", tmp_path / "out.jsonl", "smollm2", address=cluster.address,
                               replicas=2, threads=1, batch_size=3, progress=False,
                               defaults={"max_tokens": N_TOKENS, "temperature": 0},
                               engine_kwargs={"max_context": CTX})
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert summary["failed"] == 2
    for row, got in zip(rows[:12], out):
        assert got["error"] is None and got["generated_text"] == _alone(reference, row), (row, got)
    assert "'prompt' must be a string" in out[12]["error"]
    assert "the context holds 512" in out[13]["error"]


def test_a_node_lost_mid_job_every_id_once_texts_unchanged(cluster, reference, tmp_path):
    """One 2-CPU engine per node; the worker node is removed while rows are in flight and a fresh
    node joins: Ray restarts the lost actor there and retries its batches."""
    from pocketlm.ray.data import run_batch_on_ray

    rows = [{"id": i, "prompt": f"Story {i}: the old lighthouse keeper"} for i in range(24)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    journal = tmp_path / "out.jsonl.partial"
    result: dict = {}

    def job():
        try:
            result["summary"] = run_batch_on_ray(
                tmp_path / "in.jsonl", tmp_path / "out.jsonl", "smollm2", address=cluster.address, replicas=2,
                threads=2, batch_size=2, progress=False, defaults={"max_tokens": N_TOKENS, "temperature": 0},
                engine_kwargs={"max_context": CTX})
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (journal.exists() and len(journal.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    worker = next(n for n in cluster.worker_nodes)
    cluster.remove_node(worker)
    done_at_loss = len(journal.read_text().splitlines())
    print(f"rows answered when the node was removed: {done_at_loss} of {len(rows)}")
    assert done_at_loss < len(rows)
    cluster.add_node(num_cpus=2)
    thread.join(240)
    assert not thread.is_alive(), "the job did not finish after the node was replaced"
    assert "error" not in result, result.get("error")
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]  # every id exactly once
    for row, got in zip(rows, out):
        assert got["generated_text"] == _alone(reference, row)


def test_nodes_pull_a_registry_reference_once(cluster, reference, tmp_path):
    """The model given as a reference to a registry on 127.0.0.1 (Debian's docker-registry): each node
    pulls it into its store (checked against its digests) before its actors load it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "store"))
    from registries import Registry, need_registry

    from pocketlm.engine import resolve_model_path
    from pocketlm.ray.data import run_batch_on_ray
    from pocketlm.store import Store, push

    need_registry()
    registry = Registry(tmp_path / "registry")
    try:
        ref = f"{registry.host}/test/smollm2:q4_1"
        source = Store(tmp_path / "source-store")
        source.add_model(ref, resolve_model_path("smollm2"))
        push(ref, store=source, plain_http=True)
        node_store = Store(os.environ["POCKETLM_STORE"])
        assert not any(name == ref for name, _ in node_store.entries())
        rows = _rows(4)
        write_jsonl(tmp_path / "in.jsonl", rows)
        run_batch_on_ray(tmp_path / "in.jsonl", tmp_path / "out.jsonl", ref, address=cluster.address, replicas=2,
                         threads=1, batch_size=2, progress=False, defaults={"max_tokens": N_TOKENS, "temperature": 0},
                         engine_kwargs={"max_context": CTX, "registry": {"plain_http": True}})
        out = read_jsonl(tmp_path / "out.jsonl")
        assert [r["generated_text"] for r in out] == [_alone(reference, r) for r in rows]
        assert any(name == ref for name, _ in node_store.entries())
    finally:
        registry.stop()


def test_processor_has_ray_data_llm_shape(cluster, reference):
    import ray.data
    from ray.data.llm import build_processor as ray_build_processor

    from pocketlm.ray import PocketLMPredictor, PocketLMProcessorConfig, build_processor

    questions = ["What is the sea?", "Name a fruit.", "Say hello."]
    config = PocketLMProcessorConfig(model_source="smollm2", concurrency=1, batch_size=2,
                                     engine_kwargs={"max_context": CTX})

    def pre(row):
        return {"messages": [{"role": "user", "content": row["q"]}],
                "sampling_params": {"temperature": 0, "max_tokens": N_TOKENS}}

    def post(row):
        return {"q": row["q"], "answer": row["generated_text"], "n": row["num_generated_tokens"]}

    expected = {q: _alone(reference, {"messages": [{"role": "user", "content": q}]}) for q in questions}
    for build in (build_processor, ray_build_processor):  # ours, and Ray's own builder (registered)
        processor = build(config, preprocess=pre, postprocess=post)
        got = processor(ray.data.from_items([{"q": q} for q in questions])).take_all()
        assert {r["q"]: r["answer"] for r in got} == expected
        assert all(0 < r["n"] <= N_TOKENS for r in got)

    ds = ray.data.from_items([{"prompt": "Chapter 1. The ship left the harbour and", "max_tokens": N_TOKENS,
                               "temperature": 0}])
    got = ds.map_batches(PocketLMPredictor, fn_constructor_kwargs={"model": "smollm2",
                                                                  "engine_kwargs": {"max_context": CTX}},
                         batch_size=4, batch_format="pyarrow", num_cpus=1,
                         compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    assert got[0]["generated_text"] == _alone(reference, {"prompt": "Chapter 1. The ship left the harbour and"})
    assert got[0]["error"] is None and got[0]["prompt"].startswith("Chapter 1")


def _ray_metric(name: str) -> float:
    """The sum over the cluster's nodes of pocketlm's Ray metric `name` (Ray's Prometheus export)."""
    import re
    import urllib.request

    total = 0.0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            for line in r.read().decode().splitlines():
                if re.match(rf"ray_pocketlm_{name}[{{ ]", line):
                    total += float(line.rsplit(" ", 1)[1])
    return total


def test_serve_on_ray(cluster, reference, tmp_path):
    openai = pytest.importorskip("openai")
    import ray.data
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    from pocketlm.ray.serve import free_port

    port = free_port("127.0.0.1")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "pocketlm", "serve", "smollm2", "--ray", cluster.address,
                             "--replicas", "2", "-t", "1", "-c", str(CTX), "--port", str(port)],
                            env=child_env(RAY_AUTH_MODE="disabled"), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "listening on" not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
        messages = [{"role": "user", "content": "Name three colours."}]
        expected = _alone(reference, {"messages": messages})
        answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=N_TOKENS,
                                                temperature=0)
        assert answer.choices[0].message.content == expected
        # the replicas' Ray metrics (each node's Prometheus export) count what the client was told
        deadline = time.monotonic() + 40
        while _ray_metric("requests_total") < 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert _ray_metric("requests_total") == 1
        assert _ray_metric("generated_tokens_total") == answer.usage.completion_tokens
        assert _ray_metric("prompt_tokens_total") == answer.usage.prompt_tokens
        assert _ray_metric("time_to_first_token_seconds_count") == 1
        stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=N_TOKENS,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected

        # Prefix affinity: each conversation's second turn goes to the replica that answered its first,
        # whose prefix cache holds it (OpenAI's cached_tokens); by chance 6 of 6 would be 1 in 64
        firsts = []
        for c in range(6):
            system = f"You are assistant number {c}. " + "You answer briefly and kindly about the sea. " * 8
            history = [{"role": "system", "content": system}, {"role": "user", "content": f"Hello, I am {c}."}]
            r = client.chat.completions.create(model="smollm2", messages=history, max_tokens=4, temperature=0)
            firsts.append((history, r.choices[0].message.content))
        for history, reply in firsts:
            follow = [*history, {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
            r = client.chat.completions.create(model="smollm2", messages=follow, max_tokens=4, temperature=0)
            cached = r.usage.prompt_tokens_details.cached_tokens
            assert 64 < cached < r.usage.prompt_tokens, (cached, r.usage)

        # Ray Data's own HTTP processor against the endpoint
        http = build_processor(
            HttpRequestProcessorConfig(url=f"http://127.0.0.1:{port}/v1/chat/completions", batch_size=2,
                                       concurrency=1),
            preprocess=lambda row: {"payload": {"model": "smollm2", "messages": row["messages"],
                                                "max_tokens": N_TOKENS, "temperature": 0}},
            postprocess=lambda row: {"text": row["http_response"]["choices"][0]["message"]["content"]})
        got = http(ray.data.from_items([{"messages": messages}] * 2)).take_all()
        assert [r["text"] for r in got] == [expected, expected]

        # A replica killed under load: only its requests fail, with an OpenAI error; the rest go on
        replicas = replica_pids()
        assert len(replicas) == 2
        outcomes: list = []

        def one(i: int):  # even clients stream, odd ones wait for whole answers
            t0 = time.monotonic()
            try:
                messages = [{"role": "user", "content": f"Tell story {i}."}]
                if i % 2 == 0:
                    s = client.chat.completions.create(model="smollm2", max_tokens=200, temperature=0, stream=True,
                                                       messages=messages)
                    text = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
                else:
                    text = client.chat.completions.create(model="smollm2", max_tokens=200, temperature=0,
                                                          messages=messages).choices[0].message.content
                outcomes.append(("ok", text, t0, time.monotonic(), None))
            except openai.APIError as e:
                status = getattr(e, "status_code", None)
                outcomes.append(("error", str(e), t0, time.monotonic(), (status, getattr(e, "code", None))))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(replicas[0], signal.SIGKILL)
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a client hung after its replica died"
        errors = [o for o in outcomes if o[0] == "error"]
        print(f"requests failed with the killed replica: {len(errors)} of {len(outcomes)}: "
              f"{[(e[1][:60], e[4]) for e in errors]}")
        assert len(outcomes) == 8 and 0 < len(errors) < 8, outcomes
        for _, text, start, end, (status, code) in errors:
            assert start <= killed_at <= end  # in flight when the replica died
            assert "the replica serving this request failed" in text
            assert status in (None, 502) and code in (None, "replica_failed")  # a stream's error event, or a 502
        assert any(e[4][0] == 502 and e[4][1] == "replica_failed" for e in errors) or \
            all(o[4] is None for o in errors)
        # Serve replaces the replica; requests succeed again
        deadline = time.monotonic() + 60
        while len(replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=N_TOKENS,
                                                temperature=0)
        assert answer.choices[0].message.content == expected
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert status == 0, (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 30
    while replica_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert replica_pids() == [], "replicas of ours are left behind"
