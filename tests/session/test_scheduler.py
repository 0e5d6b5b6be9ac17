"""The engine's scheduler: requests from many threads, batched, each as if it ran alone.

Reference: every request's greedy output run alone on a fresh session, one after another. Checked:
Session.generate from several threads, Engine.submit with blocking and `async for` consumers,
cancellation (mid-stream, before admission, closing a generator), a full queue, the KV budget, a
request that fails inside a step (alone), invalid requests (at submit, without disturbing others),
and a bounded stress run: 64 requests from 16 threads with random lengths, some cancelled, some
invalid.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from pocketlm import ContextOverflowError, InvalidInputError, QueueFullError
from pocketlm.engine import Engine
from testutil import make_f32_bundle

CTX = 128


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_f32_bundle(tmp_path_factory.mktemp("llama"), "llama", seed=3)


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine(bundle, threads=2, max_context=CTX, prefill_chunk=16, kv_type="f32", max_batch=8)


def _prompts(engine, n, seed=0, lo=1, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, engine.vocab_size, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def _alone(engine, prompt, max_tokens, **kw):
    s = engine.create_session()
    text = "".join(s.generate(prompt, max_tokens=max_tokens, temperature=0, **kw))
    return text, s.last_stats.generated_tokens, s.last_stats.finish_reason


def test_generate_from_threads_equals_alone(engine):
    prompts = _prompts(engine, 8, seed=1)
    want = [_alone(engine, p, 24) for p in prompts]
    got = [None] * len(prompts)
    steps0 = engine.scheduler.steps

    def work(i):
        s = engine.create_session()
        got[i] = ("".join(s.generate(prompts[i], max_tokens=24, temperature=0)),
                  s.last_stats.generated_tokens, s.last_stats.finish_reason)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    # batched: far fewer steps than the requests' tokens one by one
    tokens = sum(n for _, n, _ in want) + sum(min(16, len(p)) for p in prompts)
    assert engine.scheduler.steps - steps0 < tokens


def test_submit_iterate_async_and_result(engine):
    prompts = _prompts(engine, 3, seed=2)
    want = [_alone(engine, p, 20)[0] for p in prompts]
    reqs = [engine.submit(p, max_tokens=20, temperature=0) for p in prompts]
    assert "".join(reqs[0]) == want[0]

    async def consume(r):
        return "".join([piece async for piece in r])

    assert asyncio.run(consume(reqs[1])) == want[1]
    assert reqs[2].result(timeout=60) == want[2]
    for r in reqs:
        assert r.done and r.finish_reason in ("stop", "length") and r.error is None


def test_submit_continues_a_given_session(engine):
    prompt = _prompts(engine, 1, seed=3)[0]
    s = engine.create_session()
    r = engine.submit(prompt, session=s, max_tokens=8, temperature=0)
    with pytest.raises(Exception, match="submit"):  # busy until the request finishes
        s.prefill([5])
    r.wait(60)
    alone = engine.create_session()
    "".join(alone.generate(prompt, max_tokens=8, temperature=0))
    assert s.tokens == alone.tokens
    s.prefill([5])  # free again


def test_cancel_mid_stream_and_before_admission(engine):
    prompt = _prompts(engine, 1, seed=4, lo=10, hi=11)[0]
    r = engine.submit(prompt, max_tokens=100, temperature=0, stop=["\x00never"])
    it = iter(r)
    next(it)
    r.cancel()
    rest = list(it)
    assert r.finish_reason == "cancelled" and r.stats.generated_tokens < 100 and len(rest) < 100
    # a session whose generator is closed early is free and consistent afterwards
    s = engine.create_session()
    gen = s.generate(prompt, max_tokens=100, temperature=0)
    next(gen)
    gen.close()
    assert s.last_stats.finish_reason == "cancelled"
    held = s.tokens
    np.testing.assert_allclose(s.prefill([7]), engine.create_session().prefill(held + [7]), atol=1e-4)


def _paused(engine):
    """A context in which no step runs (as if one were under way), so requests stay queued."""
    sched = engine.scheduler

    class Pause:
        def __enter__(self):
            with sched._lock:
                assert not sched._driving
                sched._driving = True

        def __exit__(self, *exc):
            with sched._lock:
                sched._driving = False
                sched._cond.notify_all()
                sched._bg_cond.notify_all()

    return Pause()


def test_full_queue_refuses_clearly_and_loses_nothing(bundle):
    e = Engine(bundle, threads=1, max_context=CTX, prefill_chunk=16, kv_type="f32", max_batch=2, max_queue=3)
    prompts = _prompts(e, 4, seed=5)
    with _paused(e):
        reqs = [e.submit(p, max_tokens=6, temperature=0) for p in prompts[:3]]
        with pytest.raises(QueueFullError, match="queue is full"):
            e.submit(prompts[3], max_tokens=6, temperature=0)
        reqs[1].cancel()  # cancelled while waiting
    assert reqs[0].result(timeout=60) == _alone(e, prompts[0], 6)[0]
    assert reqs[2].result(timeout=60) == _alone(e, prompts[2], 6)[0]
    assert reqs[1].finish_reason == "cancelled" and reqs[1].stats.generated_tokens == 0


def test_kv_budget_admits_what_fits(bundle):
    e = Engine(bundle, threads=1, max_context=CTX, prefill_chunk=16, kv_type="f32", max_batch=8)
    per_request = e.create_session()._state.kv_used_bytes(10 + 20)
    e2 = Engine(bundle, threads=1, max_context=CTX, prefill_chunk=16, kv_type="f32", max_batch=8,
                kv_budget=2 * per_request)
    prompts = _prompts(e2, 5, seed=6, lo=10, hi=11)
    with pytest.raises(InvalidInputError, match="kv_budget"):
        e2.submit(prompts[0], max_tokens=CTX, temperature=0)
    with _paused(e2):
        reqs = [e2.submit(p, max_tokens=20, temperature=0, stop=["\x00never"]) for p in prompts]
    most = 0
    while not all(r.done for r in reqs):
        most = max(most, e2.scheduler.running)
        reqs[-1].wait(0.001)
    assert most <= 2
    for p, r in zip(prompts, reqs):
        assert r.result(timeout=60) == _alone(e2, p, 20, stop=["\x00never"])[0]


def test_failing_request_fails_alone(engine):
    prompts = _prompts(engine, 3, seed=7)
    want = [_alone(engine, p, 12)[0] for p in prompts]
    with _paused(engine):
        reqs = [engine.submit(p, max_tokens=12, temperature=0) for p in prompts]
        gen = reqs[1].generation
        calls = {"n": 0}
        real = gen.on_logits

        def broken(logits):  # the third token of request 1 cannot be sampled
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("sampler broke")
            return real(logits)

        gen.on_logits = broken
    with pytest.raises(RuntimeError, match="sampler broke"):
        "".join(reqs[1])
    assert reqs[1].finish_reason == "error"
    assert reqs[0].result(timeout=60) == want[0] and reqs[2].result(timeout=60) == want[2]


def test_invalid_requests_fail_at_submit(engine):
    with pytest.raises(InvalidInputError, match="temperature"):
        engine.submit([5, 6], temperature=-1)
    with pytest.raises(InvalidInputError, match="unknown sampling parameter"):
        engine.submit([5, 6], temprature=0.5)
    with pytest.raises(ContextOverflowError):
        engine.submit(list(range(3, CTX + 10)), max_tokens=4)
    with pytest.raises(InvalidInputError, match="vocabulary|token ids"):
        engine.submit([5, engine.vocab_size + 3])


def test_stress_many_threads(engine):
    """64 requests from 16 threads: random lengths and sampling, some cancelled mid-stream, some
    invalid. No deadlock (bounded joins), survivors equal their runs alone, the invalid fail clearly."""
    rng = np.random.default_rng(8)
    jobs = []
    for i in range(64):
        prompt = rng.integers(3, engine.vocab_size, int(rng.integers(1, 60))).tolist()
        kind = "invalid" if i % 11 == 5 else "cancel" if i % 7 == 3 else "ok"
        params = {"max_tokens": int(rng.integers(1, 30)), "temperature": 0.0 if i % 2 else 0.8, "seed": i, "top_k": 20}
        if kind == "invalid":
            params["top_p"] = 1.5
        jobs.append((prompt, params, kind))
    want = {}
    for i, (prompt, params, kind) in enumerate(jobs):
        if kind == "ok":
            s = engine.create_session()
            want[i] = "".join(s.generate(prompt, **params))
    got, errors = {}, {}

    def worker(k):
        for i in range(k, len(jobs), 16):
            prompt, params, kind = jobs[i]
            try:
                if kind == "cancel":
                    r = engine.submit(prompt, **{**params, "max_tokens": 50})
                    for _ in r:
                        r.cancel()
                    got[i] = r.finish_reason
                else:
                    s = engine.create_session()
                    got[i] = "".join(s.generate(prompt, **params))
            except Exception as e:  # noqa: BLE001
                errors[i] = e

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "deadlock: a worker is still running"
    for i, (_, _, kind) in enumerate(jobs):
        if kind == "invalid":
            assert isinstance(errors.get(i), InvalidInputError) and "top_p" in str(errors[i])
        elif kind == "cancel":
            assert i not in errors and got[i] in ("cancelled", "stop", "length"), (i, errors.get(i))
        else:
            assert i not in errors and got[i] == want[i], i


def test_plan_step_puts_decode_rows_first_then_prompt_chunks():
    from pocketlm.scheduler import plan_step

    # pending tokens per sequence: decoding ones (1) first, then prompts in order, within the budget
    assert plan_step([5, 1, 0, 300, 1], 8) == [(1, 1), (4, 1), (0, 5), (3, 1)]
    assert plan_step([300, 2], 256) == [(0, 256)]          # a long prompt takes the whole budget...
    assert plan_step([1, 300, 1], 4) == [(0, 1), (2, 1), (1, 2)]  # ...but never the decode rows' place
    assert plan_step([0, 0], 8) == []
