"""Read a GGUF file (llama.cpp's format) into a SourceModel.

Names already are canonical. Two things change on the way in:
  * shapes: GGUF lists dimensions innermost first, so GGUF [K, N] is our [N, K];
  * llama Q/K rows: llama.cpp's converter permutes them so that RoPE rotates adjacent pairs
    (x0,x1),(x2,x3)...; pocketlm, like transformers, rotates (x_i, x_{i+d/2}). We undo the
    permutation on whole rows, which never splits a quantization block, so quantized weights
    are moved bit for bit.
  * fused tensors (gpt2/phi3 attn_qkv, phi3 ffn_up holding gate+up): the model module's
    `gguf_tensors` splits them into canonical tensors by rows, bit for bit as well.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pocketlm import models
from pocketlm.convert.source import DEFAULT_GENERATION, SourceModel, SourceTensor, check_tensors
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ConversionError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"

# GGUF types pocketlm stores unchanged (same block layout, same dequantized values).
_NATIVE = {name: DType[name] for name in
           ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}

# With quant=None, GGUF types pocketlm has no kernels for (Q2_K, Q3_K, Q8_K, i-quants, ternary
# types) are requantized to this type, which adds far less error than the source's own quantization.
_KEEP_FALLBACK = DType.Q8_0


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def rope_unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved-RoPE Q/K rows back into HF order.

    Within each head of d rows llama.cpp stores HF row (j*d/2 + i) at position (2*i + j).
    """
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)


def _kv_metadata(reader) -> dict:
    """GGUF key -> python value; the big tokenizer arrays are skipped (the tokenizer module reads them)."""
    from gguf import GGUFValueType

    kv = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and field.types and field.types[0] == GGUFValueType.ARRAY:
            continue
        try:
            kv[key] = field.contents()
        except Exception:  # a value gguf cannot decode is one we do not use
            continue
    return kv


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on damaged files
        raise BundleError(f"{path.name}: cannot read the GGUF file, it is truncated or corrupt ({e})") from None


def _special_tokens(kv: dict) -> dict:
    eos = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        v = kv.get(key)
        if v is not None and int(v) not in eos:
            eos.append(int(v))
    add_bos = kv.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp's defaults: SentencePiece ("llama") vocabularies add BOS, BPE ones do not
        add_bos = kv.get("tokenizer.ggml.model") == "llama"
    bos = kv.get("tokenizer.ggml.bos_token_id")
    pad = kv.get("tokenizer.ggml.padding_token_id")
    return {
        "bos_id": None if bos is None else int(bos),
        "eos_ids": eos,
        "pad_id": None if pad is None else int(pad),
        "add_bos": bool(add_bos),
    }


def _generation(kv: dict) -> dict:
    out = dict(DEFAULT_GENERATION)
    for ours, key in (("temperature", "general.sampling.temp"), ("top_k", "general.sampling.top_k"),
                      ("top_p", "general.sampling.top_p"), ("min_p", "general.sampling.min_p"),
                      ("repetition_penalty", "general.sampling.penalty_repeat")):
        if kv.get(key) is not None:
            out[ours] = kv[key]
    return out


