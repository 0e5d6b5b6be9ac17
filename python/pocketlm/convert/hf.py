"""Read a Hugging Face checkpoint folder (config.json, safetensors, tokenizer files) into a SourceModel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pocketlm import models
from pocketlm.convert.safetensors_np import SafetensorsFile
from pocketlm.convert.source import (SourceModel, SourceTensor, check_config_ranges, check_tensors, generation_defaults,
                                     sha256_files)
from pocketlm.errors import BundleError, ConversionError, UnsupportedModelError, shown
from pocketlm.tokenizer import compact_tokenizer_json


# As the .plm reader's limit on tensor names; checkpoint names are under 100 characters.
MAX_NAME_CHARS = 1024

# Canonical config entry -> the config.json keys it is read from (the first one present), so that a
# message about the entry names what the user finds in the file. GPT-2's own names come first: a
# GPT-2 config holds only those, other configs none of them.
_CONFIG_KEYS = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("n_embd", "hidden_size"),
    "n_layers": ("n_layer", "num_hidden_layers"),
    "n_heads": ("n_head", "num_attention_heads"),
    "n_kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "ffn_dim": ("n_inner", "intermediate_size"),
    "max_position": ("n_positions", "max_position_embeddings"),
    "rms_eps": ("rms_norm_eps",),
    "norm_eps": ("layer_norm_epsilon",),
    "rope_theta": ("rope_theta", "rope_parameters.rope_theta", "rope_parameters.full_attention.rope_theta"),
    "rope_local_theta": ("rope_local_base_freq", "rope_parameters.sliding_attention.rope_theta"),
    "rope_scaling": ("rope_scaling", "rope_parameters.full_attention", "rope_parameters"),
    "rope_local_scaling": ("rope_parameters.sliding_attention",),
    "query_pre_attn_scalar": ("query_pre_attn_scalar",),
    "attn_softcap": ("attn_logit_softcapping",),
    "final_softcap": ("final_logit_softcapping",),
    "sliding_window": ("sliding_window",),
    "layer_windows": ("sliding_window",),
}
# config.json entries a model module sizes a list by (one item per layer) while reading the config.
_LAYER_COUNTS = ("num_hidden_layers", "n_layer")


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{path.parent.name}/{path.name}: cannot read JSON ({e})") from None


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        doc = _read_json(index)
        weight_map = (doc.get("weight_map") if isinstance(doc, dict) else None) or {}
        names = weight_map.values() if isinstance(weight_map, dict) else [weight_map]
        # shards are files of this folder: a name with a path in it could point anywhere
        bad = next((f for f in names if not (isinstance(f, str) and f and Path(f).name == f)), None)
        if bad is not None:
            raise BundleError(f"{folder.name}: model.safetensors.index.json names {shown(bad)} as a shard; a "
                              "weight_map must map tensor names to file names in the folder")
        files = sorted({folder / f for f in names})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise BundleError(f"{folder.name}: shard(s) listed in model.safetensors.index.json are missing: "
                              f"{', '.join(shown(m) for m in missing[:3])}{more}")
        if not files:
            raise BundleError(f"{folder.name}: model.safetensors.index.json lists no tensors")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    hint = " (only PyTorch .bin weights found; re-save with safe_serialization=True)" if any(
        folder.glob("*.bin")) else ""
    raise BundleError(f"{folder.name}: no model.safetensors or model.safetensors.index.json{hint}")


def source_files(folder: Path) -> list[Path]:
    """The files whose content identifies the checkpoint (hashed into provenance and the cache key)."""
    return [folder / "config.json", *safetensors_files(folder)]


def _token_ids(tokenizer: dict) -> dict[str, int]:
    """Token string -> id from tokenizer.json's vocabulary and added tokens."""
    ids: dict[str, int] = {}
    vocab = (tokenizer.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel
        ids.update(vocab)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        ids.update({piece[0]: i for i, piece in enumerate(vocab)})
    for tok in tokenizer.get("added_tokens") or []:
        ids[tok["content"]] = int(tok["id"])
    return ids


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    # transformers >= 4.43 may save the template beside tokenizer_config.json instead of inside it.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tmpl = _optional_json(folder / "chat_template.json").get("chat_template") or tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tmpl}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return tmpl or None


def _special_tokens(config: dict, gen_cfg: dict, tok_cfg: dict, tokenizer: dict, origin: str) -> dict:
    ids = _token_ids(tokenizer)

    def lookup(key: str) -> int | None:
        s = _token_str(tok_cfg.get(key))
        if s is None:
            return None
        if s not in ids:
            raise ConversionError(f"{origin}: tokenizer_config.json's {key} {shown(s)} is not in tokenizer.json")
        return ids[s]

    bos = lookup("bos_token")
    if bos is None:
        bos = next((v for v in (gen_cfg.get("bos_token_id"), config.get("bos_token_id")) if v is not None), None)
    eos: list[int] = []
    for v in (*_as_id_list(gen_cfg.get("eos_token_id")), *_as_id_list(config.get("eos_token_id")), lookup("eos_token")):
        if v is not None and v not in eos:
            eos.append(int(v))
    sep = None if eos else lookup("sep_token")
    if sep is not None:  # an encoder (BERT): its separator ends a text
        eos.append(sep)
    pad = lookup("pad_token")
    if pad is None:
        pad = next((v for v in (gen_cfg.get("pad_token_id"), config.get("pad_token_id")) if v is not None), None)
    if not eos:
        raise ConversionError(f"{origin}: no end-of-sequence token found (generation_config.json, config.json "
                              "and tokenizer_config.json name none)")
    return {
        "bos_id": None if bos is None else int(bos),
        "eos_ids": eos,
        "pad_id": None if pad is None else int(_as_id_list(pad)[0]),
        # tokenizer.json's post-processor already adds BOS when the model wants it.
        "add_bos": False,
    }


_POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                  "pooling_mode_lasttoken": "last"}


