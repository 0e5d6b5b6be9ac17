"""Batched executor steps (_core.run_batch) against each sequence run alone.

Every architecture family's tiny config (Llama, GPT-2, Gemma, and the windowed ones: Mistral, Qwen2
and Qwen3 with sliding windows, Phi-3, Gemma 2, Gemma 3), f32 KV, window 8 and steps of at most 8
rows (rings of 15 slots). Four sequences of different lengths (1 to 37 prompt tokens, so the
longer ones wrap their rings) go through steps that mix prompt chunks of some with decode rows of
others, as the scheduler makes them; the logits each step gives a sequence must equal those of a
fresh session fed the same tokens alone, within the f32 parity tolerance, and so must the greedy
tokens. Also: a step refuses bad input (naming the sequence) without running anything, and one
State cannot appear twice in a step.
"""

from __future__ import annotations

import numpy as np
import pytest
from pocketlm import _core
from pocketlm.engine import Engine
from pocketlm.scheduler import plan_step
from testutil import WINDOWED_ARCHS, make_f32_bundle

WINDOW, STEP_ROWS, CTX = 8, 8, 96
PROMPTS = (37, 1, 12, 5)  # prompt lengths of the four sequences
DECODE = 14               # greedy tokens each sequence then generates


@pytest.fixture(scope="module")
def full_attention_bundles(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_f32_bundle(tmp_path_factory.mktemp(arch), arch, seed=7)
        return made[arch]

    return get


@pytest.fixture(scope="module", params=("llama", "gpt2", "gemma") + WINDOWED_ARCHS)
def engine(request, full_attention_bundles, windowed_bundle):
    arch = request.param
    path = windowed_bundle(arch, WINDOW) if arch in WINDOWED_ARCHS else full_attention_bundles(arch)
    e = Engine(path, threads=2, max_context=CTX, prefill_chunk=STEP_ROWS, kv_type="f32", max_batch=4)
    e.arch_name = arch
    return e


def _tol(logits):
    return 1e-4 * max(1.0, float(np.abs(logits).max()))


def _alone(engine, prompt, n):
    """(logits after the prompt and after each greedy token, the greedy tokens), one session alone."""
    s = engine.create_session()
    logits = [s.prefill(prompt).copy()]
    tokens = []
    for _ in range(n):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(s.decode(tokens[-1]).copy())
    return logits, tokens


def test_batched_steps_equal_each_sequence_alone(engine):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, engine.vocab_size, n).tolist() for n in PROMPTS]
    program = engine.compiled.program
    sessions = [engine.create_session() for _ in prompts]
    feeds = [np.asarray(p, dtype=np.int32) for p in prompts]
    positions = [0] * len(prompts)
    got_logits = [[] for _ in prompts]
    got_tokens = [[] for _ in prompts]
    mixed = 0
    while any(f.size for f in feeds):
        # Decode rows first, then prompt chunks, up to STEP_ROWS rows: as the scheduler plans.
        step = plan_step([int(f.size) for f in feeds], STEP_ROWS)
        mixed += len({feeds[i].size > 1 for i, _ in step}) == 2
        out = _core.run_batch(program, [(sessions[i]._state, feeds[i][:n], positions[i]) for i, n in step])
        assert out.shape == (len(step), engine.vocab_size)
        for row, (i, n) in enumerate(step):
            positions[i] += n
            feeds[i] = feeds[i][n:]
            if feeds[i].size:
                continue
            got_logits[i].append(out[row].copy())
            if len(got_tokens[i]) < DECODE:
                got_tokens[i].append(int(np.argmax(out[row])))
                feeds[i] = np.array([got_tokens[i][-1]], dtype=np.int32)
    assert mixed > 0, "no step mixed prompt chunks with decode rows"
    for i, prompt in enumerate(prompts):
        want_logits, want_tokens = _alone(engine, prompt, DECODE)
        assert got_tokens[i] == want_tokens, (engine.arch_name, i)
        for j, (a, b) in enumerate(zip(got_logits[i], want_logits)):
            err = float(np.abs(a - b).max())
            assert err <= _tol(b), (engine.arch_name, i, j, err)


def test_scheduler_greedy_tokens_equal_each_alone(engine):
    """The same through the Engine's scheduler: requests submitted together, consumed afterwards."""
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, engine.vocab_size, n).tolist() for n in PROMPTS]
    requests = [engine.submit(p, max_tokens=DECODE, temperature=0) for p in prompts]
    for p, r in zip(prompts, requests):
        r.result(timeout=60)
        alone = engine.create_session()
        "".join(alone.generate(p, max_tokens=DECODE, temperature=0))
        got = r.token_ids
        want = alone.tokens[len(p):]  # the last generated token is not fed back: not in the history
        assert got[:len(want)] == want, engine.arch_name
        assert r.stats.generated_tokens == alone.last_stats.generated_tokens
        assert r.finish_reason == alone.last_stats.finish_reason


def test_bad_step_names_the_sequence_and_runs_nothing(engine):
    program = engine.compiled.program
    a, b = engine.create_session(), engine.create_session()
    ok = np.array([5, 6, 7], dtype=np.int32)
    bad = np.array([5, engine.vocab_size], dtype=np.int32)
    with pytest.raises(ValueError, match="sequence 1: token id"):
        _core.run_batch(program, [(a._state, ok, 0), (b._state, bad, 0)])
    with pytest.raises(ValueError, match="same State as sequence 0"):
        _core.run_batch(program, [(a._state, ok, 0), (a._state, ok, 3)])
    with pytest.raises(ValueError, match="at most 8 rows"):
        _core.run_batch(program, [(a._state, np.arange(3, 9, dtype=np.int32), 0), (b._state, ok, 0)])
    with pytest.raises(ValueError, match="sequences"):
        _core.run_batch(program, [(engine.create_session()._state, ok, 0) for _ in range(5)])
    with pytest.raises(ValueError, match="context overflow"):
        _core.run_batch(program, [(a._state, ok, 0), (b._state, ok, CTX - 2)])
    other = Engine(engine.path, threads=1, max_context=CTX, prefill_chunk=STEP_ROWS, kv_type="f32")
    with pytest.raises(ValueError, match="another Program"):
        _core.run_batch(program, [(a._state, ok, 0), (other.create_session()._state, ok, 0)])
    # Nothing ran: a's cache is as a fresh session's (its first call's logits match one).
    got = _core.run_batch(program, [(a._state, ok, 0)])[0]
    want = engine.create_session().prefill(ok.tolist())
    assert float(np.abs(got - want).max()) <= _tol(want)
