"""A bundle described for people: `pocketlm inspect`'s text (model, tokenizer, defaults, provenance,
tensors and totals per type)."""

from __future__ import annotations

import json
import os
from typing import Any

from pocketlm.bundle.reader import Bundle, read_bundle
from pocketlm.dtypes import DType
from pocketlm.metadata import MetadataError, parse_json_bounded


def _bitmask_stored(bundle, t) -> int:
    """The values an I8_BITMASK tensor stores (its masks' bits, pocketlm.quant.check_bitmask)."""
    import numpy as np

    from pocketlm.quant import check_bitmask

    return int(check_bitmask(np.asarray(bundle.tensor(t.name)).reshape(-1).view(np.uint8), *t.shape).sum())


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def _pairs(value) -> str:
    """A metadata entry on one line: a dict as k=v pairs (values shortened), "-" when absent or empty."""
    if isinstance(value, dict):
        return " ".join(f"{k}={_short(v, 40)}" for k, v in value.items()) or "-"
    return "-" if value is None else value


def _short(value: Any, width: int = 72) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _vocab_size(tokenizer: dict) -> int | None:
    if isinstance(tokenizer.get("vocab_size"), int):
        return tokenizer["vocab_size"]
    if tokenizer.get("type") != "hf-json" or not isinstance(tokenizer.get("json"), str):
        return None
    try:
        spec = parse_json_bounded(tokenizer["json"])
        vocab = spec["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [tok["id"] for tok in spec.get("added_tokens") or []]
        return max(ids) + 1 if ids else 0
    except (ValueError, KeyError, TypeError, AttributeError, MetadataError):
        return None


def _table(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def describe(bundle: Bundle | str | os.PathLike, show_tensors: bool = True) -> str:
    """Human-readable summary of a bundle: model, tokenizer, defaults, provenance, tensors."""
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    meta = bundle.metadata
    lines: list[str] = []

    def field(label: str, value: Any) -> None:
        lines.append(f"{label:<15} {value}")

    def block(label: str, items: Any) -> None:
        if not isinstance(items, dict) or not items:
            field(label, "-" if items in (None, {}, "") else _short(items))
            return
        lines.append(label)
        width = max(len(str(k)) for k in items)
        for k, v in items.items():
            lines.append(f"  {str(k):<{width}}  {_short(v)}")

    field("file", f"{bundle.path} ({_human_bytes(bundle.file_bytes)}, format v{bundle.version})")
    field("architecture", meta.get("architecture", "-"))
    block("config", meta.get("config"))
    field("quantization", _pairs(meta.get("quantization")))
    if "pruning" in meta:
        field("pruning", _pairs(meta.get("pruning")))
    tok = meta.get("tokenizer")
    if isinstance(tok, dict):
        vocab = _vocab_size(tok)
        field("tokenizer", f"{tok.get('type', '?')}" + (f", vocab {vocab}" if vocab is not None else ""))
    else:
        field("tokenizer", "-")
    template = meta.get("chat_template")
    field("chat template", f"present ({len(template)} chars)" if isinstance(template, str) and template else "none")
    field("special tokens", _pairs(meta.get("special_tokens")))
    field("generation", _pairs(meta.get("generation")))
    block("provenance", meta.get("provenance"))

    tensors = bundle.tensors
    if show_tensors and tensors:
        lines += ["", f"tensors ({len(tensors)})"]
        sparse = any(t.dtype.sparse or t.dtype.bitmask for t in tensors)  # a sparsity column, if any

        def sparsity(t) -> str:
            if t.dtype.sparse:
                return "2:4 (50 %)"
            if t.dtype.bitmask:  # the share of columns the masks leave out
                return f"{100 * (1 - _bitmask_stored(bundle, t) / t.n_elements):.1f} %"
            return "-"

        rows = [["name", "type", "shape", "size"] + (["sparsity"] if sparse else [])]
        rows += [
            [t.name, t.dtype.label, " x ".join(str(d) for d in t.shape), _human_bytes(t.nbytes)]
            + ([sparsity(t)] if sparse else [])
            for t in tensors
        ]
        lines += _table(rows, right={3})

    per_type: dict[DType, list[int]] = {}  # dtype -> [tensors, parameters, bytes]
    for t in tensors:
        acc = per_type.setdefault(t.dtype, [0, 0, 0])
        acc[0] += 1
        acc[1] += t.n_elements
        acc[2] += t.nbytes
    total_params = sum(a[1] for a in per_type.values())
    total_bytes = sum(a[2] for a in per_type.values())
    lines += ["", f"totals: {len(tensors)} tensors, {total_params:,} parameters ({_human_count(total_params)})"]
    if per_type:
        rows = [["type", "tensors", "parameters", "bytes", "bits/weight"]]
        for dtype in sorted(per_type):
            n, params, nbytes = per_type[dtype]
            rows.append([dtype.label, str(n), f"{params:,}", _human_bytes(nbytes), f"{8 * nbytes / params:.2f}"])
        rows.append(["all", str(len(tensors)), f"{total_params:,}", _human_bytes(total_bytes),
                     f"{8 * total_bytes / total_params:.2f}"])
        lines += _table(rows, right={1, 2, 3, 4})
    return "\n".join(lines) + "\n"
