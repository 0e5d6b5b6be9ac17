"""The shared prefix cache (a radix tree over blocks of tokens): a session whose prompt starts like an
earlier one's prefills only the rest, and answers exactly as an engine without the cache does; prompts
that share a prefix share its blocks; eviction takes the least recently used leaves first; under
concurrent sessions and constant eviction nobody's answer changes; windowed models do not use it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pocketlm import Engine
from pocketlm.prefix_cache import BLOCK, MIN_REUSE
from testutil import make_f32_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_f32_bundle(tmp_path_factory.mktemp("prefix"), "llama", seed=6)


def answer(engine, ids, **kw):
    s = engine.create_session()
    return "".join(s.generate(ids, max_tokens=12, temperature=0, **kw)), s.last_stats


def test_shared_prefix_is_reused_and_answers_alike(bundle):
    cached = Engine(bundle, threads=2, kv_type="f32", prefill_chunk=32)
    plain = Engine(bundle, threads=2, kv_type="f32", prefill_chunk=32, prefix_cache_mb=0)
    rng = np.random.default_rng(0)
    system = rng.integers(3, 300, 150).tolist()
    first, stats = answer(cached, system + [5, 6, 7])
    assert stats.reused_tokens == 0 and len(cached.prefix_cache) == 153 // BLOCK
    for tail in ([8, 9], [5, 6, 10, 11, 12], rng.integers(3, 300, 40).tolist()):
        got, stats = answer(cached, system + tail)
        # whole blocks of the shared 150 (or more) tokens
        assert stats.reused_tokens == 150 // BLOCK * BLOCK or (tail[:2] == [5, 6] and stats.reused_tokens == 4 * BLOCK)
        assert stats.prompt_tokens == len(system) + len(tail) - stats.reused_tokens
        assert got == answer(plain, system + tail)[0]
    # a prompt sharing less than MIN_REUSE tokens prefills everything
    got, stats = answer(cached, system[:MIN_REUSE - 1] + [1, 2, 3])
    assert stats.reused_tokens == 0


def test_shared_blocks_are_stored_once_and_leaves_go_first(bundle):
    engine = Engine(bundle, threads=2, kv_type="f32", prefill_chunk=32)
    cache = engine.prefix_cache
    rng = np.random.default_rng(2)
    system = rng.integers(3, 300, 4 * BLOCK).tolist()
    tails = [rng.integers(3, 300, 2 * BLOCK + 5).tolist() for _ in range(3)]
    for tail in tails:
        answer(engine, system + tail)
    assert len(cache) == 4 + 3 * 2  # the system prompt's 4 blocks once, 2 of each tail
    block_bytes = cache.bytes // len(cache)
    cache.budget = 8 * block_bytes  # room for 8: the oldest tail's two blocks go, leaf first
    cache._evict_locked(block_bytes)
    assert len(cache) == 8 and cache.bytes == 8 * block_bytes
    for tail, reused in ((tails[1], 6), (tails[2], 6), (tails[0], 4)):  # (tails[0]: the system prompt's)
        _, stats = answer(engine, system + tail + [7])
        assert stats.reused_tokens == reused * BLOCK


def test_concurrent_sessions_with_eviction(bundle):
    """A budget of a few prompts' blocks, 24 generations from 8 threads over 3 prefixes: every answer
    equals the uncached engine's."""
    cached = Engine(bundle, threads=2, kv_type="f32", prefill_chunk=32, prefix_cache_mb=1)
    cached.prefix_cache.budget = 6 * cached.create_session()._state.kv_range_bytes(0, BLOCK)
    plain = Engine(bundle, threads=2, kv_type="f32", prefill_chunk=32, prefix_cache_mb=0)
    rng = np.random.default_rng(1)
    prefixes = [rng.integers(3, 300, n).tolist() for n in (100, 140, 180)]
    prompts = [prefixes[i % 3] + rng.integers(3, 300, 1 + i % 5).tolist() for i in range(24)]
    expected = [answer(plain, p)[0] for p in prompts]
    got: list = [None] * len(prompts)

    def work(k: int) -> None:
        for i in range(k, len(prompts), 8):
            got[i] = answer(cached, prompts[i])[0]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert cached.prefix_cache.hits > 0 and cached.prefix_cache.bytes <= cached.prefix_cache.budget


def test_windowed_models_do_not_use_it(windowed_bundle):
    engine = Engine(windowed_bundle("mistral", 8), threads=2, prefill_chunk=16)
    ids = list(range(3, 120))
    answer(engine, ids)
    _, stats = answer(engine, ids + [5])
    assert stats.reused_tokens == 0 and len(engine.prefix_cache) == 0
