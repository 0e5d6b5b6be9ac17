"""Writes small GGUF files the way llama.cpp's converter would, from a transformers model.

Used to test the GGUF reader on types and layouts the SmolLM2 file does not have: K-quants,
BF16, Q5_0/Q5_1, biases, qwen2 (no Q/K permutation). Independent of pocketlm's own code on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pocketlm.models import llama

# HF name -> llama.cpp name is pocketlm's canonical map; the permutation below is written from
# llama.cpp's description (convert_hf_to_gguf.py, LlamaModel.permute), not from pocketlm.


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's interleaved-pair order, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f16_bytes(value: float) -> np.ndarray:
    return np.array([value], dtype="<f2").view(np.uint8)


def random_kquant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random but finite K-quant blocks: random payload with small, sane f16 scales."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    if qtype in (gguf.GGMLQuantizationType.Q6_K, gguf.GGMLQuantizationType.Q3_K):  # d is last
        blocks[:, -2:] = _f16_bytes(0.002)
    else:  # Q4_K / Q5_K: d, dmin first
        blocks[:, 0:2] = _f16_bytes(0.004)
        blocks[:, 2:4] = _f16_bytes(0.002)
    return blocks.reshape(rows, -1)


def gguf_tokenizer(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) from the checkpoint's byte-level BPE tokenizer.json."""
    doc = json.loads((folder / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in doc["added_tokens"] if t["special"]}
    types = [3 if t in special else 1 for t in tokens]  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, model, folder: Path, arch: str, types: dict[str, str] | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Writes `model` (transformers) as a GGUF of `arch`; `types` maps canonical names (or name
    suffixes like "attn_k.weight") to GGUF type names (default F32). Returns the float32 tensors
    as written before quantization, in GGUF (permuted) row order, by canonical name."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    types = types or {}
    rng = np.random.default_rng(seed)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    tokens, token_types, merges = gguf_tokenizer(folder)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_eot_token_id(2)
    w.add_chat_template("{{ messages }}")

    written = {}
    for hf_name, t in model.state_dict().items():
        name = llama.hf_weight_name(hf_name)
        if name is None or (name == "output.weight" and cfg.tie_word_embeddings):
            continue
        x = t.float().numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            x = llamacpp_permute(x, n_head)
        elif arch == "llama" and ".attn_k." in name:
            x = llamacpp_permute(x, n_kv)
        written[name] = x
        tname = next((v for k, v in types.items() if name.endswith(k)), "F32")
        qtype = Q[tname]
        if tname in ("Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            data = random_kquant(x.shape[0], x.shape[1], qtype, rng)
        elif tname == "F32":
            data = x
        elif tname == "F16":
            data = x.astype(np.float16)
        else:
            data = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if tname not in ("F32", "F16") else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written
