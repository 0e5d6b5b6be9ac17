"""Read a GGUF file (llama.cpp's format) into a SourceModel.

The container is parsed and bounds-checked by gguf_file.py; here the metadata pocketlm reads is
checked for type, what sizes anything is bounded by the tensor table, the config made from it is
checked by the loader's own schema (pocketlm.metadata, naming the GGUF key), and the tensors are
mapped to canonical ones. Names already are canonical. Things that change on
the way in:
  * shapes: GGUF lists dimensions innermost first, so GGUF [K, N] is our [N, K];
  * llama Q/K rows: llama.cpp's converter permutes them so that RoPE rotates adjacent pairs
    (x0,x1),(x2,x3)...; pocketlm, like transformers, rotates (x_i, x_{i+d/2}). We undo the
    permutation on whole rows, which never splits a quantization block, so quantized weights
    are moved bit for bit.
  * fused tensors (gpt2/phi3 attn_qkv, phi3 ffn_up holding gate+up): the model module's
    `gguf_tensors` splits them into canonical tensors by rows, bit for bit as well.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from pocketlm import models
from pocketlm.convert.gguf_file import (ARRAY, BOOL, FLOAT_TYPES, INTEGER_TYPES, MAGIC, STRING, GGUFFile,
                                        TensorInfo)
from pocketlm.convert.source import (SourceModel, SourceTensor, check_config_ranges, check_tensors, generation_defaults,
                                     sha256_files)
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ConversionError, UnsupportedModelError, shown
from pocketlm.metadata import MAX_POSITIONS

GGUF_MAGIC = MAGIC

# GGUF types pocketlm stores unchanged (same block layout, same dequantized values).
_NATIVE = {name: DType[name] for name in
           ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}

# With quant=None, GGUF types pocketlm has no kernels for (Q2_K, Q3_K, i-quants, ternary types, ...)
# are requantized to this type, which adds far less error than the source's own quantization.
_KEEP_FALLBACK = DType.Q8_0

# --- the metadata pocketlm reads: its type ------------------------------------------------------------------------
# "int", "float" (an integer is accepted too), "str", "bool", "<kind>[]" for an array; a tuple: any of these.
# "{arch}." keys are listed by the part after the architecture name.
_ARCH_KEY_KINDS = {
    "block_count": "int", "context_length": "int", "embedding_length": "int", "feed_forward_length": "int",
    "vocab_size": "int", "attention.head_count": "int", "attention.head_count_kv": "int",
    "attention.key_length": "int", "attention.value_length": "int", "rope.dimension_count": "int",
    "attention.sliding_window": "int", "attention.sliding_window_pattern": ("int", "bool[]"),
    "rope.scaling.original_context_length": "int",
    "attention.layer_norm_rms_epsilon": "float", "attention.layer_norm_epsilon": "float",
    "rope.freq_base": "float", "rope.freq_base_swa": "float", "rope.scaling.factor": "float",
    "rope.scaling.attn_factor": "float", "attn_logit_softcapping": "float", "final_logit_softcapping": "float",
    "rope.scaling.type": "str",
}
_TOKEN_ID_KEYS = tuple(f"tokenizer.ggml.{k}_token_id" for k in ("bos", "eos", "eot", "eom", "padding", "unknown"))
_KEY_KINDS = {
    "general.architecture": "str",
    "tokenizer.ggml.model": "str", "tokenizer.ggml.pre": "str", "tokenizer.chat_template": "str",
    "tokenizer.ggml.tokens": "str[]", "tokenizer.ggml.token_type": "int[]", "tokenizer.ggml.scores": "float[]",
    "tokenizer.ggml.merges": "str[]",
    "tokenizer.ggml.add_bos_token": "bool", "tokenizer.ggml.add_eos_token": "bool",
    "tokenizer.ggml.add_space_prefix": "bool",
    **{k: "int" for k in _TOKEN_ID_KEYS},
    "general.sampling.temp": "float", "general.sampling.top_k": "int", "general.sampling.top_p": "float",
    "general.sampling.min_p": "float", "general.sampling.penalty_repeat": "float",
}
# Canonical config entry -> the "{arch}." key it is read from, named in messages about the entry.
_CONFIG_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "embedding_length", "n_layers": "block_count",
    "n_heads": "attention.head_count", "n_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
    "ffn_dim": "feed_forward_length", "rope_dim": "rope.dimension_count", "max_position": "context_length",
    "rms_eps": "attention.layer_norm_rms_epsilon", "norm_eps": "attention.layer_norm_epsilon",
    "rope_theta": "rope.freq_base", "rope_local_theta": "rope.freq_base_swa",
    "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
    "sliding_window": "attention.sliding_window", "layer_windows": "attention.sliding_window",
    "rope_scaling.factor": "rope.scaling.factor", "rope_scaling.attention_factor": "rope.scaling.attn_factor",
    "rope_scaling.original_max_position_embeddings": "rope.scaling.original_context_length",
}
# Sampling defaults: bundle's generation key -> GGUF key.
_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
                  "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
                  "repetition_penalty": "general.sampling.penalty_repeat"}
_NOUNS = {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}


def _kind(gguf_type: int) -> str:
    if gguf_type in INTEGER_TYPES:
        return "int"
    if gguf_type in FLOAT_TYPES:
        return "float"
    return {STRING: "str", BOOL: "bool"}[gguf_type]


def _describe(kind: str) -> str:
    """"int" -> "an integer", "str[]" -> "an array of strings"."""
    if kind.endswith("[]"):
        return f"an array of {_NOUNS[kind[:-2]]}s"
    noun = _NOUNS[kind]
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def is_gguf_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


class _BackgroundHash:
    """The file's SHA-256 on a daemon thread, while the metadata and vocabulary are parsed (reads and
    hashlib release the GIL: on a 0.5B model's 491 MB it hid ~0.3 s of ~1.4 s). cancel() stops it
    within a 4 MiB read, so that a conversion that fails does not wait for a large file's hash."""

    def __init__(self, path: Path):
        self._cancelled = threading.Event()
        self._value: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(path,), name="pocketlm-sha256", daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._value = sha256_files([path], self._cancelled)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def cancel(self) -> None:
        self._cancelled.set()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def rope_unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved-RoPE Q/K rows back into HF order.

    Within each head of d rows llama.cpp stores HF row (j*d/2 + i) at position (2*i + j).
    """
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)


def _architecture(gf: GGUFFile):
    """The model module for the file's general.architecture."""
    arch = None
    if "general.architecture" in gf.fields:
        if gf.fields["general.architecture"].type != STRING:
            raise BundleError(f"{gf.name}: GGUF metadata 'general.architecture' is not a string")
        arch = gf.value("general.architecture", max_string=256)
    module = next((m for m in models.REGISTRY.values() if arch in getattr(m, "GGUF_ARCHS", ())), None)
    if module is None:
        supported = sorted(a for m in models.REGISTRY.values() for a in getattr(m, "GGUF_ARCHS", ()))
        what = "names no architecture" if arch is None else f"architecture {shown(arch)} is not supported"
        raise UnsupportedModelError(f"{gf.name}: GGUF {what} (supported: {', '.join(supported)})")
    return arch, module


