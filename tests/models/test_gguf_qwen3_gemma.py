"""GGUF import of Qwen3, Gemma, Gemma 2 and Gemma 3: tiny random transformers models written as
f32 GGUF files the way llama.cpp's converter lays them out (names, metadata keys, RMSNorm weights
of the Gemmas stored as 1 + w, no Q/K permutation for these NeoX-RoPE architectures), then
converted by pocketlm: same logits as the Hugging Face import of the same weights and as
transformers. The writer below is independent of pocketlm's name maps on purpose.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_parity_qwen3_gemma_mistral import make_model

from pocketlm.convert import convert
from pocketlm.engine import Engine

# query_pre_attn_scalar = head_dim: llama.cpp does not store it (it derives it from the model size).
CASES = {
    "qwen3": dict(arch="qwen3", head_dim=24, tie_word_embeddings=False),
    "gemma": dict(arch="gemma", num_key_value_heads=1, head_dim=32),
    "gemma2": dict(arch="gemma2", num_hidden_layers=3, head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    # llama.cpp's fixed pattern: every 6th layer global
    "gemma3": dict(arch="gemma3", num_hidden_layers=6, head_dim=16, sliding_window=12, query_pre_attn_scalar=16,
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}

# HF tensor name (inside model.layers.N.) -> llama.cpp's GGUF name (inside blk.N.)
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str, arch: str) -> str | None:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    layer, inner = parts[2], ".".join(parts[3:-1])
    if inner == "post_attention_layernorm":  # Gemma 2/3: after attention; otherwise before the MLP
        return f"blk.{layer}.{'post_attention_norm' if arch in ('gemma2', 'gemma3') else 'ffn_norm'}.weight"
    return f"blk.{layer}.{LAYER_NAMES[inner]}.weight"


def write_gguf(path, model, folder, arch: str) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    params = cfg.rope_parameters
    w.add_rope_freq_base(float((params.get("full_attention") or params)["rope_theta"]))
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)

    doc = json.loads((folder / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(doc["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in doc["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    for hf_name, t in model.state_dict().items():
        if "rotary_emb" in hf_name or (hf_name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        name = gguf_name(hf_name, arch)
        x = t.float().numpy().copy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            x = x + 1.0  # llama.cpp's Gemma converters store 1 + w
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=sorted(CASES))
def gguf_case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    arch = spec.pop("arch")
    folder = tmp_path_factory.mktemp("gguf-" + request.param)
    model = make_model(folder / "hf", arch, seed=len(request.param) + 1, **spec)
    write_gguf(folder / "model.gguf", model, folder / "hf", arch)
    from_hf = convert(folder / "hf", folder / "hf.plm", quant="f32", progress=False)
    from_gguf = convert(folder / "model.gguf", folder / "gguf.plm", quant="f32", progress=False)
    return arch, model, from_hf, from_gguf


def test_gguf_config_matches_hf_config(gguf_case):
    arch, _, from_hf, from_gguf = gguf_case
    a, b = Engine(from_hf, kv_type="f32", threads=1).config, Engine(from_gguf, kv_type="f32", threads=1).config
    keys = ("hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta", "tie_embeddings",
            "qk_norm", "post_norms", "attn_softcap", "final_softcap", "layer_windows", "rope_local_theta",
            "query_pre_attn_scalar")
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}
    assert Engine(from_gguf, kv_type="f32", threads=1).metadata["architecture"] == arch


def test_gguf_logits_match_hf_import_and_transformers(gguf_case):
    _, model, from_hf, from_gguf = gguf_case
    ids = np.random.default_rng(5).integers(0, 300, size=60).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].float().numpy()
    got_hf = Engine(from_hf, kv_type="f32", threads=2, max_context=128).create_session().prefill(ids)
    session = Engine(from_gguf, kv_type="f32", threads=2, max_context=128, prefill_chunk=16).create_session()
    got_gguf = session.prefill(ids)
    assert np.abs(got_gguf - got_hf).max() < 1e-5
    assert np.abs(got_gguf - ref).max() < 1e-4


def test_gguf_greedy_tokens_match_transformers(gguf_case):
    _, model, _, from_gguf = gguf_case
    ids = np.random.default_rng(9).integers(0, 300, size=12).tolist()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    s = Engine(from_gguf, kv_type="f32", threads=2, max_context=128).create_session()
    logits, got = s.prefill(ids), []
    for _ in range(32):
        got.append(int(np.argmax(logits)))
        logits = s.decode(got[-1])
    assert got == out[0, len(ids):].tolist()
