"""Broken or unsupported sources fail with a clear pocketlm exception, and never leave an output
file (or a temporary one) behind; an existing output is left untouched."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from convert_fixtures import hf_models, tiny_gguf  # noqa: F401
from gguf_craft import write_gguf
from pocketlm.convert import convert
from pocketlm.errors import BundleError, ConversionError, UnsupportedModelError


@pytest.fixture
def ckpt(hf_models, tmp_path):
    """A private, editable copy of the tiny llama checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_models["llama"][0], dst)
    return dst


def _fails(src, tmp_path, exc, match, **kw):
    out = tmp_path / "out" / "model.plm"
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"previous bundle")
    with pytest.raises(exc, match=match):
        convert(src, out, progress=False, **kw)
    assert out.read_bytes() == b"previous bundle"  # untouched
    assert [p.name for p in out.parent.iterdir()] == ["model.plm"]  # no temporary file left


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(ckpt, tmp_path):
    _edit_config(ckpt, model_type="gpt_neox")
    _fails(ckpt, tmp_path, UnsupportedModelError, "model_type 'gpt_neox' is not supported")


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    _fails(ckpt, tmp_path, BundleError, "no config.json")


def test_no_safetensors(ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    _fails(ckpt, tmp_path, BundleError, "no model.safetensors")


def test_missing_shard(hf_models, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(hf_models["qwen2-bf16-sharded"][0], dst)
    next(iter(sorted(dst.glob("model-*.safetensors")))).unlink()
    _fails(dst, tmp_path, BundleError, "shard\\(s\\) listed in model.safetensors.index.json are missing")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.json").unlink()
    _fails(ckpt, tmp_path, BundleError, "no tokenizer.json")


def test_tensor_of_unexpected_shape(ckpt, tmp_path):
    _edit_config(ckpt, intermediate_size=100)
    _fails(ckpt, tmp_path, ConversionError, r"ffn_\w+\.weight' has shape \[\d+, \d+\], the config implies")


def test_truncated_safetensors(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(ckpt, tmp_path, BundleError, "truncated")


def test_nan_weight_fails_mid_write(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    _fails(ckpt, tmp_path, BundleError, "ffn_up.weight' contains NaN")


@pytest.mark.parametrize("keep_bytes", [100, 20_000, -1000])
def test_truncated_gguf(tiny_gguf, tmp_path, keep_bytes):
    data = tiny_gguf.read_bytes()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[:keep_bytes])
    _fails(src, tmp_path, BundleError, "cut.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    from testutil import make_hf_model

    model = make_hf_model(tmp_path / "hf", "llama", num_hidden_layers=1)
    src = tmp_path / "mamba.gguf"
    write_gguf(src, model, tmp_path / "hf", "mamba")
    _fails(src, tmp_path, UnsupportedModelError, "GGUF architecture 'mamba' is not supported")


def test_not_a_model(tmp_path):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(b"\0" * 100)
    _fails(junk, tmp_path, BundleError, "not a GGUF file")
    _fails(tmp_path / "nothing-here", tmp_path, BundleError, "no such file or folder")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    _fails(empty, tmp_path, BundleError, "no config.json")


def test_bad_options(ckpt, tmp_path):
    with pytest.raises(ValueError, match="quant must be one of"):
        convert(ckpt, tmp_path / "x.plm", quant="int3", progress=False)
    with pytest.raises(ValueError, match="group_size"):
        convert(ckpt, tmp_path / "x.plm", quant="int4", group_size=48, progress=False)
    assert not (tmp_path / "x.plm").exists()


def test_inf_in_bf16_checkpoint(hf_models, tmp_path):
    """bf16 weights are decoded, then checked like any other (safetensors: 8-byte header length,
    JSON header, data; an all-ones exponent with a zero mantissa is bf16 +inf)."""
    dst = tmp_path / "sharded"
    shutil.copytree(hf_models["qwen2-bf16-sharded"][0], dst)
    for shard in sorted(dst.glob("model-*.safetensors")):
        data = bytearray(shard.read_bytes())
        (n,) = np.frombuffer(data[:8], dtype="<u8")
        header = json.loads(data[8:8 + int(n)])
        name = next((k for k, v in header.items() if k.endswith("mlp.down_proj.weight") and v["dtype"] == "BF16"), None)
        if name is not None:
            break
    assert name is not None
    at = 8 + int(n) + header[name]["data_offsets"][0] + 2 * 7
    data[at:at + 2] = b"\x80\x7f"
    shard.write_bytes(bytes(data))
    _fails(dst, tmp_path, BundleError, r"ffn_down\.weight' contains NaN or infinite values")


@pytest.mark.parametrize("changes, match", [
    ({"num_hidden_layers": 2**32}, r"4294967296 layers; it must be 1\.\.\d+"),  # was gigabytes, then MemoryError
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),  # was a ZeroDivisionError
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"vocab_size": -5}, "vocab_size must be an integer >= 1, got -5"),
    ({"hidden_size": "abc"}, "config.json: does not describe a valid llama model"),  # was a bare ValueError
    ({"num_attention_heads": [4]}, "config.json: does not describe a valid llama model"),  # was a TypeError
    ({"rms_norm_eps": 1e-300}, r"config.json: rms_norm_eps must be a finite number > 0, in \[1e-12, 1\], got 1e-300"),
])
def test_hostile_config_values(ckpt, tmp_path, changes, match):
    """config.json values are range-checked against the tensors before anything is sized by them."""
    _edit_config(ckpt, **changes)
    _fails(ckpt, tmp_path, BundleError, match)


def _rewrite_safetensors_header(folder, edit):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    (n,) = np.frombuffer(data[:8], dtype="<u8")
    header = json.loads(data[8:8 + int(n)])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(np.array([len(text)], dtype="<u8").tobytes() + text + data[8 + int(n):])


@pytest.mark.parametrize("edit, match", [
    (lambda h: h[next(k for k in h if k != "__metadata__")].pop("data_offsets"), "corrupt safetensors entry"),
    (lambda h: h[next(k for k in h if k != "__metadata__")].update(shape="12"), "corrupt safetensors entry"),
    (lambda h: h.update({"x" * (10 << 20): h.pop(next(k for k in h if k != "__metadata__"))}),
     r"tensor 'x{80}'\.\.\. \(10485760 characters\)"),
])
def test_hostile_safetensors_header(ckpt, tmp_path, edit, match):
    """Entries of the wrong shape are a BundleError (were KeyError/TypeError tracebacks); a 10 MB
    tensor name is shown shortened."""
    _rewrite_safetensors_header(ckpt, edit)
    with pytest.raises(BundleError, match=match) as info:
        convert(ckpt, tmp_path / "x.plm", progress=False)
    assert len(str(info.value)) < 600
