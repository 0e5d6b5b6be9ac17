"""Fuzz targets: for each input format, an oracle (run the input through pocketlm's public API; only a
PocketLMError counts as a clean refusal, anything else is a finding) and a structure-aware mutator.

- bundle: a .plm file, through read_bundle, describe (inspect's text), Engine and one generated
  token. The mutator edits the metadata (as JSON, the tokenizer document inside it too), the index
  entries, the tensor bytes or the header, then re-signs every checksum (plm_layout.py), as a
  hostile author would; sometimes it leaves a plain byte-level mutation unsigned.
- gguf: a .gguf file, through pocketlm.convert.convert and, when that succeeds, the bundle it wrote
  (the converter must never write a bundle the loader rejects; then one token, which may still be
  refused: finite weights can overflow to NaN logits, a NonFiniteError). The mutator
  overwrites the header counts, metadata values and tensor-table fields with boundary values.
- chat: a JSON object {"template", "messages", "tools"} through render_chat; a render must also end
  within the time limit. The mutator splices template fragments known to cost work.

The oracles are plain functions: scripts/fuzz.sh runs them under atheris (fuzz/run.py) and
tests/fuzz/test_corpus_replay.py replays the committed corpus (fuzz/corpus/) through them.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import plm_layout

from pocketlm.convert.gguf_file import _SCALAR_DTYPES, ARRAY, STRING

_TMP = Path(tempfile.mkdtemp(prefix="pocketlm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 16, 31, 32, 33, 63, 64, 255, 256, 4095, 4096, 65535, 65536, 2**31 - 1,
                    2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**31, -2**63, 10**30]
INTERESTING_FLOATS = [0.0, -0.0, 1e-300, 1e-45, 1e30, 1e308, -1.0, 0.5, float("nan"), float("inf"), -float("inf")]


# -- oracles -----------------------------------------------------------------------------------

def _load(path: Path):
    from pocketlm.bundle import describe, read_bundle
    from pocketlm.engine import Engine

    describe(read_bundle(path))
    return Engine(path, threads=1, max_context=64)


def _generate(engine) -> str:
    "".join(engine.generate("hi", max_tokens=1))
    return "generated"


def check_bundle(data: bytes) -> str:
    """'generated' or 'refused: <error>'; any exception other than a PocketLMError propagates."""
    from pocketlm.errors import PocketLMError

    path = _TMP / f"fuzz-{os.getpid()}.plm"
    path.write_bytes(data)
    try:
        return _generate(_load(path))
    except PocketLMError as e:
        return f"refused: {type(e).__name__}"
    finally:
        path.unlink(missing_ok=True)


def check_gguf(data: bytes) -> str:
    from pocketlm.convert import convert
    from pocketlm.errors import PocketLMError

    src, out = _TMP / f"fuzz-{os.getpid()}.gguf", _TMP / f"fuzz-{os.getpid()}-gguf.plm"
    src.write_bytes(data)
    try:
        convert(src, out, progress=False)
    except PocketLMError as e:
        return f"refused: {type(e).__name__}"
    finally:
        src.unlink(missing_ok=True)
    try:
        try:  # what the converter wrote, the loader must take
            engine = _load(out)
        except PocketLMError as e:
            raise AssertionError(f"the converter wrote a bundle the loader rejects: {e}") from e
        try:  # finite but extreme weights may still overflow to NaN logits: a NonFiniteError
            return _generate(engine)
        except PocketLMError as e:
            return f"converted, then refused: {type(e).__name__}"
    finally:
        out.unlink(missing_ok=True)


# -- corpus recipes ----------------------------------------------------------------------------
# Model files stay out of git, so the bundle and GGUF corpus holds recipes: JSON edits applied to a
# seed that fuzz/make_seeds.py generates (a tiny random llama), re-signed as the mutator does.
#   bundle: {"seed": "llama-int4", "meta": {"config/n_heads": 0}, "delete": ["config/rope_theta"],
#            "tensors": {"token_embd.weight": {"offset": 64}}, "header": {"version": 2}}
#   gguf:   {"seed": "llama", "kv": {"llama.block_count": 4294967295}, "counts": {"tensors": 1},
#            "tensors": {"token_embd.weight": {"offset": 32, "type": 99, "dims": [1, 2]}}}

SEEDS = {"bundle": ("llama-f32", "llama-int4"), "gguf": ("llama",), "session": ("llama-f32",)}
_SUFFIX = {"bundle": ".plm", "gguf": ".gguf", "session": ".plms"}
SEEDS_DIR = Path(os.environ.get("POCKETLM_FUZZ_SEEDS", Path.home() / ".cache" / "pocketlm" / "fuzz" / "seeds"))
_HEADER_FIELDS = {"version": (8, "<I"), "header_size": (12, "<I"), "file_bytes": (16, "<Q"), "meta_offset": (24, "<Q"),
                  "meta_bytes": (32, "<Q"), "index_offset": (40, "<Q"), "index_bytes": (48, "<Q"),
                  "data_offset": (56, "<Q"), "data_bytes": (64, "<Q")}


def seed_path(seeds: Path, kind: str, name: str) -> Path:
    return seeds / kind / f"seed-{name}{_SUFFIX[kind]}"


def _walk(doc: object, path: str) -> tuple[object, object]:
    keys = [int(k) if k.lstrip("-").isdigit() else k for k in path.split("/")]
    for key in keys[:-1]:
        doc = doc[key]
    return doc, keys[-1]


def from_recipe(kind: str, recipe: dict, seeds: Path) -> bytes:
    """The input a corpus recipe describes."""
    base = seed_path(seeds, kind, recipe["seed"]).read_bytes()
    if kind == "bundle":
        layout = plm_layout.parse(base)
        meta = json.loads(layout.meta)
        for path, value in recipe.get("meta", {}).items():
            parent, key = _walk(meta, path)
            parent[key] = value
        for path in recipe.get("delete", []):
            parent, key = _walk(meta, path)
            del parent[key]
        layout.meta = _dump_json(meta)
        for name, edits in recipe.get("tensors", {}).items():
            entry = next(e for e in layout.entries if e.name == name.encode())
            for field, value in edits.items():
                setattr(entry, field, value.encode() if field == "name" else value)
        buf = plm_layout.build(layout)
        for field, value in recipe.get("header", {}).items():
            offset, fmt = _HEADER_FIELDS[field]
            struct.pack_into(fmt, buf, offset, value)
        return bytes(plm_layout.resign_header(buf))
    buf, where = bytearray(base), GGUFMap(base)
    for key, value in recipe.get("kv", {}).items():
        offset, vtype = where.kv[key]
        encoded = np.array(value, dtype=_GGUF_SCALARS[vtype]).tobytes()
        buf[offset:offset + len(encoded)] = encoded
    for name, edits in recipe.get("tensors", {}).items():
        entry = where.tensors[name]
        for field, value in edits.items():
            if field == "dims":
                for offset, dim in zip(entry["dims"], value):
                    struct.pack_into("<Q", buf, offset, dim)
            else:
                struct.pack_into({"ndim": "<I", "type": "<I", "offset": "<Q"}[field], buf, entry[field], value)
    for field, value in recipe.get("counts", {}).items():
        struct.pack_into("<Q", buf, {"tensors": 8, "kv": 16}[field], value)
    return bytes(buf)


def corpus_input(kind: str, path: Path, seeds: Path) -> bytes:
    """A corpus file's input: a recipe applied to its seed, or the file's bytes (chat inputs, crashers)."""
    if kind == "session" and path.suffix == ".json":
        recipe = json.loads(path.read_text())
        header, kv = split_session(seed_path(seeds, "session", recipe["seed"]).read_bytes())
        for p, value in recipe.get("header", {}).items():
            parent, key = _walk(header, p)
            parent[key] = value
        for p in recipe.get("delete", []):
            parent, key = _walk(header, p)
            del parent[key]
        if "kv_bytes" in recipe:
            kv = kv[:recipe["kv_bytes"]] + bytes(max(0, recipe["kv_bytes"] - len(kv)))
        return join_session(header, kv, recipe.get("kv_bytes_field"))
    if kind in ("bundle", "gguf") and path.suffix == ".json":
        return from_recipe(kind, json.loads(path.read_text()), seeds)
    return path.read_bytes()


DEFAULT_MESSAGES = [{"role": "user", "content": "hi"}]


def parse_chat(data: bytes) -> tuple[str, object, object]:
    """(template, messages, tools) from a JSON input, or the bytes as a template."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("template"), str):
        return doc["template"], doc.get("messages", DEFAULT_MESSAGES), doc.get("tools")
    return data.decode("utf-8", "replace"), DEFAULT_MESSAGES, None


