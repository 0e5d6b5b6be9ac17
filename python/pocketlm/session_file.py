"""Sessions on disk: a conversation's tokens and KV cache, saved and restored without re-running the
model (`Session.save`, `Engine.load_session`; docs/format.md, "Session files").

    magic     8 bytes  b"PLMSESS\\0"
    version   u32      1
    header    u64 n, then n bytes of JSON (below), then the SHA-256 of those n bytes (32 bytes)
    kv        header["kv_bytes"] bytes: the KV slots of positions [0, end) as the State stores them
              (State.kv_export's packing), then their SHA-256 (32 bytes)

The header binds the file to what can read it back: the bundle (`bundle`: the SHA-256 of its
metadata and tensor index, which holds every tensor's hash and the tokenizer), the KV type and
shape (`kv_type`, `n_layers`, `n_kv_heads`, `head_dim`, `kv_capacities`, `max_context`), and holds
the session: `tokens` (what its cache holds), `valid`, `end` and `floors` (pocketlm.kv_cache.KVCache), its
context shift (`on_overflow`, `keep`, `discard`, and `evicted`: the tokens shifts evicted), and `extra`, an
object the application saves with it (`pocketlm chat` keeps the conversation's messages there). A file that does
not match the engine, is truncated or corrupted gives SessionFileError; nothing is half-loaded.
Files are written atomically (pocketlm.bundle.atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from pocketlm import __version__
from pocketlm.errors import SessionFileError

MAGIC = b"PLMSESS\0"
VERSION = 1
_FIXED = struct.Struct("<8sIQ")  # magic, version, header bytes
MAX_HEADER_BYTES = 64 << 20     # tokens of a 1M-token context as JSON fit easily


def bundle_digest(engine) -> str:
    """The bundle's identity: SHA-256 of its metadata and tensor index (each tensor's hash is in it)."""
    cached = getattr(engine, "_bundle_digest", None)
    if cached is None:
        bundle = engine.bundle
        h = hashlib.sha256(bundle.core.metadata_json.encode())
        for t in bundle.tensors:
            h.update(f"{t.name}:{t.dtype}:{t.shape}:{t.offset}:{t.nbytes};".encode())
        cached = engine._bundle_digest = h.hexdigest()
    return cached


def _shape(engine, state) -> dict:
    c = engine.config
    return {"kv_type": state.kv_type, "n_layers": c["n_layers"], "n_kv_heads": c["n_kv_heads"],
            "head_dim": c["head_dim"], "kv_capacities": [int(x) for x in state.kv_capacities],
            "max_context": int(state.max_context)}


def save(session, path: str | os.PathLike, extra: dict | None = None) -> None:
    from pocketlm.bundle.atomic import Sink, replacing, storage_error

    path = os.fspath(path)
    state, cache = session._state, session.kv_cache
    payload = state.kv_export(cache.end)
    header = {"format": VERSION, "written_by": f"pocketlm {__version__}", "bundle": bundle_digest(session.engine),
              **_shape(session.engine, state), "tokens": [int(t) for t in session._tokens],
              "valid": int(cache.valid), "end": int(cache.end), "floors": [int(f) for f in cache.floors],
              "on_overflow": session.on_overflow, "keep": session.keep, "discard": session.discard,
              "evicted": [int(t) for t in session._evicted], "kv_bytes": int(payload.size),
              "extra": extra if extra is not None else {}}
    head = json.dumps(header, separators=(",", ":")).encode()
    try:
        with replacing(path) as tmp, Sink._open_new(tmp) as f:
            f.write(_FIXED.pack(MAGIC, VERSION, len(head)))
            f.write(head)
            f.write(hashlib.sha256(head).digest())
            f.write(memoryview(payload))
            f.write(hashlib.sha256(memoryview(payload)).digest())
    except OSError as e:
        raise storage_error(path, e) from None


def read(path: str | os.PathLike) -> tuple[dict, np.ndarray]:
    """(header, KV bytes) of a session file, every checksum and size checked. SessionFileError."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SessionFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) < _FIXED.size or data[:8] != MAGIC:
        raise SessionFileError(f"{path}: not a pocketlm session file")
    _, version, n = _FIXED.unpack_from(data)
    if version != VERSION:
        raise SessionFileError(f"{path}: session file version {version}; this pocketlm reads version {VERSION}")
    if n > MAX_HEADER_BYTES or len(data) < _FIXED.size + n + 32:
        raise SessionFileError(f"{path}: truncated or corrupt (header of {n} bytes)")
    head = data[_FIXED.size:_FIXED.size + n]
    if hashlib.sha256(head).digest() != data[_FIXED.size + n:_FIXED.size + n + 32]:
        raise SessionFileError(f"{path}: the header's checksum does not match (corrupt file)")
    try:
        header = json.loads(head)
    except (ValueError, RecursionError):
        raise SessionFileError(f"{path}: the header is not JSON (or nested too deep: a corrupt file)") from None
    if not isinstance(header, dict):
        raise SessionFileError(f"{path}: the header is not a JSON object (corrupt file)")
    start = _FIXED.size + n + 32
    size = header.get("kv_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or len(data) != start + size + 32:
        raise SessionFileError(f"{path}: truncated or corrupt: {len(data)} bytes, the header says "
                               f"{start + (size if isinstance(size, int) else 0) + 32}")
    payload = np.frombuffer(data, dtype=np.uint8, count=size, offset=start)
    if hashlib.sha256(memoryview(payload)).digest() != data[start + size:]:
        raise SessionFileError(f"{path}: the KV cache's checksum does not match (corrupt file)")
    return header, payload


def load(engine, path: str | os.PathLike):
    """A new Session of `engine` holding what the file holds."""
    path = os.fspath(path)
    header, payload = read(path)
    if header.get("bundle") != bundle_digest(engine):
        raise SessionFileError(f"{path}: saved from another model (bundle {str(header.get('bundle'))[:12]}..., "
                               f"this engine's is {bundle_digest(engine)[:12]}...)")
    if header.get("kv_type") != engine.kv_type:
        raise SessionFileError(f"{path}: its KV cache is {header.get('kv_type')}, this engine's is {engine.kv_type} "
                               f"(Engine(..., kv_type={header.get('kv_type')!r}) reads it)")
    max_context = header.get("max_context")
    if not isinstance(max_context, int) or not 1 <= max_context <= engine.max_context:
        raise SessionFileError(f"{path}: saved with a context of {max_context} tokens; this engine reads sessions "
                               f"of 1 to {engine.max_context}")
    shift = {"on_overflow": header.get("on_overflow", "error"), "keep": header.get("keep", 4),
             "discard": header.get("discard")}
    try:
        session = engine.create_session(max_context=max_context, **shift)
    except (ValueError, TypeError) as e:  # InvalidInputError, UnsupportedModelError
        raise SessionFileError(f"{path}: its context shift settings are not usable here: {e}") from None
    expected = _shape(engine, session._state)
    for key, value in expected.items():
        if header.get(key) != value:
            raise SessionFileError(f"{path}: {key} is {header.get(key)}, this engine's session has {value} "
                                   "(another prefill chunk or context)")
    tokens, valid, end = header.get("tokens"), header.get("valid"), header.get("end")
    evicted = header.get("evicted", [])
    floors = header.get("floors", [0] * len(session.kv_cache.rings))
    vocab = engine.vocab_size

    def ids(x) -> bool:
        return isinstance(x, list) and all(type(t) is int and 0 <= t < vocab for t in x)

    if not (ids(tokens) and ids(evicted) and isinstance(valid, int) and isinstance(end, int)
            and 0 <= valid <= len(tokens) <= max_context and valid <= end <= max_context
            and (not evicted or len(tokens) >= session.keep)
            and isinstance(floors, list) and len(floors) == len(session.kv_cache.rings)
            and all(type(f) is int and 0 <= f <= end for f in floors)):
        raise SessionFileError(f"{path}: the header's tokens or positions are inconsistent (corrupt file)")
    if payload.size != session._state.kv_used_bytes(end):
        raise SessionFileError(f"{path}: {payload.size} KV bytes for {end} positions; expected "
                               f"{session._state.kv_used_bytes(end)}")
    extra = header.get("extra", {})
    if not isinstance(extra, dict):
        raise SessionFileError(f"{path}: the header's extra is not an object (corrupt file)")
    session._state.kv_import(end, payload)
    session._tokens[:] = tokens
    session._evicted[:] = evicted
    session.kv_cache.valid, session.kv_cache.end, session.kv_cache.floors = valid, end, floors
    session.saved_extra = extra
    return session
