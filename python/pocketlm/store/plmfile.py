'''Plmfile: a model package recipe, as Ollama's Modelfile (`pocketlm create NAME -f Plmfile`).

    # A comment is a line starting with #; blank lines are ignored; instructions are case-insensitive.
    # FROM: a .gguf, a Hugging Face folder, a .plm, a store reference or a known model name
    # (paths relative to the Plmfile's folder).
    FROM ./qwen2.5-0.5b-instruct-q4_k_m.gguf
    # QUANT: convert a GGUF / Hugging Face source to f32, f16, int8, int4 or keep
    QUANT int4
    # PARAMETER: sampling defaults, by Ollama's names or pocketlm's; num_ctx the context; stop repeatable
    PARAMETER temperature 0.2
    PARAMETER num_ctx 8192
    PARAMETER stop "<|im_end|>"
    # SYSTEM: the system prompt when a conversation has none
    SYSTEM """You answer in one sentence."""
    # TEMPLATE: a Jinja chat template (transformers' convention, not Ollama's Go templates)
    TEMPLATE """{% for m in messages %}..."""
    LICENSE """Apache-2.0"""

Values run to the end of the line (a # there is part of the value), or between triple quotes over several lines; a double-quoted
value takes JSON escapes. The package is a store entry: its bundle plus small layers for the rest
(pocketlm.store.manifest); FROM a store reference inherits that entry's parameters, system prompt,
template and license, which the Plmfile's own lines override.
'''

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pocketlm.errors import InvalidInputError
from pocketlm.metadata import generation_problem

# Ollama's parameter names -> pocketlm's (generation.*), and the ones that are pocketlm's already
PARAMETER_NAMES = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                   "repeat_penalty": "repetition_penalty", "repetition_penalty": "repetition_penalty",
                   "seed": "seed", "num_predict": "max_tokens",
                   "max_tokens": "max_tokens", "num_ctx": "num_ctx", "stop": "stop"}
_INTEGERS = {"top_k", "seed", "max_tokens", "num_ctx"}
QUANTS = ("f32", "f16", "int8", "int4", "keep")
MAX_PLMFILE = 1 << 20


class PlmfileError(InvalidInputError):
    """A Plmfile that cannot be read: the message names the line."""


@dataclass
class Plmfile:
    source: str
    folder: Path
    quant: str | None = None
    params: dict = field(default_factory=dict)
    context: int | None = None
    system: str | None = None
    template: str | None = None
    license: str | None = None


def _value(text: str, lines: list[str], i: int, where: str) -> tuple[str, int]:
    """The value starting at `text` on line i: a triple-quoted block (maybe over lines), a JSON
    string, or the rest of the line. Returns (value, index of the last line used)."""
    s = text.strip()
    if s.startswith('"""'):
        body = s[3:]
        if '"""' in body:
            value, _, after = body.partition('"""')
            if after.strip():
                raise PlmfileError(f"{where}: text after the closing \"\"\"")
            return value, i
        parts = [body]
        for j in range(i + 1, len(lines)):
            if '"""' in lines[j]:
                value, _, after = lines[j].partition('"""')
                if after.strip():
                    raise PlmfileError(f"line {j + 1}: text after the closing \"\"\"")
                parts.append(value)
                return "\n".join(parts).strip("\n"), j
            parts.append(lines[j])
        raise PlmfileError(f"{where}: a \"\"\" block that never closes")
    if s.startswith('"'):
        try:
            v = json.loads(s)
        except ValueError:
            raise PlmfileError(f"{where}: a quoted value must be one JSON string, got {s[:60]!r}") from None
        if not isinstance(v, str):
            raise PlmfileError(f"{where}: a quoted value must be one JSON string")
        return v, i
    return s, i


def parse_plmfile(text: str, folder: str | os.PathLike = ".") -> Plmfile:
    if len(text) > MAX_PLMFILE:
        raise PlmfileError(f"a Plmfile is at most {MAX_PLMFILE} bytes")
    lines = text.replace("\r\n", "\n").split("\n")  # only newlines end lines (not U+2028 and the like)
    out: Plmfile | None = None
    pending: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    i = 0
    while i < len(lines):
        raw = lines[i]
        stripped = raw.strip()
        where = f"line {i + 1}"
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        parts = stripped.split(None, 1)
        word, rest = parts[0].upper(), (parts[1] if len(parts) > 1 else "")
        if word not in ("FROM", "QUANT", "PARAMETER", "SYSTEM", "TEMPLATE", "LICENSE"):
            raise PlmfileError(f"{where}: unknown instruction {word[:40]!r} (FROM, QUANT, PARAMETER, SYSTEM, "
                               "TEMPLATE, LICENSE; ADAPTER and MESSAGE are not supported)")
        if word != "PARAMETER" and word in seen:
            raise PlmfileError(f"{where}: a second {word}")
        seen.add(word)
        if word == "PARAMETER":
            parts = rest.split(None, 1)
            name, value_text = (parts[0], parts[1]) if len(parts) > 1 else (rest.strip(), "")
            value, i = _value(value_text, lines, i, where)
            pending.append((where, name, value))
        else:
            value, i = _value(rest, lines, i, where)
            pending.append((where, word, value))
        i += 1
    froms = [v for w, k, v in pending if k == "FROM"]
    if not froms or not froms[0].strip():
        raise PlmfileError("a Plmfile needs a FROM line (the model to package)")
    out = Plmfile(source=froms[0].strip(), folder=Path(folder))
    for where, key, value in pending:
        if key == "FROM":
            continue
        if key == "QUANT":
            if value.strip().lower() not in QUANTS:
                raise PlmfileError(f"{where}: QUANT must be one of {', '.join(QUANTS)}, got {value[:40]!r}")
            out.quant = value.strip().lower()
        elif key == "SYSTEM":
            out.system = value
        elif key == "TEMPLATE":
            out.template = value
        elif key == "LICENSE":
            out.license = value
        else:
            _parameter(out, key, value, where)
    return out