def check_chat(data: bytes) -> str:
    from pocketlm import chat_sandbox
    from pocketlm.chat import render_chat
    from pocketlm.errors import ChatTemplateError, InvalidInputError

    template, messages, tools = parse_chat(data)
    t0 = time.perf_counter()
    try:
        text = render_chat(template, messages, tools=tools)
        outcome = f"rendered {len(text)}"
    except (ChatTemplateError, InvalidInputError) as e:
        outcome = f"refused: {type(e).__name__}"
    elapsed = time.perf_counter() - t0
    # Compiling and rendering each have the deadline; 1 s for one bounded step past it.
    if elapsed > 2 * chat_sandbox.MAX_RENDER_SECONDS + 1:
        raise AssertionError(f"render took {elapsed:.1f} s")
    return outcome


# -- mutators ----------------------------------------------------------------------------------

def _interesting(rng: random.Random, old: object) -> object:
    if isinstance(old, bool) or rng.random() < 0.15:
        return rng.choice([None, True, False, "", "x" * rng.choice([1, 300, 70000]), [], {}, [1, 2], {"a": 1},
                           "\ud800", "é\x00"])
    if isinstance(old, int):
        return rng.choice([rng.choice(INTERESTING_INTS), old + rng.choice([-1, 1]), old * 2, -old, old * 2**32])
    if isinstance(old, float):
        return rng.choice(INTERESTING_FLOATS + [old * 1e30, -old])
    if isinstance(old, str):
        return rng.choice([old[: len(old) // 2], old * 2, old + "\x00", "", str(rng.choice(INTERESTING_INTS))])
    return rng.choice(INTERESTING_INTS + INTERESTING_FLOATS)


def _paths(doc: object, prefix: tuple = (), out: list | None = None) -> list:
    out = [] if out is None else out
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            _paths(v, prefix + (k,), out)
    elif isinstance(doc, list) and doc:
        for i in sorted({0, len(doc) - 1, len(doc) // 2}):
            out.append(prefix + (i,))
            _paths(doc[i], prefix + (i,), out)
    return out


def mutate_json(doc: object, rng: random.Random) -> object:
    """Changes one value somewhere in `doc` (a JSON value): a boundary number, another type, a
    deletion, a deep nesting; JSON documents held in strings (the tokenizer) are mutated as JSON."""
    paths = _paths(doc)
    if not paths:
        return _interesting(rng, doc)
    path = rng.choice(paths)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, old = path[-1], parent[path[-1]]
    action = rng.random()
    if isinstance(old, str) and old[:1] == "{" and action < 0.5:
        try:
            parent[key] = json.dumps(mutate_json(json.loads(old), rng))
            return doc
        except (ValueError, RecursionError):
            pass
    if action < 0.1 and isinstance(parent, dict):
        del parent[key]
    elif action < 0.15:
        nested: object = old
        for _ in range(rng.choice([10, 400])):
            nested = [nested]
        parent[key] = nested
    elif action < 0.2 and isinstance(old, list) and old:
        parent[key] = old + old[: rng.randrange(len(old)) + 1]
    else:
        parent[key] = _interesting(rng, old)
    return doc


def _dump_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")


def mutate_bundle(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    layout = plm_layout.parse(data)
    if layout is None or rng.random() < 0.05:
        return atheris.Mutate(data, max_size)  # unsigned, byte level
    what = rng.randrange(6)
    if what == 0:
        try:
            layout.meta = _dump_json(mutate_json(json.loads(layout.meta), rng))
        except (ValueError, RecursionError):
            layout.meta = atheris.Mutate(layout.meta, len(layout.meta) + 64)
    elif what == 1:
        layout.meta = atheris.Mutate(layout.meta, len(layout.meta) + 256)
    elif what == 2 and layout.entries:
        e = rng.choice(layout.entries)
        field = rng.randrange(6)
        if field == 0:
            e.dtype = rng.choice([rng.randrange(32), 2**32 - 1, e.dtype ^ 1])
        elif field == 1 and e.shape:
            i = rng.randrange(len(e.shape))
            e.shape[i] = rng.choice([v for v in INTERESTING_INTS if 0 <= v < 2**64] + [e.shape[i] * 2, e.shape[i] // 2])
        elif field == 2:
            e.shape = e.shape[:-1] if rng.random() < 0.5 else e.shape + [rng.choice([1, 2, 16])]
        elif field == 3:
            e.offset = rng.choice([0, 64, e.offset + 64, e.offset - 64, 2**64 - 64, len(layout.data)]) % 2**64
        elif field == 4:
            e.nbytes = rng.choice([0, e.nbytes + 1, e.nbytes - 1, e.nbytes * 2, 2**63]) % 2**64
        else:
            other = rng.choice(layout.entries)
            e.name = rng.choice([other.name, b"", e.name + b"\xff", e.name[:1], b"x" * 1025])
    elif what == 3:
        if layout.entries and rng.random() < 0.5:
            layout.entries.pop(rng.randrange(len(layout.entries)))
        elif layout.entries:
            e = rng.choice(layout.entries)
            layout.entries.append(plm_layout.Entry(e.name + b".x", e.dtype, list(e.shape), e.offset, e.nbytes, e.sha))
    elif what == 4 and layout.data:
        data_ = bytearray(layout.data)
        for _ in range(rng.randrange(1, 8)):
            at = rng.randrange(len(data_))
            value = rng.choice([b"\xff\xff\xff\x7f", b"\x00\x00\x80\x7f", b"\x00\x7c", b"\xff\xff"])
            data_[at:at + len(value)] = value
        layout.data = bytes(data_[: len(layout.data)])
    buf = plm_layout.build(layout)
    if what == 5:  # a header field, then only the header re-signed
        offset, fmt = rng.choice([(8, "<I"), (12, "<I"), (16, "<Q"), (24, "<Q"), (32, "<Q"), (40, "<Q"), (48, "<Q"),
                                  (56, "<Q"), (64, "<Q")])
        limit = 2**32 if fmt == "<I" else 2**64
        struct.pack_into(fmt, buf, offset, rng.choice(INTERESTING_INTS + [len(buf), len(buf) + 4096]) % limit)
        plm_layout.resign_header(buf)
    if len(buf) > max_size:
        return atheris.Mutate(data, max_size)
    return bytes(buf)


# GGUF value type -> numpy dtype of the fixed-size ones (strings and arrays are variable), as
# pocketlm's GGUF reader decodes them.
_GGUF_SCALARS = {t: np.dtype(d) for t, d in _SCALAR_DTYPES.items()}


class GGUFMap:
    """Where the fixed-size fields of a GGUF file are, as far as it parses: `fields` lists (offset,
    size) of every count, length, scalar, array length, dim, type and offset; `kv` maps a metadata
    key to (offset, value type) of its scalar value; `tensors` maps a tensor name to the offsets of
    its n_dims, dims, type and data offset."""

    def __init__(self, buf: bytes):
        self.fields: list[tuple[int, int]] = [(8, 8), (16, 8)]  # tensor count, metadata count
        self.kv: dict[str, tuple[int, int]] = {}
        self.tensors: dict[str, dict] = {}
        self._buf, self._pos = buf, 24
        try:
            _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf)
            for _ in range(min(n_kv, 10_000)):
                key = self._string()
                (vtype,) = self._take("<I")
                if vtype in _GGUF_SCALARS:
                    self.kv[key] = (self._pos, vtype)
                self._value(vtype)
            for _ in range(min(n_tensors, 10_000)):
                name = self._string()
                entry = {"ndim": self._pos}
                (ndim,) = self._take("<I")
                entry["dims"] = [self._pos + 8 * i for i in range(min(ndim, 8))]
                self.fields.extend((o, 8) for o in entry["dims"])
                self._pos += 8 * ndim
                entry["type"], entry["offset"] = self._pos, self._pos + 4
                self._take("<I")
                self._take("<Q")
                self.tensors[name] = entry
        except (struct.error, ValueError, OverflowError, UnicodeDecodeError):
            pass
        self.fields = [(o, n) for o, n in self.fields if o + n <= len(buf)]

    def _take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self.fields.append((self._pos, size))
        self._pos += size
        return values

    def _string(self) -> str:
        (n,) = self._take("<Q")
        text = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return text

    def _value(self, vtype: int) -> None:
        if vtype in _GGUF_SCALARS:
            self._take(f"{_GGUF_SCALARS[vtype].itemsize}s")
        elif vtype == STRING:
            self._pos += struct.unpack_from("<Q", self._buf, self._pos)[0] + 8
        elif vtype == ARRAY:
            item_type, count = self._take("<I") + self._take("<Q")
            if item_type in _GGUF_SCALARS:  # the first few items, then the rest at once
                for _ in range(min(count, 4)):
                    self._value(item_type)
                self._pos += max(count - 4, 0) * _GGUF_SCALARS[item_type].itemsize
            else:
                for _ in range(count):
                    self._value(item_type)
        else:
            raise ValueError(f"GGUF value type {vtype}")


def mutate_gguf(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    fields = GGUFMap(data).fields
    if not fields or rng.random() < 0.2:
        return atheris.Mutate(data, max_size)
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        offset, size = rng.choice(fields)
        old = int.from_bytes(buf[offset:offset + size], "little")
        new = rng.choice([v for v in INTERESTING_INTS if v >= 0] + [old + 1, old - 1, old * 2, old // 2,
                                                                    old + 32, old ^ 0x80])
        buf[offset:offset + size] = (new % 2 ** (8 * size)).to_bytes(size, "little")
    return bytes(buf[:max_size])


# Template pieces that cost work or reach unusual paths; the chat mutator splices them in.
CHAT_FRAGMENTS = [
    "{% for i in range(100000) %}", "{% endfor %}", "{% for c in messages %}", "{{ loop.index }}", "{% if ", " %}",
    "{% endif %}", "{% set ns = namespace(x='ab') %}", "{% set ns.x = ns.x + ns.x %}", "{% set ns.x = ns.x ~ ns.x %}",
    "{{ 'x' * 99999999 }}", "{{ [1] * 99999 }}", "{{ '%99999999s' % 1 }}", "{{ '{:99999999}'.format(1) }}",
    "{{ ns.x|center(99999999) }}", "{{ ns.x|indent(99999) }}", "{{ ns.x|wordwrap(1, wrapstring=ns.x) }}",
    "{{ messages|tojson(indent=99) }}", "|join(ns.x)", "|replace('', ns.x)", "|batch(99999, 0)", "|slice(99999)",
    "|sum(start=[])", "|list", "|sort", "|unique", "|string", "|e", "|urlize", "|pprint", "|reverse",
    "{% macro m(n) %}{{ m(n) }}{{ m(n) }}{% endmacro %}", "{{ m(1) }}", "{{ caller() }}", "{% call m(1) %}x{% endcall %}",
    "{% for x in messages recursive %}{{ loop(messages) }}{% endfor %}", "{{ 7 ** 99999 }}", "{{ 10 ** 10 ** 10 }}",
    "{{ lipsum(99999) }}", "{{ strftime_now('%c' * 999) }}", "{{ raise_exception(ns) }}", "{{ messages[::-1] }}",
    "{{ messages == messages * 999 }}", "{{ ns.x in [ns.x] * 99999 }}", "{{ 1 < 2 < 3 }}", "{{ ns.x.expandtabs(99999) }}",
    "{{ ns.x.join(range(99999)|map('string')) }}", "{{ dict(a=ns)|items|list }}", "{{ messages.__class__ }}",
    "{{ ''.__class__.__mro__ }}", "{{ cycler(1, 2).next() }}", "{{ joiner(ns.x)() }}", "{% break %}", "{% continue %}",
    "{% generation %}", "{% endgeneration %}", "{% filter upper %}", "{% endfilter %}", "{% set b %}", "{% endset %}",
]


# Block tags, spliced around a span of the template so that the result still compiles.
CHAT_BLOCKS = [
    ("{% for i in range(100000) %}", "{% endfor %}"), ("{% for c in ns.x %}", "{% endfor %}"),
    ("{% for m in messages recursive %}", "{{ loop(messages) }}{% endfor %}"), ("{% if true %}", "{% endif %}"),
    ("{% macro r(n) %}", "{{ r(n) }}{{ r(n) }}{% endmacro %}{{ r(1) }}"), ("{% set s %}", "{% endset %}{{ s ~ s }}"),
    ("{% filter center(99999) %}", "{% endfilter %}"), ("{% call(x) m(1) %}", "{% endcall %}"),
]


def mutate_chat(data: bytes, max_size: int, seed: int) -> bytes:
    import atheris

    rng = random.Random(seed)
    template, messages, tools = parse_chat(data)
    action = rng.random()
    if action < 0.3:
        at = rng.randrange(len(template) + 1)
        template = template[:at] + rng.choice(CHAT_FRAGMENTS) + template[at:]
    elif action < 0.5:
        a, b = sorted(rng.randrange(len(template) + 1) for _ in range(2))
        opening, closing = rng.choice(CHAT_BLOCKS)
        template = template[:a] + opening + template[a:b] + closing + template[b:]
    elif action < 0.65 and template:
        a = rng.randrange(len(template))
        template = template[:a] + template[a + rng.randrange(1, 40):]
    elif action < 0.85:
        raw = template.encode("utf-8", "surrogatepass")
        template = atheris.Mutate(raw, len(raw) + 64).decode("utf-8", "replace")
    else:
        mutated = mutate_json({"m": messages}, rng)
        messages = mutated.get("m") if isinstance(mutated, dict) else mutated
    try:
        out = json.dumps({"template": template, "messages": messages, "tools": tools}).encode()
    except (ValueError, RecursionError):
        return atheris.Mutate(data, max_size)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


# -- signature: a detached model signature (pocketlm.signing) -------------------------------------
# A fixed model file and a fixed trusted key (derived from a constant: the committed corpus's
# signatures verify in every run).
_SIG_MODEL = bytes(range(256)) * 64


def _sig_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.derive_private_key(0x5EED_F00D_2026, ec.SECP256R1())


def _sig_files() -> tuple[Path, Path]:
    model = _TMP / "signed.plm"
    if not model.exists():
        model.write_bytes(_SIG_MODEL)
    return model, _TMP / "signed.plm.sig"


def check_signature(data: bytes) -> str:
    """'verified' or 'refused: <error>' for `data` as the signature of a fixed file by the trusted key;
    any exception other than a PocketLMError propagates."""
    from pocketlm.errors import PocketLMError
    from pocketlm.signing import verify

    model, sig = _sig_files()
    sig.write_bytes(data)
    try:
        verify(model, [_sig_key().public_key()], sig)
    except PocketLMError as e:
        return f"refused: {e}"
    return "verified"


def _resign_statement(bundle: dict, statement: object) -> dict:
    """The bundle with `statement` as its payload, signed again by the trusted key (so the statement's
    own checks are reached)."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from pocketlm.signing import pae

    payload = json.dumps(statement).encode()
    sig = _sig_key().sign(pae(payload), ec.ECDSA(hashes.SHA256()))
    env = dict(bundle.get("dsseEnvelope") or {}) if isinstance(bundle.get("dsseEnvelope"), dict) else {}
    env["payload"] = base64.b64encode(payload).decode()
    env["signatures"] = [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]
    return {**bundle, "dsseEnvelope": env}


def _json_object(data: bytes) -> dict | None:
    """`data` as a JSON object, or None (a byte-level mutant that no longer parses as one)."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _byte_mutation(data: bytes, max_size: int) -> bytes:
    """libFuzzer's own byte-level mutation (what the JSON mutators fall back to)."""
    import atheris

    return atheris.Mutate(data, max_size)


def mutate_signature(data: bytes, max_size: int, seed: int) -> bytes:
    """Edits the bundle JSON (mutate_json), or its statement and signs it again with the trusted key;
    sometimes leaves a plain byte-level mutation."""
    import base64

    rng = random.Random(seed)
    bundle = _json_object(data)
    if bundle is None or rng.random() < 0.15:
        return _byte_mutation(data, max_size)
    if rng.random() < 0.5:
        try:
            statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        except (KeyError, TypeError, ValueError):
            statement = {}
        out = _resign_statement(bundle, mutate_json(statement, rng))
    else:
        out = mutate_json(bundle, rng)
    return _dump_json(out)[:max_size]


def signature_seed() -> bytes:
    """A valid signature of the fixed file by the trusted key, as pocketlm.signing.sign writes it."""
    from cryptography.hazmat.primitives import serialization

    from pocketlm.signing import sign

    model, sig = _sig_files()
    key = _TMP / "trusted.pem"
    key.write_bytes(_sig_key().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    sign(model, key, sig)
    return sig.read_bytes()


def _safe(mutator):
    """A mutator that fails (its own bug, not pocketlm's) falls back to libFuzzer's byte mutation."""
    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        import atheris

        try:
            return mutator(data, max_size, seed)
        except Exception:
            return atheris.Mutate(data, max_size)

    return mutate


# ---- session files: Engine.load_session of a file, then a token from the session it gives ----
def split_session(data: bytes) -> tuple[dict, bytes]:
    """(header, KV bytes) of a well-formed session file (the mutator's and the recipes' starting point)."""
    from pocketlm.session_file import _FIXED

    _, _, n = _FIXED.unpack_from(data)
    header = json.loads(data[_FIXED.size:_FIXED.size + n])
    return header, data[_FIXED.size + n + 32:-32]


def join_session(header: object, kv: bytes, kv_bytes_field: object = None) -> bytes:
    """A session file of this header and KV bytes with both checksums right (kv_bytes set to the KV's
    length unless the caller says otherwise), as a hostile author would write it."""
    import hashlib

    from pocketlm.session_file import _FIXED, MAGIC, VERSION

    if isinstance(header, dict):
        header = dict(header)
        header["kv_bytes"] = len(kv) if kv_bytes_field is None else kv_bytes_field
    head = _dump_json(header)
    return (_FIXED.pack(MAGIC, VERSION, len(head)) + head + hashlib.sha256(head).digest() + kv +
            hashlib.sha256(kv).digest())


_SESSION_ENGINE = []


def _session_engine():
    if not _SESSION_ENGINE:
        from pocketlm.engine import Engine

        _SESSION_ENGINE.append(Engine(seed_path(SEEDS_DIR, "bundle", "llama-f32"), threads=1, max_context=64))
    return _SESSION_ENGINE[0]


def make_session_seed(seeds: Path) -> None:
    """seeds/session/seed-llama-f32.plms: a 5-token conversation with the f32 seed bundle, saved."""
    from pocketlm.engine import Engine

    engine = Engine(seed_path(seeds, "bundle", "llama-f32"), threads=1, max_context=64)
    session = engine.create_session()
    "".join(session.generate("hello world", max_tokens=3, temperature=0))
    (seeds / "session").mkdir(parents=True, exist_ok=True)
    session.save(seed_path(seeds, "session", "llama-f32"), extra={"messages": [{"role": "user", "content": "hi"}]})


def check_session(data: bytes) -> str:
    """'generated' or 'refused: <error>': `data` as a session file of the f32 seed bundle, loaded and
    then continued by one token."""
    from pocketlm.errors import PocketLMError

    path = _TMP / "fuzz.plms"
    path.write_bytes(data)
    engine = _session_engine()  # outside the try: a missing seed bundle is the harness's error, not a refusal
    try:
        session = engine.load_session(path)
        "".join(session.generate(" more", max_tokens=1, temperature=0))
    except PocketLMError as e:
        return f"refused: {e}"
    return "generated"


def mutate_session(data: bytes, max_size: int, seed: int) -> bytes:
    """Edits the header JSON (mutate_json) and writes the file again with right checksums; sometimes
    cuts or extends the KV bytes (kv_bytes following them, or not); sometimes a byte-level mutation."""
    rng = random.Random(seed)
    try:
        header, kv = split_session(data)
    except Exception:  # not a well-formed file (a byte-level mutant): mutate it as bytes
        header = None
    if not isinstance(header, dict) or rng.random() < 0.1:
        import atheris

        return atheris.Mutate(data, max_size)
    r = rng.random()
    if r < 0.05:  # the whole header replaced: another type, or nested past any recursion limit
        deep = rng.randint(900, 5000)
        return join_session(rng.choice([_interesting(rng, header), "[" * deep + "]" * deep, [header]]), kv)[:max_size]
    if r < 0.15 and isinstance(header.get("end"), int) and header["end"] > 0:
        # another `end` with the KV bytes resized to match it (per position: the seed's bytes / its end),
        # so that the KV import and the positions' checks behind the size check are reached
        per = len(kv) // header["end"]
        end = rng.choice([0, 1, header["end"] - 1, header["end"] + 1, 63, 64, 65, 1000])
        header = dict(header, end=end, valid=min(end, header.get("valid", end)) if rng.random() < 0.5 else end)
        kv = (kv * (end // max(1, header.get("end", 1)) + 2))[:per * end]
        return join_session(header, kv)[:max_size]
    if r < 0.6:
        header = mutate_json(header, rng)
        return join_session(header, kv)[:max_size]
    if r < 0.8:
        cut = rng.choice([0, 1, len(kv) // 2, max(0, len(kv) - 1), len(kv) + 4, len(kv) * 2])
        kv = kv[:cut] + bytes(max(0, cut - len(kv)))
        return join_session(header, kv, None if rng.random() < 0.5 else rng.choice(INTERESTING_INTS))[:max_size]
    kv = bytearray(kv)
    for _ in range(rng.randint(1, 8)):
        if kv:
            kv[rng.randrange(len(kv))] = rng.randrange(256)
    return join_session(header, bytes(kv))[:max_size]


# ---- server requests: a JSON body to one of the server's POST routes, through the ASGI app ----
# The input is JSON {"route": one of SERVER_ROUTES, "body": <the request body, any JSON>}, or raw
# bytes sent as the body of /v1/chat/completions. Any answer is fine but a 500 (an unhandled error:
# the server's catch-all turns it into an OpenAI-shaped 500, the fuzzer's finding) or one that is not
# JSON (or an event stream) on an error.
SERVER_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/apply-template", "/api/chat",
                 "/api/generate", "/api/embed", "/api/show")
_SERVER = []


class ServerFinding(Exception):
    """The server answered 500 or a malformed error: a bug (the fuzzer reports this exception)."""


def _server_client():
    if not _SERVER:
        from starlette.testclient import TestClient

        from pocketlm.engine import Engine
        from pocketlm.server.app import create_app
        from pocketlm.server.models import ModelRegistry, ServedModel

        engine = Engine(seed_path(SEEDS_DIR, "bundle", "llama-f32"), threads=1, max_context=64, max_queue=4)
        app = create_app(ModelRegistry([ServedModel("tiny", engine)]))
        _SERVER.append(TestClient(app, raise_server_exceptions=False))
    return _SERVER[0]


def check_server(data: bytes) -> str:
    """'<status>' of the request `data` describes; raises ServerFinding on a 500 or a malformed error."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and doc.get("route") in SERVER_ROUTES and "body" in doc:
        route = doc["route"]
        try:
            body = json.dumps(doc["body"]).encode()
        except (ValueError, RecursionError):
            body = b"{"
    else:
        route, body = SERVER_ROUTES[0], data
    r = _server_client().post(route, content=body, headers={"Content-Type": "application/json"})
    if r.status_code >= 500 and r.status_code != 503:  # 503: a full queue, by design
        raise ServerFinding(f"{route}: HTTP {r.status_code}: {r.text[:500]}")
    if r.status_code >= 400:
        try:
            json.loads(r.content)
        except ValueError:
            raise ServerFinding(f"{route}: HTTP {r.status_code} with a body that is not JSON: {r.text[:200]!r}") from None
    return str(r.status_code)


def mutate_server(data: bytes, max_size: int, seed: int) -> bytes:
    """mutate_json on the request (its route, or any value in its body); sometimes a byte mutation."""
    rng = random.Random(seed)
    doc = _json_object(data)
    if doc is None or rng.random() < 0.1:
        return _byte_mutation(data, max_size)
    if rng.random() < 0.05:
        doc["route"] = rng.choice(SERVER_ROUTES)
    else:
        doc = mutate_json(doc, rng)
    return _dump_json(doc)[:max_size]


# ---- store manifests: an OCI layout folder pulled into a store, then its entry read ----
# The input is JSON: {"manifest": <the manifest, as JSON>, "blobs": [<text of each blob>]}. Each
# descriptor (config, layers, subject) with "blob": i and no "digest"/"size" gets the digest and size
# of blobs[i] filled in when the layout is written, so a mutation that drops them reaches the checks
# behind the digests; one that keeps them tests the digests themselves.
def _fill(desc: object, blobs: list) -> object:
    import hashlib

    if isinstance(desc, dict) and isinstance(desc.get("blob"), int) and 0 <= desc["blob"] < len(blobs):
        data = str(blobs[desc["blob"]]).encode("utf-8", "surrogatepass")
        desc = {k: v for k, v in desc.items() if k != "blob"}
        desc.setdefault("digest", "sha256:" + hashlib.sha256(data).hexdigest())
        desc.setdefault("size", len(data))
    return desc


def check_manifest(data: bytes) -> str:
    """'pulled' or 'refused: <error>': `data` (see above) as a model in an OCI layout, pulled into a
    fresh store and its entry read (config, parameters, system prompt, template, license)."""
    import hashlib
    import shutil

    from pocketlm.errors import PocketLMError
    from pocketlm.store import Store, pull

    root = _TMP / "layout"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(_TMP / "store", ignore_errors=True)
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("manifest"), dict) and isinstance(doc.get("blobs"), list):
        blobs = doc["blobs"][:16]
        for b in blobs:
            raw = str(b).encode("utf-8", "surrogatepass")  # the bytes of whatever string the input holds
            (root / "blobs" / "sha256" / hashlib.sha256(raw).hexdigest()).write_bytes(raw)
        m = dict(doc["manifest"])
        for key in ("config", "subject"):
            if key in m:
                m[key] = _fill(m[key], blobs)
        if isinstance(m.get("layers"), list):
            m["layers"] = [_fill(x, blobs) for x in m["layers"]]
        manifest = json.dumps(m).encode()
    else:
        manifest = data
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    (root / "blobs" / "sha256" / digest[7:]).write_bytes(manifest)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    try:
        store = Store(_TMP / "store")
        pull(f"oci:{root}:v1", store=store, name="fuzz:v1")
        store.entry("fuzz:v1")
    except PocketLMError as e:
        return f"refused: {e}"
    return "pulled"


def mutate_manifest(data: bytes, max_size: int, seed: int) -> bytes:
    """mutate_json on the input; half the time the descriptors' digests and sizes are dropped after,
    so they are filled in again from the (maybe mutated) blobs."""
    rng = random.Random(seed)
    doc = _json_object(data)
    if doc is None or rng.random() < 0.15:
        return _byte_mutation(data, max_size)
    doc = mutate_json(doc, rng)
    m = doc.get("manifest") if isinstance(doc, dict) else None
    if isinstance(m, dict) and rng.random() < 0.5:
        for d in [m.get("config"), m.get("subject")] + (m.get("layers") if isinstance(m.get("layers"), list) else []):
            if isinstance(d, dict) and "blob" in d:
                d.pop("digest", None)
                d.pop("size", None)
    return _dump_json(doc)[:max_size]


TARGETS = {
    "bundle": (check_bundle, _safe(mutate_bundle)),
    "gguf": (check_gguf, _safe(mutate_gguf)),
    "chat": (check_chat, _safe(mutate_chat)),
    "signature": (check_signature, _safe(mutate_signature)),
    "manifest": (check_manifest, _safe(mutate_manifest)),
    "session": (check_session, _safe(mutate_session)),
    "server": (check_server, _safe(mutate_server)),
}
