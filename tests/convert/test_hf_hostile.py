"""Hostile Hugging Face checkpoints (issue 10, after review): config.json values that size a list while
the model module reads the config, values quoted in messages, values outside the loader's ranges, and
sampling defaults the sampler would refuse. Each hostile value gives a BundleError naming the file and
the config.json key, through the Python API and as one `pocketlm: error:` line from the CLI within a
memory bound (prlimit --as); nothing is left behind.

The folders are written by hand (config.json, a small safetensors file, the tiny tokenizer): the
checks run before any tensor is read, so most need no real weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert_fixtures import hf_models  # noqa: F401
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.errors import BundleError

MEMORY_LIMIT = 2 << 30  # bytes of address space for the CLI runs: 2^32 layers was 32 GB of list
CLI_TIMEOUT = 60
BIG = "x" * (10 << 20)  # a 10 MB string

_COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6)

# Architectures whose config reader builds one list item per layer (layer types, windows).
LAYER_LIST_ARCHS = {
    "gemma2": dict(_COMMON, model_type="gemma2", hidden_activation="gelu_pytorch_tanh", sliding_window=16,
                   query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(_COMMON, model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", sliding_window=16,
                   query_pre_attn_scalar=16, rope_theta=1e6, rope_local_base_freq=1e4),
    "qwen2 sliding": dict(_COMMON, model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "qwen3 sliding": dict(_COMMON, model_type="qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=1),
}


def _folder(tmp_path, config: dict, name: str = "ckpt"):
    """A checkpoint folder: `config`, three small tensors, the tiny tokenizer."""
    from safetensors.numpy import save_file

    from testutil import make_tokenizer_files

    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": np.zeros((320, 64), np.float32),
               "model.norm.weight": np.ones(64, np.float32),
               "model.layers.0.input_layernorm.weight": np.ones(64, np.float32)}, folder / "model.safetensors")
    make_tokenizer_files(folder, 320)
    return folder


def _refused(src, tmp_path, *words) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(BundleError) as info:
        convert(src, out / "model.plm", progress=False)
    message = str(info.value)
    for w in words:
        assert w in message, message
    assert len(message) < 1000, message[:2000]
    assert list(out.iterdir()) == []
    return message


def _cli(*args, env=None):
    return subprocess.run(["prlimit", f"--as={MEMORY_LIMIT}", "timeout", str(CLI_TIMEOUT), sys.executable, "-m",
                           "pocketlm", *map(str, args)], capture_output=True, text=True, env=env or os.environ)


def _cli_refuses(src, tmp_path, *words) -> None:
    (tmp_path / "cli").mkdir(exist_ok=True)  # (convert refuses a directory that does not exist)
    r = _cli("convert", src, "-o", tmp_path / "cli" / "model.plm")
    err = r.stderr.strip().splitlines()  # "reading ckpt ...", then the error
    assert r.returncode == 1 and err[-1].startswith("pocketlm: error: "), (r.returncode, r.stderr[-3000:])
    assert len(err) == 2 and "Traceback" not in r.stderr
    for w in words:
        assert w in err[-1], err[-1]
    assert len(err[-1]) < 1000
    assert not (tmp_path / "cli").exists() or list((tmp_path / "cli").iterdir()) == []


@pytest.mark.parametrize("arch", list(LAYER_LIST_ARCHS))
def test_layer_count_bounded_before_the_config_is_read(arch, tmp_path):
    """num_hidden_layers 2^32 made the model module build a 4-billion-item list (MemoryError after
    gigabytes): it is now refused against the tensor table first, naming the key. One layer is not
    refused by that check (the folder then fails on its missing tensors)."""
    src = _folder(tmp_path, {**LAYER_LIST_ARCHS[arch], "num_hidden_layers": 2**32})
    _refused(src, tmp_path, "config.json: num_hidden_layers gives 4294967296 layers; it must be 1..3")
    ok = _folder(tmp_path, {**LAYER_LIST_ARCHS[arch], "num_hidden_layers": 1}, "one_layer")
    with pytest.raises(Exception) as info:
        convert(ok, tmp_path / "one.plm", progress=False)
    assert "layers" not in str(info.value) and "missing tensors" in str(info.value)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
@pytest.mark.parametrize("arch", ["gemma3", "qwen2 sliding"])
def test_layer_count_cli(arch, tmp_path):
    src = _folder(tmp_path, {**LAYER_LIST_ARCHS[arch], "num_hidden_layers": 2**32})
    _cli_refuses(src, tmp_path, "num_hidden_layers gives 4294967296 layers")


@pytest.mark.parametrize("changes, words", [
    ({"layer_types": ["sliding_attention"] * (1 << 20)}, ["layer_types must be an array of at most 3 entries",
                                                          "1048576 entries"]),
    ({"layer_types": BIG}, ["layer_types must be an array", "(10485760 characters)"]),
    ({"num_hidden_layers": "2"}, ["num_hidden_layers gives '2' layers"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers gives True layers"]),
])
def test_other_layer_counts(changes, words, tmp_path):
    src = _folder(tmp_path, {**LAYER_LIST_ARCHS["gemma2"], "num_hidden_layers": 2, **changes})
    _refused(src, tmp_path, *words)


@pytest.fixture
def ckpt(hf_models, tmp_path):
    """A private, editable copy of the tiny llama checkpoint (2 layers, vocab 320)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_models["llama"][0], dst)
    return dst


def _edit(folder, name="config.json", **changes):
    path = folder / name
    d = json.loads(path.read_text()) if path.is_file() else {}
    d.update(changes)
    path.write_text(json.dumps(d))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# config.json change -> words the message holds: the key as config.json names it, the value shortened.
