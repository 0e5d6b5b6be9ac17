"""GGUF -> .plm: the real SmolLM2 file (types and bytes kept, Q/K un-permuted exactly as
transformers' GGUF loader does, config, tokenizer, special tokens) and small crafted GGUFs for
the types and layouts SmolLM2 lacks (K-quants, BF16, Q5_0/Q5_1 kept; Q3_K requantized; qwen2 biases)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from convert_fixtures import bundle_f32, hf_state, smollm2_bundles  # noqa: F401
from gguf_craft import write_gguf
from x16util import assert_type, row_major
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm import quant
from pocketlm.dtypes import X16_OF, DType

_GGUF_TO_DTYPE = {name: DType[name] for name in ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")}


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


def _gguf_rows(t) -> np.ndarray:
    return np.asarray(t.data).view(np.uint8).reshape(int(t.shape[-1]) if len(t.shape) > 1 else 1, -1)


def test_smollm2_keep_types_and_bytes(smollm2_bundles, smollm2_reader):
    b = smollm2_bundles[None]
    assert len(b.tensors) == len(smollm2_reader.tensors) == 272
    for t in smollm2_reader.tensors:
        info = b.info(t.name)
        # 2-D weights are stored in the row-interleaved x16 form of the GGUF type (same bytes
        # once de-interleaved)
        assert info.dtype.base == _GGUF_TO_DTYPE[t.tensor_type.name], t.name
        assert info.dtype.x16 == (len(info.shape) == 2), t.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist())), t.name
        stored = np.asarray(b.tensor(t.name))
        if info.dtype.x16:
            stored = quant.deinterleave(stored, info.dtype.base, info.shape)
        raw, ours = _gguf_rows(t), stored.reshape(_gguf_rows(t).shape)
        if ".attn_q." in t.name or ".attn_k." in t.name:  # same rows, another order
            assert not np.array_equal(ours, raw)
            assert sorted(map(bytes, ours)) == sorted(map(bytes, raw))
        else:
            np.testing.assert_array_equal(ours, raw, err_msg=t.name)
    q = b.metadata["quantization"]
    assert q["mode"] == "keep" and q["types"] == {"f32": 61, "q4_1_x16": 210, "q8_0_x16": 1}
    assert b.metadata["provenance"]["requantized"] == []


def test_smollm2_qk_match_transformers_gguf_loader(smollm2_bundles, smollm2_reader):
    """transformers' own Llama GGUF tensor processor (what from_pretrained(gguf_file=...) runs)
    un-permutes Q/K after dequantizing; ours moves the quantized rows first. Same floats."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    b = smollm2_bundles[None]
    cfg = b.metadata["config"]
    processor = TENSOR_PROCESSORS["llama"](config={"num_attention_heads": cfg["n_heads"],
                                                    "num_key_value_heads": cfg["n_kv_heads"]})
    checked = 0
    for t in smollm2_reader.tensors:
        if not (t.name.endswith("attn_q.weight") or t.name.endswith("attn_k.weight")):
            continue
        want = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
        got = bundle_f32(b, t.name)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=t.name)
        checked += 1
    assert checked == 2 * cfg["n_layers"]


