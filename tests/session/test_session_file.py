"""Sessions on disk: Session.save then Engine.load_session continues exactly as the uninterrupted
session (the next logits bit for bit, then greedy tokens), for every family's tiny config including
sliding-window rings past their wrap, f16 and f32 caches; and every damaged or mismatched file is a
SessionFileError, with nothing loaded."""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import Engine, SessionFileError
from testutil import make_f32_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, windowed_bundle):
    made = {arch: make_f32_bundle(tmp_path_factory.mktemp(arch), arch, seed=2) for arch in ("llama", "gpt2", "gemma")}
    for arch in ("mistral", "gemma3"):
        made[arch] = windowed_bundle(arch, 8)  # rings of a few slots: 40 tokens wrap them
    return made


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma", "mistral", "gemma3"])
@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_round_trip_equals_the_uninterrupted_session(bundles, arch, kv_type, tmp_path):
    engine = Engine(bundles[arch], threads=2, kv_type=kv_type, max_context=128, prefill_chunk=16)
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, 300, 40).tolist()
    a = engine.create_session()
    a.prefill(prompt)
    path = tmp_path / "s.plms"
    a.save(path)
    b = engine.load_session(path)
    assert b.tokens == a.tokens and b.position == a.position and b.kv_bytes == a.kv_bytes
    for token in rng.integers(3, 300, 6).tolist():  # the same logits, step after step
        np.testing.assert_array_equal(b.decode(token), a.decode(token))
    # and generation goes on alike (prefix reuse on the loaded history)
    ga = "".join(a.generate(a.tokens + [7], max_tokens=8, temperature=0))
    gb = "".join(b.generate(b.tokens + [7], max_tokens=8, temperature=0))
    assert ga == gb


def test_damaged_and_mismatched_files(bundles, tmp_path):
    engine = Engine(bundles["llama"], threads=2, max_context=128)
    s = engine.create_session()
    s.prefill(list(range(3, 40)))
    path = tmp_path / "s.plms"
    s.save(path)
    data = path.read_bytes()

    def refused(blob: bytes, message: str, eng=engine):
        bad = tmp_path / "bad.plms"
        bad.write_bytes(blob)
        with pytest.raises(SessionFileError, match=message):
            eng.load_session(bad)

    refused(b"", "not a pocketlm session file")
    refused(b"XXXXXXXX" + data[8:], "not a pocketlm session file")
    refused(data[:-1], "truncated or corrupt")
    refused(data[:40], "truncated or corrupt")
    flipped = bytearray(data)
    flipped[-100] ^= 1  # inside the KV bytes
    refused(bytes(flipped), "KV cache's checksum")
    flipped = bytearray(data)
    flipped[30] ^= 1  # inside the header
    refused(bytes(flipped), "header's checksum")
    refused(data, "another model", Engine(bundles["gpt2"], threads=2, max_context=128))
    refused(data, "KV cache is f16", Engine(bundles["llama"], threads=2, max_context=128, kv_type="f32"))
    refused(data, "this engine reads sessions of 1 to 64", Engine(bundles["llama"], threads=2, max_context=64))
    with pytest.raises(SessionFileError, match="cannot read"):
        engine.load_session(tmp_path / "missing.plms")
    # the good file still loads after all that
    assert engine.load_session(path).tokens == s.tokens
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_header_that_is_not_an_object_or_too_deep(tmp_path):
    """A checksummed header that is a JSON array, or nested past the recursion limit: SessionFileError."""
    import hashlib

    from pocketlm.errors import SessionFileError
    from pocketlm.session_file import _FIXED, MAGIC, VERSION, read

    for head in (b"[1,2]", b"[" * 5000 + b"]" * 5000, b'{"kv_bytes": true}'):
        p = tmp_path / "s.plms"
        p.write_bytes(_FIXED.pack(MAGIC, VERSION, len(head)) + head + hashlib.sha256(head).digest() +
                      b"\0" + hashlib.sha256(b"\0").digest())
        with pytest.raises(SessionFileError):
            read(p)
