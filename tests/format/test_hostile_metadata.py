"""Checksum-valid bundles whose metadata is well-formed JSON but hostile (issue 10 items 1, 7, 8):
numbers that would size the KV cache, a float parameter or a loop; text that would make the parser
recurse, allocate gigabytes or raise foreign exceptions. Each must give BundleError naming the file and
the entry through the API, and `pocketlm: error: ...` with exit status 1 from the CLI within a memory
bound (prlimit --as) and a time bound."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_craft import with_metadata
from testutil import child_env, make_hf_model
from pocketlm import Engine
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.errors import BundleError

# Address space for the CLI runs: the tiny model runs in 600 MiB; parsing the hostile metadata as
# before this fix took 1.7 GB of RSS (60 MB case) or crashed the stack (100k nesting).
CLI_ADDRESS_SPACE = 768 << 20
CLI_SECONDS = 60


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny llama bundle (hidden 64, 4 heads of 16, 2 KV heads, 2 layers, vocab 320, trained
    context 256): its bytes and its metadata text."""
    d = tmp_path_factory.mktemp("hostile")
    make_hf_model(d / "hf", "llama", seed=5)
    path = convert(d / "hf", d / "good.plm", quant="f32", progress=False)
    return path.read_bytes(), read_bundle(path).metadata


def with_config(**changes):
    def apply(meta):
        meta["config"].update(changes)
    return apply


def with_generation(**changes):
    def apply(meta):
        meta["generation"].update(changes)
    return apply


