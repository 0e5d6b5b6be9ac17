"""Smoke test of `pocketlm bench` (not a timed test): a tiny random model, a few tokens, two
repetitions; the JSON has every key with sane values and the subcommand runs end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from testutil import make_hf_model

KEYS = ("pp_tok_s", "tg_tok_s", "ttft_s", "load_s", "peak_rss_mb", "loop_overhead_pct")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pocketlm.convert import convert

    d = tmp_path_factory.mktemp("bench")
    make_hf_model(d / "hf", "llama", seed=5)
    return convert(d / "hf", d / "tiny.plm", quant="int8", progress=False)


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def test_run_bench_reports_every_metric(tiny):
    from pocketlm.bench import BenchConfig, decode_weight_bytes, format_markdown, run_bench
    from pocketlm.bundle import read_bundle

    res = run_bench(BenchConfig(model=str(tiny), n_prompt=8, n_gen=4, depth=3, reps=2, threads=1), quiet=True)
    for k in KEYS:
        assert k in res and f"{k}_sd" in res, k
    for k in ("pp_tok_s", "tg_tok_s", "ttft_s", "load_s", "peak_rss_mb"):
        assert res[k] > 0 and res[f"{k}_sd"] >= 0, k
        assert len(res["samples"][k]) == 2
    assert res["loop_overhead_pct"] is not None
    assert (res["p"], res["n"], res["d"], res["r"], res["threads"]) == (8, 4, 3, 2, 1)
    assert res["kernels"] and res["activations"] and res["pocketlm_version"] and res["model"] == str(tiny)
    # decode reads every weight but the embeddings (untied here) plus one embedding row
    bundle = read_bundle(tiny)
    emb = bundle.info("token_embd.weight")
    expected = sum(t.nbytes for t in bundle.tensors) - emb.nbytes + emb.nbytes // emb.shape[0]
    assert res["decode_weight_bytes"] == decode_weight_bytes(bundle) == expected
    table = format_markdown(res)
    assert "pp8 @ d3" in table and "tg4 @ d3" in table and "load time" in table


def test_cli_bench_json_and_table(tiny, tmp_path):
    out = tmp_path / "b.json"
    r = cli("bench", tiny, "-p", 8, "-n", 4, "-r", 1, "-t", 1, "--no-load", "--json", out)
    assert "| pp8 |" in r.stdout and "| tg4 |" in r.stdout
    res = json.loads(out.read_text())
    assert res["pp_tok_s"] > 0 and res["tg_tok_s"] > 0 and res["load_s"] is None
    assert res["kv_type"] == "f16"
    r = cli("bench", tiny, "-p", 4, "-n", 0, "-r", 1, "--no-load", "--json", "-", "-q", "--activations", "int8",
            "--kv-type", "f32")
    res = json.loads(r.stdout)
    assert res["pp_tok_s"] > 0 and res["activations"] == "int8" and res["kv_type"] == "f32" and r.stderr == ""


def test_cli_bench_plot(tiny, tmp_path):
    png = tmp_path / "b.png"
    r = cli("bench", tiny, "-p", 4, "-n", 2, "-r", 1, "--no-load", "--plot", png, check=False)
    if importlib.util.find_spec("matplotlib") is None:
        assert r.returncode == 1 and r.stderr.startswith("pocketlm: error: ") and "pip install matplotlib" in r.stderr
        assert not png.exists()
    else:
        assert r.returncode == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_batch(tiny, tmp_path):
    """--batch: one row per batch size with aggregate and per-sequence decode speed (the keys
    bench/compare.py reads), and a table."""
    out = tmp_path / "batch.json"
    r = cli("bench", tiny, "--batch", "1,2,4", "-p", 6, "-n", 3, "-d", 2, "-r", 2, "-t", 1, "--json", out)
    assert "| B |" in r.stdout and "| 4 |" in r.stdout
    res = json.loads(out.read_text())
    rows = res["batched"]
    assert [row["batch"] for row in rows] == [1, 2, 4]
    for row in rows:
        for k in ("pp_tok_s", "tg_tok_s", "tg_tok_s_per_seq", "ttft_s"):
            assert row[k] > 0 and row[f"{k}_median"] > 0 and len(row["samples"][k]) == 2, k
        assert abs(row["tg_tok_s"] - row["batch"] * row["tg_tok_s_per_seq"]) <= 1e-6 * row["tg_tok_s"]
    assert rows[0]["tg_speedup_vs_b1"] == 1.0
    assert (res["p"], res["n"], res["d"], res["threads"]) == (6, 3, 2, 1)
    bad = cli("bench", tiny, "--batch", "0,2", check=False)
    assert bad.returncode == 2 and "batch sizes must be >= 1" in bad.stderr
