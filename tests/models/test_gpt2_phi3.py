"""GPT-2 and Phi-3 beyond the shared parity cases: LongRoPE's short and long factors, and GGUF
files written the way llama.cpp's converter lays these architectures out (fused attn_qkv,
Phi-3's gate+up ffn_up, LongRoPE factors as tensors) compared with the HF import."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import x16util
from testutil import make_hf_model
from pocketlm.convert import convert
from pocketlm.engine import Engine

ORIGINAL_MAX = 32
LONGROPE = dict(max_position_embeddings=128, original_max_position_embeddings=ORIGINAL_MAX,
                partial_rotary_factor=0.75,  # head_dim 16 -> rope_dim 12: 6 factors
                rope_scaling={"type": "longrope", "short_factor": [1.0, 1.05, 1.2, 1.4, 1.7, 2.0],
                              "long_factor": [1.0, 1.5, 3.0, 6.0, 12.0, 24.0]})


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def prompt(n, vocab, seed=1):
    return np.random.default_rng(seed + n).integers(0, vocab, size=n).tolist()


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope")
    model = make_hf_model(folder / "hf", "phi3", seed=5, **LONGROPE)
    return model, convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False)


def test_longrope_short_factors_within_the_original_context(longrope):
    """max_context <= original_max_position_embeddings: short factors, as transformers uses for
    every call whose positions stay inside the original context."""
    model, bundle = longrope
    ids = prompt(ORIGINAL_MAX, 300, seed=2)
    ref = hf_logits(model, ids)
    engine = Engine(bundle, kv_type="f32", threads=2, max_context=ORIGINAL_MAX, prefill_chunk=8)
    s = engine.create_session()
    assert np.abs(s.prefill(ids[:20]) - ref[19]).max() < 1e-4
    for i in range(20, ORIGINAL_MAX):
        assert np.abs(s.decode(ids[i]) - ref[i]).max() < 1e-4, i


def test_longrope_long_factors_beyond_the_original_context(longrope):
    """max_context > original_max_position_embeddings: long factors at every position, as
    transformers uses for a sequence longer than the original context."""
    model, bundle = longrope
    ids = prompt(100, 300, seed=3)
    ref = hf_logits(model, ids)
    engine = Engine(bundle, kv_type="f32", threads=2, max_context=128, prefill_chunk=16)
    assert np.abs(engine.create_session().prefill(ids) - ref[-1]).max() < 1e-4
    s = engine.create_session()
    assert np.abs(s.prefill(ids[:70]) - ref[69]).max() < 1e-4
    for i in range(70, 100):
        assert np.abs(s.decode(ids[i]) - ref[i]).max() < 1e-4, i
    # The factors are chosen per compiled context, not per call: a short prompt on this engine
    # uses the long ones (llama.cpp does the same), where transformers would use the short ones.
    short = ids[:20]
    assert np.abs(engine.create_session().prefill(short) - hf_logits(model, short)[-1]).max() > 1e-3


def test_phi3_sliding_window(tmp_path):
    """Phi-3-mini-4k's config sets sliding_window (2047): attention over the last W positions."""
    model = make_hf_model(tmp_path / "hf", "phi3", seed=7, sliding_window=16)
    bundle = convert(tmp_path / "hf", tmp_path / "f32.plm", quant="f32", progress=False)
    ids = prompt(60, 300, seed=8)
    ref = hf_logits(model, ids)
    s = Engine(bundle, kv_type="f32", threads=2, max_context=128, prefill_chunk=16).create_session()
    assert np.abs(s.prefill(ids[:40]) - ref[39]).max() < 1e-4
    for i in range(40, 60):
        assert np.abs(s.decode(ids[i]) - ref[i]).max() < 1e-4, i


# ---- GGUF, written the way llama.cpp's convert_hf_to_gguf.py lays these models out ----------------