def _parameter(out: Plmfile, name: str, value: str, where: str) -> None:
    key = PARAMETER_NAMES.get(name.lower())
    if key is None:
        raise PlmfileError(f"{where}: unknown parameter {name[:40]!r} (known: {', '.join(sorted(PARAMETER_NAMES))})")
    if key == "stop":
        if not value or len(value) > 256:
            raise PlmfileError(f"{where}: a stop string is 1-256 characters")
        out.params.setdefault("stop", [])
        if len(out.params["stop"]) >= 16:
            raise PlmfileError(f"{where}: at most 16 stop strings")
        out.params["stop"].append(value)
        return
    try:
        v: int | float = int(value) if key in _INTEGERS else float(value)
    except ValueError:
        raise PlmfileError(f"{where}: {name} must be {'an integer' if key in _INTEGERS else 'a number'}, "
                           f"got {value[:40]!r}") from None
    if key == "num_ctx":
        if not 1 <= v <= 1 << 24:
            raise PlmfileError(f"{where}: num_ctx must be in [1, 16777216], got {value[:40]!r}")
        out.context = int(v)
        return
    problem = generation_problem(key, v, name)
    if problem:
        raise PlmfileError(f"{where}: {problem}")
    out.params[key] = v


def create(name: str, plmfile: str | os.PathLike, store=None, progress: bool = True) -> tuple[str, str]:
    """Builds the package a Plmfile describes into the store under `name`; returns (the reference,
    the manifest's digest)."""
    from pocketlm.store.local import Store
    from pocketlm.store.reference import parse_reference

    path = Path(plmfile)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlmfileError(f"{path}: not UTF-8 text") from None
    spec = parse_plmfile(text, path.parent)
    parse_reference(name)  # a bad name fails before any work
    store = store or Store()
    if spec.template is not None:
        from pocketlm.chat import render_chat

        render_chat(spec.template, [{"role": "user", "content": "x"}], add_generation_prompt=True)  # fails here
    base = _store_base(spec)
    params, system, template, license_text, context = {}, None, None, None, None
    signature = None
    if base is not None:  # FROM a store entry: its package, overridden below
        if spec.quant:
            raise PlmfileError(f"QUANT converts a GGUF or Hugging Face source; FROM {spec.source} is a pocketlm bundle")
        bundle = base.path
        params, system, template, license_text, context = (dict(base.params), base.system, base.template,
                                                           base.license, base.context)
        title = base.manifest.layer("application/vnd.cncf.model.weight.v1.raw").title
        signature = base.signatures[0].read_bytes() if base.signatures else None
    else:
        bundle = _source_path(spec)
        title = bundle.stem + ".plm" if bundle.is_file() else bundle.resolve().name + ".plm"
    params.update(spec.params)
    system = spec.system if spec.system is not None else system
    template = spec.template if spec.template is not None else template
    license_text = spec.license if spec.license is not None else license_text
    context = spec.context or context
    if base is None and (spec.quant or not _is_plm(bundle)):
        from pocketlm.convert import convert

        with tempfile.TemporaryDirectory(dir=store.root / "ingest") as tmp:
            out = convert(bundle, Path(tmp) / title, quant=None if spec.quant == "keep" else spec.quant,
                          progress=progress)
            return store.add_model(name, out, params=params, system=system, template=template,
                                   license_text=license_text, context=context, title=title, move=True)
    if base is None:
        from pocketlm.signing import default_signature_path

        sig = default_signature_path(bundle)
        signature = sig.read_bytes() if sig.is_file() else None  # signed bytes unchanged: the signature travels
    return store.add_model(name, bundle, params=params, system=system, template=template, license_text=license_text,
                           context=context, title=title, signature=signature)


def _store_base(spec: Plmfile):
    from pocketlm.hub import store_entry

    if (spec.folder / spec.source).expanduser().exists() or Path(spec.source).expanduser().is_absolute():
        return None
    return store_entry(spec.source)


def _source_path(spec: Plmfile) -> Path:
    from pocketlm.hub import resolve_alias

    candidate = (spec.folder / Path(spec.source).expanduser())
    return candidate if candidate.exists() else resolve_alias(spec.source)


def _is_plm(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) in (b"POCKETLM", b"PLMENC1\0")  # a bundle, or one sealed by pocketlm encrypt
    except (IsADirectoryError, OSError):
        return False