def read_gguf(path: Path) -> SourceModel:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from pocketlm.tokenizer import gguf_tokenizer_fields, tokenizer_json_from_gguf

    path = Path(path)
    origin = path.name
    reader = _open(path)
    kv = _kv_metadata(reader)
    gguf_arch = kv.get("general.architecture")
    module = next((m for m in models.REGISTRY.values() if gguf_arch in getattr(m, "GGUF_ARCHS", ())), None)
    if module is None:
        supported = sorted(a for m in models.REGISTRY.values() for a in getattr(m, "GGUF_ARCHS", ()))
        raise UnsupportedModelError(
            f"{origin}: GGUF architecture {gguf_arch!r} is not supported (supported: {', '.join(supported)})")
    if f"{gguf_arch}.vocab_size" not in kv and "tokenizer.ggml.tokens" in reader.fields:
        kv["tokenizer.ggml.tokens"] = reader.fields["tokenizer.ggml.tokens"].contents()
    cfg = module.config_from_gguf(kv)

    file_bytes = path.stat().st_size
    by_name = {t.name: t for t in reader.tensors}
    cfg["tie_embeddings"] = "output.weight" not in by_name
    cfg["attn_bias"] = "blk.0.attn_q.bias" in by_name
    cfg["rope_freq_factors"] = "rope_freqs.weight" in by_name

    tensors: list[SourceTensor] = []
    keep_fallback: dict[str, DType] = {}
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > file_bytes:
            raise BundleError(f"{origin}: tensor {t.name!r} lies beyond the end of the file (truncated?)")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        qtype = GGMLQuantizationType(t.tensor_type)
        type_name = qtype.name

        # Usually one canonical tensor per GGUF tensor; an architecture may split fused ones by rows.
        pieces = [(t.name, None)]
        if hasattr(module, "gguf_tensors"):
            def load_whole(t=t, qtype=qtype, shape=shape) -> np.ndarray:
                raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1)
                return np.asarray(gguf_dequantize(np.ascontiguousarray(raw), qtype), dtype=np.float32).reshape(shape)
            pieces = module.gguf_tensors(t.name, shape, cfg, load_whole)
        for name, sel in pieces:
            order = None if sel is None else np.arange(shape[0])[sel]
            if gguf_arch == "llama" and (name.endswith(".attn_q.weight") or name.endswith(".attn_q.bias")):
                order = rope_unpermute_rows(shape[0], cfg["n_heads"])
            elif gguf_arch == "llama" and (name.endswith(".attn_k.weight") or name.endswith(".attn_k.bias")):
                order = rope_unpermute_rows(shape[0], cfg["n_kv_heads"])
            if order is not None and shape[0] % (2 * (cfg["n_heads"] if ".attn_q." in name else cfg["n_kv_heads"])):
                raise ConversionError(f"{origin}: tensor {name!r} has {shape[0]} rows, not a whole number of heads")

            def rows(t=t, shape=shape, order=order) -> np.ndarray:  # shape: the whole GGUF tensor's
                """The tensor's raw bytes as [rows, row_bytes], Q/K rows reordered."""
                n_rows = shape[0] if len(shape) > 1 else 1
                raw = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(n_rows, -1)
                if order is not None:
                    if len(shape) == 1:  # a bias: reorder its elements
                        return raw.reshape(shape[0], -1)[order].reshape(1, -1)
                    return raw[order]
                return raw

            piece_shape = shape if order is None else (len(order), *shape[1:])

            def load_f32(rows=rows, qtype=qtype, shape=piece_shape) -> np.ndarray:
                return np.asarray(gguf_dequantize(np.ascontiguousarray(rows()), qtype), dtype=np.float32).reshape(shape)

            native = _NATIVE.get(type_name)
            tensors.append(SourceTensor(
                name=name,
                shape=piece_shape,
                load_f32=load_f32,
                source_type=type_name,
                native=native,
                load_native=(lambda rows=rows: np.ascontiguousarray(rows()).reshape(-1))
                if native is not None else None,
            ))
            if native is None:
                keep_fallback[name] = _KEEP_FALLBACK
    check_tensors(tensors, cfg, origin, module.ARCH)

    try:
        tokenizer_json = tokenizer_json_from_gguf(gguf_tokenizer_fields(reader))
    except (UnsupportedModelError, BundleError, ConversionError):
        raise
    except Exception as e:
        raise ConversionError(f"{origin}: cannot build the tokenizer from the GGUF metadata ({e})") from e

    special = _special_tokens(kv)
    if not special["eos_ids"]:
        raise ConversionError(f"{origin}: the GGUF names no end-of-sequence token")
    return SourceModel(
        architecture=module.ARCH,
        config=cfg,
        tensors=tensors,
        tokenizer_json=tokenizer_json,
        chat_template=kv.get("tokenizer.chat_template") or None,
        special_tokens=special,
        generation=_generation(kv),
        source_format="gguf",
        source_name=origin,
        source_sha256=_sha256_file(path),
        keep_fallback=keep_fallback,
    )