def _tokenizer_fields(folder):
    doc = json.loads((folder / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(doc["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in doc["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    return tokens, [3 if t in special else 1 for t in tokens], merges


def _llamacpp_tensors(model, arch):
    """llama.cpp tensor name -> f32 array (outermost dim first), independent of pocketlm's maps."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    out = {}
    if arch == "gpt2":
        conv = {"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up",
                "mlp.c_proj": "ffn_down", "ln_1": "attn_norm", "ln_2": "ffn_norm"}
        out["token_embd.weight"] = sd["transformer.wte.weight"]
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        out["output_norm.bias"] = sd["transformer.ln_f.bias"]
        out["output.weight"] = sd["transformer.wte.weight"]  # llama.cpp writes the tied head out
        for i in range(model.config.n_layer):
            for hf, ours in conv.items():
                w = sd[f"transformer.h.{i}.{hf}.weight"]
                out[f"blk.{i}.{ours}.weight"] = w.T.copy() if hf.startswith(("attn", "mlp")) else w
                out[f"blk.{i}.{ours}.bias"] = sd[f"transformer.h.{i}.{hf}.bias"]
        return out
    names = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    out["token_embd.weight"] = sd["model.embed_tokens.weight"]
    out["output_norm.weight"] = sd["model.norm.weight"]
    out["output.weight"] = sd["lm_head.weight"]
    rp = model.config.rope_parameters
    out["rope_factors_long.weight"] = np.asarray(rp["long_factor"], np.float32)
    out["rope_factors_short.weight"] = np.asarray(rp["short_factor"], np.float32)
    for i in range(model.config.num_hidden_layers):
        for hf, ours in names.items():
            out[f"blk.{i}.{ours}.weight"] = sd[f"model.layers.{i}.{hf}.weight"]
    return out


def write_gguf(path, model, folder, arch, types=None):
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if arch == "gpt2":
        w.add_block_count(c.n_layer)
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(c.n_inner or 4 * c.n_embd)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        rp = c.rope_parameters
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_context_length(c.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(int(head_dim * rp.get("partial_rotary_factor", 1.0)))
        w.add_rope_freq_base(rp["rope_theta"])
        w.add_sliding_window(0)
        scale = c.max_position_embeddings / c.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(c.original_max_position_embeddings))))
    tokens, token_types, merges = _tokenizer_fields(folder)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    tensors = _llamacpp_tensors(model, arch)
    for name, x in tensors.items():
        qtype = (types or {}).get(name.split(".", 2)[-1] if name.startswith("blk.") else name)
        if qtype is None:
            w.add_tensor(name, x)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


GGUF_CASES = {
    "gpt2": dict(hidden_size=64, num_attention_heads=4, intermediate_size=96, max_position_embeddings=128),
    "phi3": dict(num_key_value_heads=2, **LONGROPE),
}


@pytest.fixture(scope="module", params=sorted(GGUF_CASES))
def gguf_pair(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"{arch}-gguf")
    model = make_hf_model(folder / "hf", arch, seed=9, **GGUF_CASES[arch])
    write_gguf(folder / "m.gguf", model, folder / "hf", arch)
    hf_bundle = convert(folder / "hf", folder / "hf.plm", quant="f32", progress=False)
    gguf_bundle = convert(folder / "m.gguf", folder / "gguf.plm", quant="f32", progress=False)
    return arch, folder, model, hf_bundle, gguf_bundle


def test_gguf_import_matches_hf_import(gguf_pair):
    from pocketlm.bundle import read_bundle

    arch, _, model, hf_bundle, gguf_bundle = gguf_pair
    a, b = read_bundle(hf_bundle), read_bundle(gguf_bundle)
    # same canonical tensors with the same values (the GGUF keeps an explicit output head)
    hf_names = {t.name for t in a.tensors}
    assert hf_names - {"output.weight"} <= {t.name for t in b.tensors}
    for name in hf_names:
        np.testing.assert_array_equal(np.asarray(a.tensor(name)), np.asarray(b.tensor(name)), err_msg=name)
    for max_context in (ORIGINAL_MAX, 128):  # Phi-3: short and long factors
        ids = prompt(min(max_context, 100), 300, seed=4)
        ref = hf_logits(model, ids)[-1]
        for bundle in (hf_bundle, gguf_bundle):
            got = Engine(bundle, kv_type="f32", threads=2, max_context=max_context).create_session().prefill(ids)
            assert np.abs(got - ref).max() < 1e-4, (bundle.name, max_context)


def test_gguf_fused_tensors_split_bit_for_bit(gguf_pair, tmp_path):
    """Row splits keep quantized blocks intact: a Q8_0 attn_qkv (and Phi-3's gate+up ffn_up)
    arrives as Q8_0 attn_q/attn_k/attn_v (ffn_gate/ffn_up) with exactly the GGUF's bytes, in the
    row-interleaved Q8_0_X16 form when the part's rows come in groups of 16 (de-interleaved here)."""
    import gguf

    from pocketlm.bundle import read_bundle
    from pocketlm.dtypes import DType

    arch, folder, model, _, _ = gguf_pair
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = tmp_path / "q8.gguf"
    tensors = write_gguf(path, model, folder / "hf", arch, types={"attn_qkv.weight": q8, "ffn_up.weight": q8})
    bundle = convert(path, tmp_path / "q8.plm", quant=None, progress=False)
    b = read_bundle(bundle)

    def row_major(name, want_rows):
        """The part's bytes as row-major Q8_0, after checking its shape and type: Q8_0, in the x16
        form exactly when the converter's rule (tests/x16util.py) asks for it."""
        info = b.info(name)
        assert info.shape == (want_rows, c.hidden_size), (name, info.shape)
        x16util.assert_type(info, DType.Q8_0)
        return x16util.row_major(b, name).reshape(-1)

    c = model.config
    assert b.info("blk.1.attn_k.weight").dtype.base == DType.Q8_0
    qkv = gguf.quants.quantize(tensors["blk.1.attn_qkv.weight"], q8)
    n_q = c.hidden_size if arch == "gpt2" else c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    n_kv = n_q if arch == "gpt2" else c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    bounds = {"attn_q": (0, n_q), "attn_k": (n_q, n_q + n_kv), "attn_v": (n_q + n_kv, n_q + 2 * n_kv)}
    if arch == "phi3":
        up = gguf.quants.quantize(tensors["blk.1.ffn_up.weight"], q8)
        f = c.intermediate_size
        for name, rows in (("ffn_gate", up[:f]), ("ffn_up", up[f:])):
            np.testing.assert_array_equal(row_major(f"blk.1.{name}.weight", f),
                                          rows.reshape(-1).view(np.uint8), err_msg=name)
    for name, (lo, hi) in bounds.items():
        np.testing.assert_array_equal(row_major(f"blk.1.{name}.weight", hi - lo),
                                      qkv[lo:hi].reshape(-1).view(np.uint8), err_msg=name)
    ids = prompt(24, 300, seed=6)
    ref = hf_logits(model, ids)[-1]
    got = Engine(bundle, kv_type="f32", threads=2, max_context=ORIGINAL_MAX).create_session().prefill(ids)
    assert np.abs(got - ref).max() / ref.std() < 0.3  # Q8_0 weights and int8 activations


def test_greedy_tokens_from_gguf_match_transformers(gguf_pair):
    arch, _, model, _, gguf_bundle = gguf_pair
    ids = prompt(12, 300, seed=3)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    ref = out[0, len(ids):].tolist()
    s = Engine(gguf_bundle, kv_type="f32", threads=2, max_context=ORIGINAL_MAX).create_session()
    logits = s.prefill(ids)
    got = []
    for _ in range(16):
        got.append(int(np.argmax(logits)))
        logits = s.decode(got[-1])
    assert got == ref