def test_smollm2_metadata(smollm2_bundles, smollm2_gguf):
    from tokenizers import Tokenizer

    m = smollm2_bundles[None].metadata
    assert m["architecture"] == "llama"
    cfg = m["config"]
    want = dict(vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
                rope_theta=100000.0, rope_dim=64, rope_scaling=None, max_position=8192, tie_embeddings=True,
                attn_bias=False, rope_freq_factors=False)
    assert {k: cfg[k] for k in want} == want
    assert cfg["rms_eps"] == pytest.approx(1e-5)
    assert m["tokenizer"]["type"] == "hf-json"
    tok = Tokenizer.from_str(m["tokenizer"]["json"])
    assert tok.get_vocab_size() == 49152
    assert "<|im_start|>" in m["chat_template"]
    st = m["special_tokens"]
    assert tok.token_to_id("<|im_end|>") in st["eos_ids"]
    assert st["bos_id"] == 1 and st["add_bos"] is False
    p = m["provenance"]
    assert p["source"] == smollm2_gguf.name and p["source_format"] == "gguf"
    h = hashlib.sha256()
    with open(smollm2_gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    assert p["source_sha256"] == h.hexdigest()
    assert p["source_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_smollm2_int8(smollm2_bundles, smollm2_reader):
    from gguf import dequantize

    b = smollm2_bundles["int8"]
    print(f"\nSmolLM2 GGUF conversion: keep {smollm2_bundles['None-seconds']:.1f}s, "
          f"int8 {smollm2_bundles['int8-seconds']:.1f}s")
    assert Counter(t.dtype.base for t in b.tensors) == {DType.I8: 211, DType.F32: 61}
    for t in b.tensors:
        assert_type(t, DType.I8 if len(t.shape) == 2 else DType.F32)
    assert Counter(t.dtype for t in b.tensors) == {DType.I8_X16: 211, DType.F32: 61}  # all rows % 16 == 0
    keep = smollm2_bundles[None]
    for name in ("token_embd.weight", "blk.3.attn_k.weight", "blk.29.ffn_down.weight"):
        src = bundle_f32(keep, name)  # the GGUF's values, un-permuted
        got = bundle_f32(b, name)
        bound = np.abs(src).max(axis=1, keepdims=True) / 254 * (1 + 1e-5) + 1e-12
        assert np.all(np.abs(got - src) <= bound), name
    norm = next(t for t in smollm2_reader.tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_array_equal(bundle_f32(b, norm.name), dequantize(norm.data, norm.tensor_type))


# --- crafted GGUFs ---------------------------------------------------------------------------------

# Canonical name (or suffix; the first match wins) -> GGUF type. Two layers, so that every type
# pocketlm keeps appears, plus one it does not (Q3_K).
CRAFT_TYPES = {
    "token_embd.weight": "Q6_K",
    "attn_q.weight": "F32",               # kept; un-permuted exactly
    "attn_k.weight": "BF16",
    "blk.0.attn_v.weight": "Q8_0",
    "blk.1.attn_v.weight": "Q5_K",
    "attn_output.weight": "Q4_0",
    "ffn_gate.weight": "Q4_K",
    "blk.0.ffn_up.weight": "F16",
    "blk.1.ffn_up.weight": "Q5_1",
    "blk.0.ffn_down.weight": "Q5_0",
    "blk.1.ffn_down.weight": "Q3_K",      # no pocketlm kernels: requantized to Q8_0
    "output.weight": "Q4_1",
}


@pytest.fixture(scope="module")
def crafted_llama(tmp_path_factory):
    from testutil import make_hf_model

    root = tmp_path_factory.mktemp("craft")
    model = make_hf_model(root / "hf", "llama", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    path = root / "tiny-llama.gguf"
    write_gguf(path, model, root / "hf", "llama", CRAFT_TYPES)
    return path, model


def test_crafted_keep_copies_every_type_pocketlm_has(crafted_llama, tmp_path):
    import gguf

    path, model = crafted_llama
    b = read_bundle(convert(path, tmp_path / "k.plm", progress=False))
    want = {"token_embd.weight": DType.Q6_K, "output.weight": DType.Q4_1, "output_norm.weight": DType.F32}
    for i in range(2):
        for name, gguf_type in [("attn_q", "F32"), ("attn_k", "BF16"), ("attn_v", ["Q8_0", "Q5_K"][i]),
                                ("attn_output", "Q4_0"), ("ffn_gate", "Q4_K"), ("ffn_up", ["F16", "Q5_1"][i]),
                                ("ffn_down", ["Q5_0", "Q8_0"][i])]:
            want[f"blk.{i}.{name}.weight"] = DType[gguf_type]
        want[f"blk.{i}.attn_norm.weight"] = want[f"blk.{i}.ffn_norm.weight"] = DType.F32
    assert {t.name: t.dtype.base for t in b.tensors} == want
    for t in b.tensors:
        assert_type(t, want[t.name])
    assert b.info("blk.0.attn_output.weight").dtype == DType.Q4_0_X16  # the rule is not vacuous here
    assert b.info("blk.1.ffn_down.weight").dtype == DType.Q8_0_X16   # requantized ones too
    prov = b.metadata["provenance"]
    assert prov["requantized"] == ["blk.1.ffn_down.weight"]
    assert prov["source_types"] == {"BF16": 2, "F16": 1, "F32": 7, "Q3_K": 1, "Q4_0": 2, "Q4_1": 1, "Q4_K": 2,
                                    "Q5_0": 1, "Q5_1": 1, "Q5_K": 1, "Q6_K": 1, "Q8_0": 1}

    # Kept tensors: the GGUF's bytes (Q/K rows un-permuted), so the GGUF's values bit for bit.
    reader = gguf.GGUFReader(path)
    from pocketlm.convert.gguf_source import rope_unpermute_rows

    cfg = b.metadata["config"]
    for t in reader.tensors:
        if t.name == "blk.1.ffn_down.weight" or len(t.shape) == 1:
            continue
        raw = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[-1]), -1)
        if ".attn_q." in t.name:
            raw = raw[rope_unpermute_rows(raw.shape[0], cfg["n_heads"])]
        elif ".attn_k." in t.name:
            raw = raw[rope_unpermute_rows(raw.shape[0], cfg["n_kv_heads"])]
        assert row_major(b, t.name).tobytes() == raw.tobytes(), t.name
        src = gguf.dequantize(raw, t.tensor_type)
        np.testing.assert_array_equal(bundle_f32(b, t.name).view(np.uint32),
                                      src.astype(np.float32).reshape(raw.shape[0], -1).view(np.uint32), err_msg=t.name)

    state = hf_state(model)
    np.testing.assert_array_equal(bundle_f32(b, "blk.0.attn_q.weight"), state["blk.0.attn_q.weight"])
    k = state["blk.0.attn_k.weight"]
    bf16 = gguf.dequantize(gguf.quantize(k, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16)
    np.testing.assert_array_equal(bundle_f32(b, "blk.0.attn_k.weight"), bf16)

    # The requantized Q3_K tensor: within Q8_0's bound of the GGUF's own dequantized values.
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    src = gguf.dequantize(t.data, t.tensor_type).reshape(-1, 32)
    got = bundle_f32(b, t.name).reshape(-1, 32)
    assert np.all(np.abs(got - src) <= np.abs(src).max(axis=1, keepdims=True) / 254 * 1.002 + 1e-9)


def test_crafted_quant_given_reencodes_everything(crafted_llama, tmp_path):
    path, model = crafted_llama
    b = read_bundle(convert(path, tmp_path / "i4.plm", quant="int4", group_size=64, progress=False))
    types = {t.name: t.dtype.base for t in b.tensors}
    assert types["token_embd.weight"] == types["output.weight"] == DType.Q8_0
    assert types["blk.1.attn_v.weight"] == types["blk.0.ffn_gate.weight"] == DType.Q4_0_G64
    for name in ("token_embd.weight", "output.weight", "blk.1.attn_v.weight", "blk.0.ffn_gate.weight"):
        assert_type(b.info(name), types[name])
    assert b.info("output.weight").dtype == DType.Q8_0_X16  # [320, 256]; G64 has no x16 form
    assert b.metadata["provenance"]["requantized"] == []  # only meaningful in keep mode
    q = bundle_f32(b, "blk.0.attn_q.weight")
    want = hf_state(model)["blk.0.attn_q.weight"]
    assert np.linalg.norm(q - want) / np.linalg.norm(want) < 0.12


def test_crafted_qwen2_is_not_unpermuted(tmp_path):
    """qwen2 GGUFs keep HF's row order (NeoX RoPE in llama.cpp): copied as is, biases included."""
    from testutil import make_hf_model

    folder = tmp_path / "hf"
    model = make_hf_model(folder, "qwen2", num_hidden_layers=1)  # vocab 320: the tokenizer has merges
    path = tmp_path / "tiny-qwen2.gguf"
    write_gguf(path, model, folder, "qwen2")
    b = read_bundle(convert(path, tmp_path / "q.plm", progress=False))
    assert b.metadata["architecture"] == "qwen2" and b.metadata["config"]["attn_bias"] is True
    for name, want in hf_state(model).items():
        np.testing.assert_array_equal(bundle_f32(b, name), want, err_msg=name)
    st = b.metadata["special_tokens"]
    assert st["eos_ids"] == [0, 2] and st["bos_id"] == 1 and st["add_bos"] is False
    assert json.loads(b.metadata["tokenizer"]["json"])["model"]["type"] == "BPE"