CONFIG_CASES = {
    "10 MB rope_theta": ({"rope_parameters": {"rope_theta": BIG}}, [
        "config.json: rope_parameters.rope_theta must be a finite number", "(10485760 characters)"]),
    "10 MB rope_theta, older config": ({"rope_parameters": None, "rope_theta": BIG}, [
        "config.json: rope_theta must be a finite number", "(10485760 characters)"]),
    "10 MB intermediate_size": ({"intermediate_size": BIG}, [
        "config.json: does not describe a valid llama model", "characters)"]),
    "10 MB rope_scaling.factor": ({"rope_scaling": {**LLAMA3, "factor": BIG}},
                                  ["config.json: rope_scaling.factor must be a number", "(10485760 characters)"]),
    "llama3 factor 0": ({"rope_scaling": {**LLAMA3, "factor": 0.0}}, ["rope_scaling.factor must be a number in"]),
    "rope_theta 1e300": ({"rope_parameters": {"rope_theta": 1e300}},
                         ["config.json: rope_parameters.rope_theta must be a finite number > 0, in [1e-06, 1e+12]"]),
    "rope_theta 0, older config": ({"rope_parameters": None, "rope_theta": 0.0},
                                   ["config.json: rope_theta must be a finite number > 0"]),
    "rms_norm_eps NaN": ({"rms_norm_eps": float("nan")}, ["rms_norm_eps must be a finite number > 0"]),
    "max_position_embeddings 2^40": ({"max_position_embeddings": 2**40},
                                     ["max_position_embeddings must be an integer in 1..16777216"]),
    "sliding_window 2^63-5": ({"sliding_window": 2**63 - 5}, ["sliding_window: window 9223372036854775803"]),
    "head_dim odd past the heads": ({"head_dim": 17}, ["head_dim"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_values_checked_by_the_loader_schema(case, ckpt, tmp_path):
    """The one schema (pocketlm.metadata) checks the converted config before anything is written,
    and the message names the config.json key, not the canonical entry."""
    changes, words = CONFIG_CASES[case]
    _edit(ckpt, **changes)
    _refused(ckpt, tmp_path, *words)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_config_value_cli(ckpt, tmp_path):
    _edit(ckpt, rope_scaling={**LLAMA3, "factor": BIG})
    _cli_refuses(ckpt, tmp_path, "rope_scaling.factor must be a number", "(10485760 characters)")


def test_bos_outside_the_vocabulary_fails_before_writing(ckpt, tmp_path, monkeypatch):
    """The reader's whole-metadata check runs on the converted metadata before any tensor is
    written (no tensor is even encoded), naming the entry and the source."""
    import pocketlm.convert.converter as converter

    encoded = []
    real = converter._encode
    monkeypatch.setattr(converter, "_encode", lambda t, dtype: encoded.append(t.name) or real(t, dtype))
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    _edit(ckpt, "generation_config.json", bos_token_id=None)
    _edit(ckpt, bos_token_id=10**6)
    _refused(ckpt, tmp_path, "ckpt: bad metadata: special_tokens.bos_id 1000000 is outside the vocabulary")
    assert encoded == []


@pytest.mark.parametrize("value", ["abc", [1, "x"], {"id": 3}])
def test_malformed_special_token_ids(ckpt, tmp_path, value):
    """Were a bare ValueError / TypeError from int()."""
    _edit(ckpt, "generation_config.json", eos_token_id=value)
    _refused(ckpt, tmp_path, "special tokens", "malformed")


def test_out_of_range_sampling_defaults_are_dropped(ckpt, tmp_path, capfd):
    """generation_config.json values the sampler would refuse are left out with one warning each,
    naming the key; the rest is kept."""
    _edit(ckpt, "generation_config.json", top_k=-5, temperature=BIG, top_p=0.5, max_new_tokens=0)
    bundle = read_bundle(convert(ckpt, tmp_path / "x.plm", progress=False))
    generation = bundle.metadata["generation"]
    assert (generation["top_k"], generation["temperature"], generation["top_p"], generation["max_tokens"]) == (
        40, 0.7, 0.5, 512)
    warnings = capfd.readouterr().err.strip().splitlines()
    assert len(warnings) == 3, warnings
    for key, line in zip(("temperature", "top_k", "max_new_tokens"), warnings):
        assert line.startswith("pocketlm: warning: ckpt/generation_config.json: " + key), line
        assert len(line) < 300


@pytest.mark.parametrize("changes", [{"model_type": BIG}, {"rope_scaling": {"rope_type": BIG, "factor": 2.0}},
                                     {"hidden_act": BIG, "model_type": "qwen3"}])
def test_unsupported_values_are_quoted_shortened(ckpt, tmp_path, changes):
    """A model module's "not supported" message quotes the value, shortened."""
    from pocketlm.errors import UnsupportedModelError

    _edit(ckpt, **changes)
    with pytest.raises(UnsupportedModelError) as info:
        convert(ckpt, tmp_path / "x.plm", progress=False)
    assert "(10485760 characters)" in str(info.value) and len(str(info.value)) < 1000


@pytest.mark.parametrize("weight_map, words", [
    ({"a": 5}, ["names 5 as a shard"]),
    ({"a": "../../outside.safetensors"}, ["names '../../outside.safetensors' as a shard"]),
    ({"a": "/dev/zero"}, ["names '/dev/zero' as a shard"]),
    ([1, 2], ["names [1, 2] as a shard"]),
    ({f"t{i}": f"{'y' * 200}-{i}.safetensors" for i in range(10_000)}, ["are missing", "(and 9997 more)"]),
])
def test_hostile_shard_index(ckpt, tmp_path, weight_map, words):
    """model.safetensors.index.json names files of the folder (was a TypeError for a number; a path
    was followed anywhere); 10,000 missing shards are not all listed."""
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _refused(ckpt, tmp_path, *words)
