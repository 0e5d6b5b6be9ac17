"""`pocketlm batch` without Ray: every row answered once, in order, as the same prompt alone would be;
bad rows get their error and the job goes on; a killed job resumes with only the missing rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from batch_rows import alone, read_jsonl, write_jsonl
from testutil import child_env

N_TOKENS = 12


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    from pocketlm import Engine

    return Engine("smollm2", threads=2, max_context=512)


def _alone(engine, row: dict) -> str:
    return alone(engine, row, N_TOKENS)


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        if i % 3 == 2:
            rows.append({"id": f"p{i}", "prompt": f"Here is fact number {i} about the sea:"})
        else:
            rows.append({"id": i, "messages": [{"role": "user", "content": f"Name {i % 5 + 1} colours."}],
                         **({"max_tokens": 6} if i % 4 == 0 else {})})
    return rows


def test_rows_equal_their_greedy_answer_alone_in_input_order(engine, tmp_path):
    from pocketlm.batch import run_batch

    rows = _rows(10)
    write_jsonl(tmp_path / "in.jsonl", rows)
    summary = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, progress=False,
                        defaults={"max_tokens": N_TOKENS, "temperature": 0}, window=4)
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    assert summary["failed"] == 0 and summary["rows"] == len(rows)
    for row, got in zip(rows, out):
        assert got["error"] is None
        assert got["generated_text"] == _alone(engine, row), row
        assert got["num_generated_tokens"] == row.get("max_tokens", N_TOKENS) or got["finish_reason"] == "stop"
        assert got["num_input_tokens"] > 0
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_bad_rows_get_an_error_and_the_rest_are_answered(engine, tmp_path):
    from pocketlm.batch import run_batch

    good = {"id": "good", "prompt": "The capital of France is", "max_tokens": 5}
    lines = [json.dumps(good).encode(),
             json.dumps({"id": "none"}).encode(),                                   # no prompt
             json.dumps({"id": "int", "prompt": 7}).encode(),                       # wrong type
             json.dumps({"id": "msgs", "messages": "hello"}).encode(),              # wrong type
             json.dumps({"id": "temp", "prompt": "a", "temperature": "hot"}).encode(),
             json.dumps({"id": "neg", "prompt": "a", "temperature": -1}).encode(),  # refused by the engine
             json.dumps({"id": "long", "prompt": "word " * 2000}).encode(),         # longer than the context
             json.dumps({"prompt": "no id"}).encode(),
             b'{"id": "utf8", "prompt": "caf\xe9"}',                                 # not UTF-8
             b"not json",
             json.dumps({"id": "good2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).encode()]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, progress=False,
                        defaults={"temperature": 0})
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(lines) and summary["failed"] == len(lines) - 2
    by_id = {r["id"]: r for r in out if r["id"] is not None}
    assert by_id["good"]["generated_text"] == _alone(engine, good)
    assert by_id["good2"]["generated_text"] == _alone(engine, {"messages": [{"role": "user", "content": "Hi"}],
                                                               "max_tokens": 4})
    expected = {"none": "neither 'messages' nor 'prompt'", "int": "'prompt' must be a string",
                "msgs": "'messages' must be", "temp": "'temperature' must be", "neg": "temperature",
                "long": "the context holds 512"}
    for rid, text in expected.items():
        assert text in by_id[rid]["error"], by_id[rid]
        assert by_id[rid]["generated_text"] is None
    anonymous = [r["error"] for r in out if r["id"] is None]
    assert any("no usable 'id'" in e for e in anonymous)
    assert any("line 9 is not UTF-8" in e for e in anonymous)
    assert any("line 10 is not JSON" in e for e in anonymous)


def test_parquet_in_and_out_with_a_value_that_is_not_utf8(engine, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from pocketlm.batch import run_batch

    prompts = pa.array([b"Once upon a time", b"\xff\xfe broken", b"The sky is"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": prompts,
                             "max_tokens": pa.array([6, 6, 6], pa.int64())}), tmp_path / "in.parquet")
    run_batch(tmp_path / "in.parquet", tmp_path / "out.parquet", engine=engine, progress=False,
              defaults={"temperature": 0})
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [r["id"] for r in out] == ["a", "b", "c"]
    assert "column 'prompt' is not UTF-8" in out[1]["error"] and out[1]["generated_text"] is None
    assert out[0]["generated_text"] == _alone(engine, {"prompt": "Once upon a time", "max_tokens": 6})
    assert out[2]["generated_text"] == _alone(engine, {"prompt": "The sky is", "max_tokens": 6})


def test_embedding_rows_equal_engine_embed(engine, tmp_path):
    import numpy as np

    from pocketlm.batch import run_batch

    rows = [{"id": 1, "input": "a red apple"}, {"id": 2, "input": 3}, {"id": 3, "input": "the open sea"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, embed=True, progress=False)
    out = read_jsonl(tmp_path / "out.jsonl")
    reference = engine.embed(["a red apple", "the open sea"])
    np.testing.assert_allclose(out[0]["embedding"], reference[0], rtol=1e-6)
    np.testing.assert_allclose(out[2]["embedding"], reference[1], rtol=1e-6)
    assert "'input'" in out[1]["error"] and out[1]["embedding"] is None


def test_killed_job_resumes_with_only_the_missing_rows(engine, smollm2_gguf, tmp_path):
    rows = [{"id": i, "prompt": f"List {i} animals that live in the sea:", "max_tokens": 48} for i in range(24)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out, journal = tmp_path / "out.jsonl", tmp_path / "out.jsonl.partial"
    cmd = [sys.executable, "-m", "pocketlm", "batch", str(tmp_path / "in.jsonl"), "-o", str(out), "-t", "1",
           "-c", "512", "--temp", "0", "--batch-size", "2", "-q"]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {json.loads(line)["id"] for line in journal.read_bytes().splitlines() if line.endswith(b"}")}
    assert 4 <= len(done_before) < len(rows) and not out.exists()

    again = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "--resume" in again.stderr  # the journal is not thrown away silently
    resumed = subprocess.run([*cmd, "--resume"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} done before" in resumed.stderr
    result = read_jsonl(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]  # each id once, in input order
    assert not journal.exists()
    for row, got in zip(rows, result):
        assert got["generated_text"] == _alone(engine, row)
    # A finished OUTPUT resumed: nothing left to do
    third = subprocess.run([*cmd, "--resume"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and f"{len(rows)} done before" in third.stderr
    assert read_jsonl(out) == result


def test_cli_errors(tmp_path):
    env = child_env()
    run = [sys.executable, "-m", "pocketlm", "batch"]
    r = subprocess.run([*run, str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a"}\n')
    r = subprocess.run([*run, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.csv")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "unknown format" in r.stderr
    r = subprocess.run([*run, str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o.jsonl"), "--replicas", "2"],
                       env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "--ray" in r.stderr
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_hostile_values_fail_their_row_only(engine, tmp_path):
    """Values that broke whole jobs in review: a lone surrogate (in an id, a prompt, a message), a
    message field that is not JSON, ids that do not fit, pandas' floats for integers, a BOM."""
    from pocketlm.batch import run_batch

    lines = ['{"id": "ok1", "prompt": "The capital of France is", "max_tokens": 4.0}',
             '{"id": "\\ud800", "prompt": "a"}',
             '{"id": "sur", "prompt": "caf\\udce9"}',
             '{"id": "msg", "messages": [{"role": "user", "content": "x\\ud83d"}]}',
             '{"id": 36893488147419103232, "prompt": "big id"}',
             '{"id": "nan", "prompt": "a", "temperature": NaN}',
             '{"id": "ok2", "messages": [{"role": "user", "content": "Hi", "extra": {"a": 1}}], "max_tokens": 3}']
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, progress=False,
              defaults={"temperature": 0})
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(lines)
    assert out[0]["id"] == "ok1" and out[0]["generated_text"] == _alone(engine, {"prompt": "The capital of France is",
                                                                                "max_tokens": 4})
    assert out[1]["id"] is None and "no usable 'id'" in out[1]["error"]
    assert "not valid Unicode" in out[2]["error"] and "not valid Unicode" in out[3]["error"]
    assert out[4]["id"] is None and out[4]["error"]
    assert out[5]["id"] == "nan" and out[5]["generated_text"] is not None  # NaN: a missing value, the default
    assert out[6]["generated_text"] == _alone(engine, {"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3})


def test_parquet_nested_column_not_utf8_fails_its_row(engine, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from pocketlm.batch import run_batch

    content = pa.array([b"Hi", b"\xff bad"], pa.binary()).view(pa.string())
    message = pa.StructArray.from_arrays([pa.array(["user", "user"]), content], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), message)
    pq.write_table(pa.table({"id": ["a", "b"], "messages": messages, "max_tokens": [3, 3]}), tmp_path / "in.parquet")
    run_batch(tmp_path / "in.parquet", tmp_path / "out.jsonl", engine=engine, progress=False,
              defaults={"temperature": 0})
    out = read_jsonl(tmp_path / "out.jsonl")
    assert out[0]["generated_text"] == _alone(engine, {"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3})
    assert out[1]["id"] == "b" and "column 'messages' cannot be read" in out[1]["error"]


def test_resume_with_repeated_ids_answers_each_once(engine, tmp_path):
    from pocketlm.batch import Plan, run_batch

    rows = [{"id": "x", "prompt": "One", "max_tokens": 2}, {"id": "x", "prompt": "Two", "max_tokens": 2},
            {"id": 1, "prompt": "Three", "max_tokens": 2}, {"id": "1", "prompt": "Four", "max_tokens": 2}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    for output in ("out.jsonl", "out.parquet"):
        if output.endswith("parquet"):
            pytest.importorskip("pyarrow")
        run_batch(tmp_path / "in.jsonl", tmp_path / output, engine=engine, progress=False, defaults={"temperature": 0})
        plan = Plan(tmp_path / "in.jsonl", tmp_path / output, resume=True)
        assert plan.todo == [] and len(plan.keep) == 4, output  # nothing to redo, nothing dropped
        again = run_batch(tmp_path / "in.jsonl", tmp_path / output, engine=engine, progress=False, resume=True)
        assert again["skipped"] == 4


def test_small_engine_queue_and_one_job_per_output(smollm2_gguf, tmp_path):
    from pocketlm import Engine
    from pocketlm.batch import JobLock, run_batch
    from pocketlm.errors import InvalidInputError

    engine = Engine("smollm2", threads=2, max_context=256, max_batch=2, max_queue=1)
    rows = [{"id": i, "prompt": f"Number {i} is", "max_tokens": 3} for i in range(8)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, progress=False, window=16,
              defaults={"temperature": 0})
    assert all(r["error"] is None for r in read_jsonl(tmp_path / "out.jsonl"))
    with JobLock(tmp_path / "out.jsonl"):
        with pytest.raises(InvalidInputError, match="another job"):
            run_batch(tmp_path / "in.jsonl", tmp_path / "out.jsonl", engine=engine, progress=False)
    with pytest.raises(InvalidInputError, match="must not be INPUT"):
        run_batch(tmp_path / "in.jsonl", tmp_path / "in.jsonl", engine=engine, progress=False)
    (tmp_path / "array.jsonl").write_text('[{"id": 1, "prompt": "a"}]\n')
    with pytest.raises(InvalidInputError, match="JSON array"):
        run_batch(tmp_path / "array.jsonl", tmp_path / "o2.jsonl", engine=engine, progress=False)


def test_ray_flag_gives_back_a_swallowed_argument():
    import argparse

    from pocketlm.cli.main import _ray_address

    a = argparse.Namespace(ray="smollm2", models=[])
    _ray_address(a, "models")
    assert a.ray == "local" and a.models == ["smollm2"]
    a = argparse.Namespace(ray="qwen", models=["smollm2"])  # an explicit second model is kept
    _ray_address(a, "models")
    assert a.models == ["qwen", "smollm2"]
    for tagged in ("gemma:2", "registry:5000/ns/model:2", "hf-org/model:q4"):  # model references, not addresses
        a = argparse.Namespace(ray=tagged, models=[])
        _ray_address(a, "models")
        assert a.ray == "local" and a.models == [tagged]
    a = argparse.Namespace(ray="in.jsonl", input=None)
    _ray_address(a, "input")
    assert a.ray == "local" and a.input == "in.jsonl"
    for address in ("auto", "local", "ray://head:10001", "10.0.0.5:6379", "head-svc:6379", "[::1]:6379"):
        a = argparse.Namespace(ray=address, input="x.jsonl")
        _ray_address(a, "input")
        assert a.ray == address


def test_resume_twice_after_output_existed_keeps_each_row_once(engine, tmp_path):
    """A finished OUTPUT, a row added, a --resume killed (its journal holds OUTPUT's rows and new ones),
    then --resume again: each row once (a review found OUTPUT's rows kept twice)."""
    from pocketlm.batch import Journal, Plan, run_batch

    rows = [{"id": "a", "prompt": "One", "max_tokens": 2}, {"id": "b", "prompt": "Two", "max_tokens": 2}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_batch(tmp_path / "in.jsonl", out, engine=engine, progress=False, defaults={"temperature": 0})
    rows.append({"id": "c", "prompt": "Three", "max_tokens": 2})
    write_jsonl(tmp_path / "in.jsonl", rows)
    plan = Plan(tmp_path / "in.jsonl", out, resume=True)
    Journal(out, plan.keep).close()  # killed before its first new answer: the journal holds OUTPUT's rows
    run_batch(tmp_path / "in.jsonl", out, engine=engine, progress=False, resume=True, defaults={"temperature": 0})
    assert [r["id"] for r in read_jsonl(out)] == ["a", "b", "c"]


def test_resume_uses_the_journal_row_numbers(engine, tmp_path):
    """Repeated ids answered out of order (as Ray returns them): each answer stays with its own row."""
    from pocketlm.batch import Plan

    rows = [{"id": "a", "prompt": "p0"}, {"id": "a", "prompt": "p1"}, {"id": "a", "prompt": "p2"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text(json.dumps({"id": "a", "generated_text": "answer to p2", "_row": 2}) + "\n")
    plan = Plan(tmp_path / "in.jsonl", out, resume=True)
    assert [r["_row"] for r in plan.keep] == [2] and [i for i, _ in plan.todo] == [0, 1]