# case -> (metadata edit, what the message must say). Numbers as the hostile files had them.
CASES = {
    # item 1: the window near 2^63 that overflowed window + max_tokens - 1 into a tiny KV ring
    "sliding_window 2^63-5": (with_config(sliding_window=2**63 - 5), r"config.sliding_window: window 9223372036854775803 must be"),
    "layer_windows 2^63-5": (with_config(layer_windows=[2**63 - 5, 0]), r"config.layer_windows\[0\]: window 9223372036854775803"),
    "sliding_window 1e30": (with_config(sliding_window=1e30), r"config.sliding_window: window 1e\+30 must be"),
    "sliding_window 2^31": (with_config(sliding_window=2**31), r"config.sliding_window: window 2147483648"),
    "layer_windows longer than n_layers": (with_config(layer_windows=[0, 0, 0]), "layer_windows has 3 entries"),
    # the class: sizes, counts, float parameters
    "vocab_size 2^40": (with_config(vocab_size=2**40), r"config.vocab_size must be an integer in 1..16777216"),
    "max_position 0": (with_config(max_position=0), r"config.max_position must be an integer >= 1, got 0"),
    "max_position 2^62": (with_config(max_position=2**62), r"config.max_position must be an integer in"),
    "n_heads x head_dim too wide": (with_config(n_heads=4096, n_kv_heads=4096, head_dim=4096), "n_heads 4096 x head_dim 4096"),
    "rope_dim past head_dim": (with_config(rope_dim=32), r"config.rope_dim 32 must be even and at most head_dim \(16\)"),
    "rms_eps 1e-300": (with_config(rms_eps=1e-300), r"config.rms_eps must be a finite number > 0, in \[1e-12, 1\], got 1e-300"),
    "rms_eps NaN": (with_config(rms_eps=float("nan")), r"config.rms_eps must be a finite number > 0.*got nan"),
    "rms_eps Infinity": (with_config(rms_eps=float("inf")), r"config.rms_eps .*got inf"),
    "rope_theta -1": (with_config(rope_theta=-1.0), r"config.rope_theta must be a finite number > 0"),
    "llama3 factor 0": (with_config(rope_scaling={"type": "llama3", "factor": 0.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                        r"config.rope_scaling.factor must be a number in \[1e-06"),
    "llama3 low == high": (with_config(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                                     "high_freq_factor": 2.0, "original_max_position_embeddings": 64}),
                           "high_freq_factor 2.0 must be greater than low_freq_factor 2.0"),
    "linear factor NaN": (with_config(rope_scaling={"type": "linear", "factor": float("nan")}),
                          r"config.rope_scaling.factor must be a number"),
    "longrope factor 0": (with_config(rope_scaling={"type": "longrope", "original_max_position_embeddings": 64,
                                                    "short_factor": [1.0] * 8, "long_factor": [1.0] * 7 + [0.0]}),
                          r"config.rope_scaling.long_factor\[7\] must be a number"),
    "rope scaling yarn": (with_config(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling.type must be one of"),
    "final_softcap -1": (with_config(final_softcap=-1.0), "config.final_softcap must be a finite number > 0"),
    "query_pre_attn_scalar 1e-300": (with_config(query_pre_attn_scalar=1e-300), "config.query_pre_attn_scalar must be"),
    "tie_embeddings a string": (with_config(tie_embeddings="no"), "config.tie_embeddings must be true, false or null"),
    # item 6: generation defaults the sampler would refuse at the first generate()
    "top_k -5": (with_generation(top_k=-5), r"generation.top_k must be an integer in \[0, "),
    "top_p 0": (with_generation(top_p=0.0), r"generation.top_p must be a finite number in \(0, 1\]"),
    "temperature NaN": (with_generation(temperature=float("nan")), "generation.temperature must be a finite number"),
    "temperature -1": (with_generation(temperature=-1.0), r"generation.temperature must be a finite number in \[0, "),
    "max_tokens a string": (with_generation(max_tokens="512"), "generation.max_tokens must be an integer"),
    # NaN anywhere is named by its key, not by json
    "NaN in provenance": (lambda meta: meta["provenance"].update(score=float("nan")), "provenance.score is not a finite number"),
}

# Metadata texts json.dumps cannot produce: (build(good metadata text) -> text, message)
RAW_CASES = {
    "5000-digit sliding_window": (
        lambda text: text.replace('"max_position": 256', '"max_position": 256, "sliding_window": ' + "9" * 5000),
        "more than 40 digits"),
    "5000-digit provenance number": (
        lambda text: text.replace('"provenance": {', '"provenance": {"x": ' + "1" * 5000 + ", "),
        "more than 40 digits"),
    "nested 100k deep": (
        lambda text: text[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nests 100001 levels deep, more than the 32 allowed"),
    "60 MB of numbers": (
        lambda text: text[:-1] + ', "junk": [' + "1," * 30_000_000 + "1]}",
        "more than 200000 values outside strings"),
    "65 MiB string": (
        lambda text: text[:-1] + ', "junk": "' + "x" * (65 << 20) + '"}',
        r"metadata section is \d+ bytes, more than the 67108864 allowed"),
}


@pytest.fixture(scope="module")
def hostile(good, tmp_path_factory):
    """case -> the path of its bundle, made once (the API and CLI tests share the large ones)."""
    data, meta = good
    made: dict[str, Path] = {}

    def make(case: str) -> Path:
        if case not in made:
            if case in RAW_CASES:
                text = RAW_CASES[case][0](json.dumps(meta))
            else:
                edited = copy.deepcopy(meta)
                CASES[case][0](edited)
                text = json.dumps(edited)  # writes NaN / Infinity as bare literals, which json.loads accepts
            path = tmp_path_factory.mktemp("case") / "hostile.plm"
            path.write_bytes(bytes(with_metadata(data, text.encode())))
            made[case] = path
        return made[case]

    return make


def message(case: str) -> str:
    return (RAW_CASES.get(case) or CASES[case])[1]


@pytest.mark.parametrize("case", sorted(CASES) + sorted(RAW_CASES))
def test_api_raises_bundle_error_naming_file_and_entry(hostile, case):
    path = hostile(case)
    with pytest.raises(BundleError, match=message(case)) as err:
        Engine(path, threads=1, max_context=32)
    assert str(err.value).startswith(f"{path}: ")


CLI_CASES = ["sliding_window 2^63-5", "sliding_window 1e30", "rms_eps 1e-300", "llama3 factor 0",
             "temperature NaN", "5000-digit sliding_window", "nested 100k deep", "60 MB of numbers", "65 MiB string"]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_one_line_exit_1_within_memory_and_time(hostile, case):
    path = hostile(case)
    cmd = ["prlimit", f"--as={CLI_ADDRESS_SPACE}", sys.executable, "-m", "pocketlm", "run", str(path),
           "-p", "Hello", "-n", "4", "-t", "1", "-c", "256"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_SECONDS,
                       env=child_env())
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"pocketlm: error: {path}: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_real_metadata_shapes_pass():
    """The bounds leave room for the largest vocabularies: tokenizer.json is one string, so a
    262k-token vocabulary (13 MB as the converter stores Gemma 4's) counts only towards the size."""
    from pocketlm.metadata import MAX_METADATA_VALUES, parse_metadata

    tokenizer = json.dumps({"model": {"type": "BPE", "vocab": {f"tok{i}": i for i in range(262_144)}}})
    meta = {"format_version": 1, "tokenizer": {"type": "hf-json", "json": tokenizer},
            "provenance": {"requantized": [f"blk.{i}.ffn_down.weight" for i in range(2000)]}}
    assert parse_metadata(json.dumps(meta))["tokenizer"]["json"] == tokenizer
    assert tokenizer.count(",") > MAX_METADATA_VALUES


def test_executor_alone_keeps_a_huge_window_safe(hostile, good, tmp_path, monkeypatch):
    """Defence in depth: with the loader's config check switched off, the 2^63-5 window reaches the
    executor, which treats a window past the context as full attention: the logits of a prompt
    prefilled in several chunks equal those of the same weights without a window."""
    import numpy as np

    import pocketlm.metadata

    monkeypatch.setattr(pocketlm.metadata, "config_problem", lambda cfg: None)
    tokens = list(np.random.default_rng(0).integers(3, 320, 200))
    logits = {}
    for case in ("sliding_window 2^63-5", "layer_windows 2^63-5", None):
        path = hostile(case) if case else tmp_path / "plain.plm"
        if case is None:
            path.write_bytes(good[0])
        engine = Engine(path, threads=1, max_context=256, prefill_chunk=16, kv_type="f32")
        session = engine.create_session()
        assert session._state.kv_capacities == [256, 256]
        logits[case] = session.prefill(tokens)
    np.testing.assert_array_equal(logits["sliding_window 2^63-5"], logits[None])
    np.testing.assert_array_equal(logits["layer_windows 2^63-5"], logits[None])


# Stored RoPE frequency factors (rope_freqs.weight, Llama 3 GGUFs) divide the frequencies: 0 makes
# them infinite, a negative one or a NaN makes the RoPE table NaN. Weights, not metadata: the loader's
# RoPE check reads them, at conversion (the converter runs it before the rename) and at load.
FREQ_FACTORS = {"zero": [1.0] * 7 + [0.0], "negative": [-1.0] + [1.0] * 7, "NaN": [1.0, float("nan")] + [1.0] * 6}


def _write_with_freq_factors(good, folder: Path, factors, check=None) -> Path:
    import numpy as np

    from pocketlm.bundle import TensorSpec, write_bundle
    from pocketlm.dtypes import DType

    (folder / "good.plm").write_bytes(good[0])
    source = read_bundle(folder / "good.plm")
    meta = copy.deepcopy(good[1])
    meta["config"]["rope_freq_factors"] = True
    half = meta["config"]["rope_dim"] // 2
    tensors = [TensorSpec(t.name, t.dtype, t.shape, lambda t=t: source.tensor(t.name)) for t in source.tensors]
    tensors.append(TensorSpec("rope_freqs.weight", DType.F32, (half,), lambda: np.array(factors, np.float32)))
    path = folder / "factors.plm"
    write_bundle(path, meta, tensors, check=check)
    return path


def test_stored_frequency_factors_are_checked(good, tmp_path):
    path = _write_with_freq_factors(good, tmp_path, [1.0] * 8)
    assert Engine(path, threads=1, max_context=32).generate("Hi", max_tokens=1)


@pytest.mark.parametrize("case", sorted(FREQ_FACTORS))
def test_bad_frequency_factors_are_refused_at_conversion_and_at_load(good, tmp_path, case):
    from pocketlm.engine import check_loadable

    with pytest.raises(BundleError, match="not written, the loader would refuse it: the RoPE frequencies"):
        _write_with_freq_factors(good, tmp_path, FREQ_FACTORS[case], check=check_loadable)
    assert not (tmp_path / "factors.plm").exists()
    path = _write_with_freq_factors(good, tmp_path, FREQ_FACTORS[case])  # as a hostile author would
    with pytest.raises(BundleError, match="the RoPE frequencies .* are not all finite and > 0") as err:
        Engine(path, threads=1, max_context=32)
    assert str(err.value).startswith(f"{path}: ")