def _sentence_transformers(folder: Path, origin: str) -> dict:
    """The pooling and normalisation a sentence-transformers folder declares (modules.json), as config
    entries; {} for a folder without modules.json."""
    modules = _optional_json(folder / "modules.json")
    if not modules:
        return {}
    if not isinstance(modules, list):
        raise BundleError(f"{origin}/modules.json: not a JSON array")
    out: dict = {"normalize": False}
    for m in modules:
        kind = m.get("type", "") if isinstance(m, dict) else ""
        if kind.endswith(".Normalize"):
            out["normalize"] = True
        elif kind.endswith(".Pooling"):
            path = m.get("path")
            if not isinstance(path, str) or ".." in Path(path).parts or Path(path).is_absolute():
                raise BundleError(f"{origin}/modules.json: bad Pooling path {shown(path)}")
            pooling = _optional_json(folder / path / "config.json")
            modes = [mode for key, mode in _POOLING_MODES.items() if pooling.get(key)]
            other = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES]
            if len(modes) != 1 or other:
                chosen = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode_") and v)
                raise UnsupportedModelError(f"{origin}: sentence-transformers pooling {shown(chosen)} is not "
                                            "supported (one of mean, cls, lasttoken is)")
            out["pooling"] = modes[0]
    return out


def _generation(gen_cfg: dict, origin: str) -> dict:
    found = {key: (key, gen_cfg.get(key)) for key in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    found["max_tokens"] = ("max_new_tokens", gen_cfg.get("max_new_tokens"))
    return generation_defaults(found, f"{origin}/generation_config.json")


def _config_value(config: dict, path: str):
    """config.json's value at a dotted path, or None."""
    v = config
    for part in path.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


def _source_names(config: dict) -> dict[str, str]:
    """Canonical config entry -> the config.json key it was read from, for the entries the file gives."""
    names = {}
    for entry, keys in _CONFIG_KEYS.items():
        key = next((k for k in keys if _config_value(config, k) is not None), None)
        if key is not None:
            names[entry] = key
    return names


def _check_layer_counts(config: dict, n_tensors: int, where: str) -> None:
    """The layer counts config.json gives, bounded by the tensor table before a model module reads
    the config: it builds one list item per layer (layer types, windows), and 2^32 layers was a
    4-billion-item list, then MemoryError."""
    for key in _LAYER_COUNTS:
        v = config.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= n_tensors):
            raise BundleError(f"{where}: {key} gives {shown(v)} layers; it must be 1..{n_tensors} (an integer: "
                              "each layer has tensors)")
    types = config.get("layer_types")
    if types is not None and not (isinstance(types, list) and len(types) <= n_tensors):
        got = f"{len(types)} entries" if isinstance(types, list) else shown(types)
        raise BundleError(f"{where}: layer_types must be an array of at most {n_tensors} entries (one per layer; "
                          f"each layer has tensors), got {got}")