def _metadata(gf: GGUFFile, arch: str) -> dict:
    """GGUF key -> Python value: every scalar and string, and the arrays a model or the tokenizer
    reads ("tokenizer.*" and "<arch>.*"; other arrays are never decoded). The keys pocketlm reads
    are checked for type and must decode within the reader's limits; another key that does not
    (too long, not UTF-8) is left out."""
    kv = {}
    for key, field in gf.fields.items():
        want = _KEY_KINDS.get(key) or (_ARCH_KEY_KINDS.get(key[len(arch) + 1:]) if key.startswith(arch + ".")
                                       else None)
        have = _kind(field.elem_type) + "[]" if field.type == ARRAY else _kind(field.type)
        if want is not None:
            wants = want if isinstance(want, tuple) else (want,)
            if not any(have == w or (have, w) in (("int", "float"), ("int[]", "float[]")) for w in wants):
                raise BundleError(f"{gf.name}: GGUF metadata {shown(key)} is {_describe(have)}; "
                                  f"{' or '.join(_describe(w) for w in wants)} is expected")
        if want is not None:
            kv[key] = gf.value(key)
        elif field.type != ARRAY or key.startswith(("tokenizer.", arch + ".")):
            try:  # a key pocketlm does not read (tokenizer.huggingface.json may be megabytes): kept if it decodes
                kv[key] = gf.value(key)
            except BundleError:
                pass
    return kv


