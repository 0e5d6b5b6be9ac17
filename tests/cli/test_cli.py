"""The command line end to end, as a user runs it (`python -m pocketlm ...` in a subprocess),
on a tiny random model converted from a transformers checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from testutil import make_hf_model


def cli(*args, input=None, check=True, env=None):
    r = subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                       input=input, timeout=300, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    make_hf_model(d / "hf", "llama", seed=3)
    out = d / "tiny.plm"
    r = cli("convert", d / "hf", "-o", out, "--quant", "int8")
    assert out.exists() and str(out) in r.stdout
    return out


def test_convert_shows_progress_and_writes_bundle(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen2", seed=4)
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "q.plm", "--quant", "int4", "--group-size", "64")
    assert "100%" in r.stderr or "tensors" in r.stderr
    r = cli("inspect", tmp_path / "q.plm")
    assert "q4_0_g64" in r.stdout and "qwen2" in r.stdout and "q8_0" in r.stdout  # the embeddings / head


def test_convert_head_int4(tmp_path):
    """--head int4: the embeddings and head take the linears' 4-bit type (no q8_0 left); refused
    clearly where it means nothing, before anything is written."""
    make_hf_model(tmp_path / "hf", "qwen2", seed=4)
    cli("convert", tmp_path / "hf", "-o", tmp_path / "q.plm", "--quant", "int4", "--group-size", "64", "--head", "int4")
    r = cli("inspect", tmp_path / "q.plm")
    assert "q4_0_g64" in r.stdout and "q8_0" not in r.stdout and "head" in r.stdout
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "f.plm", "--head", "int4", check=False)
    assert r.returncode == 1 and "--head int4 applies to --quant int4 and int8" in r.stderr
    assert not (tmp_path / "f.plm").exists()


def test_inspect_verify_and_graph(model):
    r = cli("inspect", model, "--verify", "--graph")
    assert "verify: OK" in r.stdout
    for name in ("fold_constants", "last_position_only", "fuse_parallel_matmuls", "fuse_add_rms_norm"):
        assert f"after {name}" in r.stdout
    assert "naive sum" in r.stdout and "matmul_multi" in r.stdout


def test_inspect_verify_detects_corruption(model, tmp_path):
    bad = tmp_path / "bad.plm"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # inside the data section: only --verify can see it
    bad.write_bytes(data)
    r = cli("inspect", bad, "--verify", check=False)
    assert r.returncode == 1 and "checksum mismatch" in r.stderr


def test_run_greedy_matches_python_api_and_prints_stats(model):
    from pocketlm.engine import Engine

    engine = Engine(model, threads=1, max_context=128)
    prompt = "The quick brown"
    expected = "".join(engine.generate(prompt, max_tokens=12, temperature=0))
    r = cli("run", model, "-p", prompt, "-n", 12, "--temp", 0, "-t", 2, "-c", 128)
    assert r.stdout == prompt + expected + "\n"
    stats = r.stderr.strip().splitlines()[-1]
    for key in ("prompt", "prefill", "decode", "ttft", "peak RSS"):
        assert key in stats
    stopped = engine.create_session()
    list(stopped.generate(prompt, max_tokens=12, temperature=0))
    if stopped.last_stats.finish_reason == "length":  # not at EOS: run says why
        assert "[stopped after 12 tokens: the -n limit]" in r.stderr
    r = cli("run", model, "-p", prompt, "-n", 500, "--temp", 0, "-t", 2, "-c", 16)
    small = Engine(model, threads=1, max_context=16).create_session()
    list(small.generate(prompt, max_tokens=500, temperature=0))
    assert ("[stopped: the context of 16 tokens is full (-c)]" in r.stderr) == (small.last_stats.finish_reason == "context")


def test_run_reads_prompt_from_stdin(model):
    r = cli("run", model, "-n", 4, "--temp", 0, "--no-echo", input="To be, or not")
    assert r.returncode == 0 and "decode" in r.stderr


def test_chat_one_shot_and_repl(model):
    r = cli("chat", model, "-p", "hello", "-n", 8, "--temp", 0)
    assert r.returncode == 0
    r = cli("chat", model, "-n", 4, "--temp", 0, input="hi\n/reset\nhello again\n/exit\n")
    assert r.returncode == 0


def test_errors_are_one_line_and_nonzero(tmp_path):
    r = cli("run", tmp_path / "missing.plm", "-p", "x", check=False)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    junk = tmp_path / "junk.plm"
    junk.write_bytes(b"not a bundle at all" * 10)
    r = cli("inspect", junk, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "x.plm", check=False)
    assert r.returncode == 1 and "mamba" in r.stderr and not (tmp_path / "x.plm").exists()


def test_context_overflow_is_a_clear_error(model):
    r = cli("run", model, "-p", "word " * 200, "-n", 4, "-c", 32, check=False)
    assert r.returncode == 1 and "context" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "-t", "1000"], "argument -t/--threads: invalid value '1000': must be between 1 and 64"),
    (["run", "-t", "0"], "argument -t/--threads: invalid value '0': must be between 1 and 64 (leave -t out"),
    (["chat", "-t", "-1"], "argument -t/--threads: invalid value '-1'"),
    (["run", "-t", "two"], "argument -t/--threads: invalid int value: 'two'"),
    (["run", "-c", "0"], "argument -c/--ctx-size: invalid value '0': must be at least 1"),
    (["run", "-n", "-1"], "argument -n/--n-predict: invalid value '-1': must be 0 or more"),
    (["run", "--temp", "-1"], "argument --temp: invalid value '-1': must be a number >= 0"),
    (["run", "--temp", "nan"], "argument --temp: invalid value 'nan'"),
    (["chat", "--top-p", "2"], "argument --top-p: invalid value '2': must be in (0, 1]"),
    (["chat", "--top-p", "0"], "argument --top-p: invalid value '0'"),
    (["run", "--top-k", "-5"], "argument --top-k: invalid value '-5': must be 0 or more"),
    (["run", "--min-p", "1.5"], "argument --min-p: invalid value '1.5': must be in [0, 1]"),
    (["run", "--repeat-penalty", "0"], "argument --repeat-penalty: invalid value '0': must be a number > 0"),
    (["inspect", "x.plm", "--chunk", "0"], "argument --chunk: invalid value '0': must be at least 1"),
    (["perplexity", "-b", "0"], "argument -b/--batch-size: invalid value '0'"),
    (["bench", "-t", "65"], "argument -t/--threads: invalid value '65'"),
    (["bench", "-r", "0"], "argument -r/--reps: invalid value '0': must be at least 1"),
    (["bench", "-p", "0"], "argument -p/--n-prompt: invalid value '0': must be at least 1"),
    (["bench", "-n", "-1"], "argument -n/--n-gen: invalid value '-1': must be 0 or more"),
    (["run", "--kv-type", "q4_1"], "argument --kv-type: invalid choice: 'q4_1'"),
    (["bench", "--kv-type", "bf16"], "argument --kv-type: invalid choice: 'bf16'"),
    (["perplexity", "--kv-type", "f8"], "argument --kv-type: invalid choice: 'f8'"),
])
def test_bad_option_values_are_argparse_errors(args, message):
    r = cli(*args, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"pocketlm {args[0]}: error: {message}" in r.stderr.splitlines()[-1]


def test_option_ranges_accept_their_limits():
    from pocketlm.cli.main import build_parser

    a = build_parser().parse_args(["run", "-t", "64", "-c", "1", "-n", "0", "--temp", "0", "--top-p", "1",
                                   "--top-k", "0", "--min-p", "0", "--repeat-penalty", "1.1"])
    assert (a.threads, a.ctx_size, a.n_predict, a.temp, a.top_p, a.top_k, a.min_p) == (64, 1, 0, 0.0, 1.0, 0, 0.0)
    assert build_parser().parse_args(["run"]).threads is None  # the default: physical cores


def test_kv_type_option_reaches_the_engine(model):
    from pocketlm.engine import Engine

    prompt = "The quick brown"
    for kv in ("f32", "f16"):
        engine = Engine(model, threads=1, max_context=128, kv_type=kv)
        assert engine.create_session()._state.kv_type == kv
        expected = "".join(engine.generate(prompt, max_tokens=8, temperature=0))
        r = cli("run", model, "-p", prompt, "-n", 8, "--temp", 0, "-c", 128, "--kv-type", kv)
        assert r.stdout == prompt + expected + "\n"
    assert Engine(model, max_context=32).kv_type == "f16"  # the default, as llama.cpp's
    with pytest.raises(ValueError, match="kv_type must be one of f16, f32, q8_0, got 'q4_1'"):
        Engine(model, max_context=32, kv_type="q4_1")


def test_engine_rejects_zero_threads_instead_of_defaulting(model):
    from pocketlm.engine import Engine

    with pytest.raises(ValueError, match="threads must be between 1 and 64, got 0"):
        Engine(model, threads=0, max_context=32)
    assert Engine(model, max_context=32).threads >= 1


def test_missing_files_are_one_line_errors(model, tmp_path):
    missing = tmp_path / "nonexistent.txt"
    r = cli("run", model, "-f", missing, "-n", 1, check=False)
    assert r.returncode == 1 and r.stderr == f"pocketlm: error: {missing}: No such file or directory\n"
    r = cli("perplexity", model, "-f", missing, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and str(missing) in r.stderr
    assert r.stderr.count("\n") == 1


def test_value_errors_reach_the_user_as_one_line(model, monkeypatch, capsys):
    import pocketlm.engine
    from pocketlm.cli.main import main

    def engine(*args, **kwargs):
        raise ValueError("something the user can fix")

    monkeypatch.setattr(pocketlm.engine, "Engine", engine)
    assert main(["run", str(model), "-p", "x"]) == 1
    assert capsys.readouterr().err == "pocketlm: error: something the user can fix\n"


def test_tokenize_json_and_chat_template(model, tmp_path):
    import json

    from pocketlm.engine import Engine

    engine = Engine(model, threads=1, max_context=128)
    tok = engine.tokenizer
    r = cli("tokenize", model, "The quick brown fox", "--show-count")
    ids = tok.encode("The quick brown fox")
    assert r.stdout.splitlines() == [f"{i:6d} -> {tok.decode([i])!r}" for i in ids] + [f"Total number of tokens: {len(ids)}"]
    r = cli("tokenize", model, "hi <|im_end|>", "--ids", "--no-bos", "--parse-special")
    assert json.loads(r.stdout) == tok.encode("hi <|im_end|>", add_special_tokens=False, parse_special=True)
    # run --json: one object, the text the Python API gives
    expected = "".join(engine.generate("The quick brown", max_tokens=8, temperature=0))
    out = json.loads(cli("run", model, "-p", "The quick brown", "-n", 8, "--temp", 0, "-c", 128, "--json").stdout)
    assert out["text"] == expected and out["finish_reason"] in ("stop", "length")
    assert out["stats"]["generated_tokens"] <= 8 and out["stats"]["decode_tok_s"] >= 0
    # --chat-template FILE: the run answers as an engine given that template
    template = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
    custom = Engine(model, threads=1, max_context=128, chat_template=template)
    assert custom.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n[assistant] "
    s = custom.create_session()
    want = "".join(s.chat([{"role": "user", "content": "hi"}], max_tokens=6, temperature=0))
    r = cli("run", model, "-p", "hi", "--chat", "-n", 6, "--temp", 0, "-c", 128, "--chat-template", tmp_path / "t.jinja")
    assert r.stdout == want + "\n"
    (tmp_path / "bad.jinja").write_text("{% for %}", encoding="utf-8")
    r = cli("run", model, "-p", "hi", "--chat", "--chat-template", tmp_path / "bad.jinja", check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("pocketlm: error: ")


def test_a_hugging_face_folder_is_a_model_reference(model, tmp_path, monkeypatch):
    """run and inspect take the checkpoint folder itself: converted once into the cache (f16), then reused."""
    from pocketlm.convert.cache import cached_path
    from pocketlm.engine import Engine

    folder = model.parent / "hf"
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))  # (the children inherit it)
    r = cli("run", folder, "-p", "The quick", "-n", 6, "--temp", 0, "-c", 64)
    bundle = cached_path(folder)
    assert bundle.exists()
    expected = "".join(Engine(bundle, threads=1, max_context=64).generate("The quick", max_tokens=6, temperature=0))
    assert r.stdout == "The quick" + expected + "\n"
    mtime = bundle.stat().st_mtime_ns
    r = cli("inspect", folder)
    assert r.returncode == 0 and bundle.stat().st_mtime_ns == mtime  # not converted again


def test_list_and_rm(model, tmp_path, monkeypatch):
    from pocketlm.convert.cache import cached_path

    folder = model.parent / "hf"
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    assert "no cached bundles" in cli("list").stdout
    cli("inspect", folder)  # converts it into the cache
    bundle = cached_path(folder)
    out = cli("list").stdout
    assert bundle.name in out and "(hf)" in out and "smollm2" in out  # the bundle, its source; the known names
    r = cli("rm", model, check=False)  # a file outside the cache is never removed
    assert r.returncode == 1 and "no such bundle in the cache" in r.stderr and model.exists()
    assert cli("rm", folder).stdout.strip() == f"removed {bundle.name}" and not bundle.exists()
    cli("inspect", folder)
    assert cli("rm", bundle.name).stdout.strip() == f"removed {bundle.name}" and not bundle.exists()
    r = cli("rm", bundle.name, check=False)
    assert r.returncode == 1 and r.stderr.startswith("pocketlm: error: ")


def test_tokenize_one_argument_is_the_text():
    r = cli("tokenize", "Hello world", "--ids")
    from pocketlm.engine import Engine

    assert json.loads(r.stdout) == Engine("smollm2", threads=1, max_context=64).tokenizer.encode("Hello world")