def read_hf(folder: Path) -> SourceModel:
    folder = Path(folder)
    origin = folder.resolve().name
    if not (folder / "config.json").is_file():
        raise BundleError(f"{origin}: no config.json; not a Hugging Face checkpoint folder")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise BundleError(f"{origin}/config.json: not a JSON object")
    arch = models.arch_from_hf(config)
    module = models.get(arch)
    files = safetensors_files(folder)
    shards = [SafetensorsFile(f) for f in files]
    tensor_dims = [st.shape(n) for st in shards for n in st.keys()]
    _check_layer_counts(config, len(tensor_dims), f"{origin}/config.json")
    try:
        cfg = module.config_from_hf(config)
    except (UnsupportedModelError, BundleError, ConversionError):
        raise
    except (ArithmeticError, TypeError, ValueError, KeyError) as e:  # a value of the wrong type or range
        raise BundleError(f"{origin}/config.json: does not describe a valid {arch} model "
                          f"({type(e).__name__}: {shown(str(e))})") from None
    check_config_ranges(cfg, tensor_dims, f"{origin}/config.json", _source_names(config))
    if cfg.get("encoder"):
        cfg.update(_sentence_transformers(folder, origin))

    tok_path = folder / "tokenizer.json"
    if not tok_path.is_file():
        raise BundleError(f"{origin}: no tokenizer.json (pocketlm needs the fast-tokenizer file; "
                          "save the tokenizer with transformers' AutoTokenizer to create it)")
    tokenizer_text = tok_path.read_text(encoding="utf-8")
    try:
        tokenizer = json.loads(tokenizer_text)
    except ValueError as e:
        raise BundleError(f"{origin}/tokenizer.json: not valid JSON ({e})") from None
    tok_cfg = _optional_json(folder / "tokenizer_config.json")
    gen_cfg = _optional_json(folder / "generation_config.json")

    tensors: list[SourceTensor] = []
    for st in shards:
        for hf_name in st.keys():
            if len(hf_name) > MAX_NAME_CHARS:
                raise BundleError(f"{origin}: tensor {shown(hf_name)} has a name longer than {MAX_NAME_CHARS} "
                                  "characters")
            # usually one canonical tensor per HF tensor; fused or transposed ones are split here
            for name, shape, transform in models.hf_tensors(module, hf_name, tuple(st.shape(hf_name)), cfg):
                tensors.append(SourceTensor(
                    name=name,
                    shape=tuple(shape),
                    load_f32=lambda st=st, n=hf_name, fn=transform: st.load_f32(n) if fn is None
                    else np.ascontiguousarray(fn(st.load_f32(n)), dtype=np.float32),
                    source_type=st.dtype(hf_name).lower(),
                ))
    names = {t.name for t in tensors}
    cfg["tie_embeddings"] = bool(cfg.get("tie_embeddings")) or "output.weight" not in names
    if cfg["tie_embeddings"]:
        tensors = [t for t in tensors if t.name != "output.weight"]
    cfg["attn_bias"] = bool(cfg.get("attn_bias")) or "blk.0.attn_q.bias" in names
    cfg["rope_freq_factors"] = False
    check_tensors(tensors, cfg, origin, arch)
    try:
        special = _special_tokens(config, gen_cfg, tok_cfg, tokenizer, origin)
    except (UnsupportedModelError, BundleError, ConversionError):
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # an id or entry of the wrong type
        raise BundleError(f"{origin}: the special tokens in config.json, generation_config.json, "
                          f"tokenizer_config.json or tokenizer.json are malformed ({type(e).__name__}: "
                          f"{shown(str(e))})") from None

    return SourceModel(
        architecture=arch,
        config=cfg,
        tensors=tensors,
        tokenizer_json=compact_tokenizer_json(tokenizer),  # faster to load, same tokenizer
        chat_template=_chat_template(folder, tok_cfg),
        special_tokens=special,
        generation=_generation(gen_cfg, origin),
        source_format="hf",
        source_name=origin,
        source_sha256=sha256_files([folder / "config.json", *files]),
    )