def _check_metadata(kv: dict, arch: str, gf: GGUFFile) -> None:
    """What the model module and the tensor mapping size or divide by, bounded by the tensor table
    before they read it: the layer count, sizes and head counts, the window pattern; and the
    tokenizer's ids against its token list. Every other value is checked in the config the module
    makes, by the loader's own schema (check_config_ranges)."""
    origin = gf.name
    n_tensors = len(gf.tensors)
    largest = max((d for t in gf.tensors for d in t.dims), default=0)  # every size below is some tensor's

    def bad(key: str, must: str):
        raise BundleError(f"{origin}: GGUF metadata {shown(key)} is {shown(kv[key])}; it must be {must}")

    def int_in(key: str, lo: int, hi: int, why: str = "") -> None:
        if key in kv and not lo <= kv[key] <= hi:
            bad(key, f"in {lo}..{hi}{why}")

    a = arch + "."
    int_in(a + "block_count", 1, n_tensors, " (each layer has tensors)")
    for size in ("embedding_length", "feed_forward_length", "vocab_size", "attention.head_count",
                 "attention.head_count_kv", "attention.key_length", "attention.value_length",
                 "rope.dimension_count"):
        int_in(a + size, 1, largest, " (the largest tensor dimension)")
    heads, kv_heads = kv.get(a + "attention.head_count"), kv.get(a + "attention.head_count_kv")
    if heads is not None and kv_heads is not None and heads % kv_heads:  # Q/K rows are regrouped by heads
        bad(a + "attention.head_count_kv", f"a divisor of attention.head_count ({heads})")
    hidden = kv.get(a + "embedding_length")
    if heads is not None and hidden is not None and a + "attention.key_length" not in kv and hidden < heads:
        bad(a + "attention.head_count", f"at most embedding_length ({hidden}) when key_length is not given")
    pattern = kv.get(a + "attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) != kv.get(a + "block_count"):
        raise BundleError(f"{origin}: GGUF metadata {a}attention.sliding_window_pattern has {len(pattern)} "
                          f"entries for {kv.get(a + 'block_count')} layers")
    if isinstance(pattern, int):
        int_in(a + "attention.sliding_window_pattern", 0, MAX_POSITIONS)
    # LongRoPE's attention factor divides by log(original context): 0 is none, 1 would divide by 0
    int_in(a + "rope.scaling.original_context_length", 0, MAX_POSITIONS)
    if kv.get(a + "rope.scaling.original_context_length") == 1:
        bad(a + "rope.scaling.original_context_length", "0 (none) or at least 2")

    tokens = kv.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = kv.get(a + "vocab_size")
        if not tokens or len(tokens) > (vocab or largest):
            raise BundleError(f"{origin}: GGUF metadata tokenizer.ggml.tokens has {len(tokens)} tokens; it must "
                              f"have 1..{vocab or largest} ({'vocab_size' if vocab else 'the largest dimension'})")
        for key in _TOKEN_ID_KEYS:
            int_in(key, 0, len(tokens) - 1, " (the token list)")


def _source_names(kv: dict, arch: str) -> dict[str, str]:
    """Canonical config entry -> the GGUF key it was read from, for the keys the file has."""
    return {entry: arch + "." + key for entry, key in _CONFIG_KEYS.items() if arch + "." + key in kv}


def _config(module, kv: dict, gf: GGUFFile, arch: str) -> dict:
    try:
        return module.config_from_gguf(kv)
    except (UnsupportedModelError, BundleError, ConversionError):
        raise
    except (ArithmeticError, TypeError, ValueError, KeyError) as e:
        # The checks above leave nothing known to fail here; a model module that reads a key they
        # do not cover still gives one clean line rather than a traceback.
        raise BundleError(f"{gf.name}: the GGUF metadata does not describe a valid {arch} model "
                          f"({type(e).__name__}: {shown(str(e))})") from None


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


def _generation(kv: dict, origin: str) -> dict:
    return generation_defaults({ours: (key, kv.get(key)) for ours, key in _SAMPLING_KEYS.items()}, origin)


def _source_types() -> frozenset[str]:
    """GGUF tensor types pocketlm converts: its own, and those gguf's numpy code can dequantize."""
    from gguf.quants import _type_traits

    return frozenset(_NATIVE) | frozenset(t.name for t in _type_traits)


def _check_tensor_types(gf: GGUFFile) -> None:
    supported = _source_types()
    for t in gf.tensors:
        if t.type_name not in supported:
            raise UnsupportedModelError(
                f"{gf.name}: tensor {shown(t.name)} has GGUF type {t.type_name}, which pocketlm cannot convert "
                f"(supported: {', '.join(sorted(supported))})")


def read_gguf(path: Path) -> SourceModel:
    path = Path(path)
    origin = path.name
    gf = GGUFFile(path)
    hashing = _BackgroundHash(path)
    try:
        return _read_gguf(path, origin, gf, hashing)
    finally:
        hashing.cancel()  # a no-op once it is done; else (a failure) it stops reading


def _read_gguf(path: Path, origin: str, gf: GGUFFile, hashing: _BackgroundHash) -> SourceModel:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    from pocketlm.tokenizer import tokenizer_json_from_gguf

    gguf_arch, module = _architecture(gf)
    _check_tensor_types(gf)
    kv = _metadata(gf, gguf_arch)
    _check_metadata(kv, gguf_arch, gf)
    cfg = _config(module, kv, gf, gguf_arch)

    by_name = {t.name: t for t in gf.tensors}
    cfg["tie_embeddings"] = "output.weight" not in by_name
    cfg["attn_bias"] = "blk.0.attn_q.bias" in by_name
    cfg["rope_freq_factors"] = "rope_freqs.weight" in by_name

    tensors: list[SourceTensor] = []
    keep_fallback: dict[str, DType] = {}
    for t in gf.tensors:
        shape = t.shape
        qtype = GGMLQuantizationType(t.type_id)
        n_rows = shape[0] if len(shape) > 1 else 1

        def raw_rows(t: TensorInfo = t, n_rows: int = n_rows) -> np.ndarray:
            """[rows, row_bytes]: every dimension but the outermost lies inside a row."""
            return gf.tensor_bytes(t).reshape(n_rows, -1)

        # Usually one canonical tensor per GGUF tensor; an architecture may split fused ones by rows.
        pieces = [(t.name, None)]
        if hasattr(module, "gguf_tensors"):
            def load_whole(raw_rows=raw_rows, qtype=qtype, shape=shape) -> np.ndarray:
                return np.asarray(gguf_dequantize(np.ascontiguousarray(raw_rows()), qtype),
                                  dtype=np.float32).reshape(shape)
            pieces = module.gguf_tensors(t.name, shape, cfg, load_whole)
        for name, sel in pieces:
            order = None if sel is None else np.arange(shape[0])[sel]
            if gguf_arch == "llama" and name.endswith((".attn_q.weight", ".attn_q.bias", ".attn_k.weight",
                                                       ".attn_k.bias")):
                heads = cfg["n_heads"] if ".attn_q." in name else cfg["n_kv_heads"]
                if shape[0] % (2 * heads):
                    raise ConversionError(f"{origin}: tensor {shown(name)} has {shape[0]} rows, not a whole "
                                          f"number of heads of even size ({heads} heads)")
                order = rope_unpermute_rows(shape[0], heads)

            def rows(raw_rows=raw_rows, shape=shape, order=order) -> np.ndarray:  # shape: the whole tensor's
                """The tensor's raw bytes as [rows, row_bytes], Q/K rows reordered."""
                raw = raw_rows()
                if order is not None:
                    if len(shape) == 1:  # a bias: reorder its elements
                        return raw.reshape(shape[0], -1)[order].reshape(1, -1)
                    return raw[order]
                return raw

            piece_shape = shape if order is None else (len(order), *shape[1:])

            def load_f32(rows=rows, qtype=qtype, shape=piece_shape) -> np.ndarray:
                return np.asarray(gguf_dequantize(np.ascontiguousarray(rows()), qtype), dtype=np.float32).reshape(shape)

            native = _NATIVE.get(t.type_name)
            tensors.append(SourceTensor(
                name=name,
                shape=piece_shape,
                load_f32=load_f32,
                source_type=t.type_name,
                native=native,
                load_native=(lambda rows=rows: np.ascontiguousarray(rows()).reshape(-1))
                if native is not None else None,
            ))
            if native is None:
                keep_fallback[name] = _KEEP_FALLBACK
    # After the tensors: an architecture may move some into the config (LongRoPE factors).
    check_config_ranges(cfg, [t.dims for t in gf.tensors], f"{origin} (GGUF metadata)", _source_names(kv, gguf_arch))
    check_tensors(tensors, cfg, origin, module.ARCH)

    fields = {k: v for k, v in kv.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    try:
        tokenizer_json = tokenizer_json_from_gguf(fields)
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
        generation=_generation(kv, origin),
        source_format="gguf",
        source_name=origin,
        source_sha256=hashing.result(),
        keep_fallback=keep_fallback,
    )
