"""Session.kv_cache, the per-sequence KV cache object: what it holds after appends, trims within and
past a sliding window's ring, copies and clears, against the ring arithmetic of the executor's State
(its capacities) and against a fresh session fed the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
from pocketlm.engine import Engine

WINDOW, CHUNK, CTX = 8, 4, 64
RING = WINDOW + CHUNK - 1


@pytest.fixture(scope="module")
def engine(windowed_bundle):
    return Engine(windowed_bundle("mistral", WINDOW), threads=1, max_context=CTX, prefill_chunk=CHUNK, kv_type="f32")


def test_kv_cache_tracks_rings_and_trims(engine):
    s = engine.create_session()
    kv = s.kv_cache
    assert kv.rings == [(RING, WINDOW)] * 2 and kv.state is s._state
    tokens = np.random.default_rng(3).integers(3, engine.vocab_size, 30).tolist()
    s.prefill(tokens)
    assert (kv.valid, kv.end) == (30, 30) and kv.used_bytes(30) == s.kv_bytes
    # A step at p reads [p - WINDOW + 1, p); the ring holds [end - RING, end).
    for p in range(31):
        assert kv.can_trim(p) == (30 - RING <= max(0, p - WINDOW + 1)), p
    with pytest.raises(ValueError, match="after 30 cached positions"):
        kv.append(1, 31)  # a step must continue where the cache ends
    other = engine.create_session()
    other.kv_cache.copy_from(kv)
    assert (other.kv_cache.valid, other.kv_cache.end) == (30, 30)
    twin = s.clone()  # copies the tokens too, through the same copy_from
    assert kv.trim(27) and (kv.valid, kv.end) == (27, 30)  # a plain truncation
    assert not kv.trim(5) and (kv.valid, kv.end) == (0, 0)  # past the ring: emptied
    # The session built on it answers as a fresh one after either (it replays what the cache lost).
    s.rewind(5)
    np.testing.assert_allclose(s.prefill([7]), engine.create_session().prefill(tokens[:5] + [7]), atol=1e-4)
    twin.rewind(27)
    np.testing.assert_allclose(twin.prefill([7]), engine.create_session().prefill(tokens[:27] + [7]), atol=1e-4)
    # two ring layers, K and V, RING slots of one KV head of 16 f32: full, so in use = reserved
    assert twin.kv_cache.reserved_bytes == s.kv_reserved_bytes == twin.kv_bytes == 2 * 2 * RING * 16 * 4
