"""Sessions of one engine share its thread pool and workspace (issue 11, item 2): a new session
costs its KV cache and a few bytes, never threads nor another arena. Compared against the process's
own counts (/proc/self/task, VmRSS) and, for correctness, against each session run alone.

Measured on the previous build (a pool and a workspace per State), the same tests failed: 16 sessions
of a 2-thread engine added 16 threads (one worker each; now 1 for the engine), and the 15 sessions
after the first committed about 15 workspaces (32 MiB here; now 0.94 MiB, their KV bytes).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from testutil import make_hf_model
from pocketlm.convert import convert
from pocketlm.engine import Engine

MiB = 1 << 20


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    """A tiny Llama whose workspace (wide FFN, 128-row chunks) dwarfs a chunk's KV cache."""
    d = tmp_path_factory.mktemp("share")
    make_hf_model(d / "hf", "llama", seed=3, intermediate_size=2048, max_position_embeddings=512)
    return convert(d / "hf", d / "m.plm", quant="f32", progress=False)


def n_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_sixteen_sessions_hold_one_pool(llama_bundle):
    """Old build: +16 threads (one worker per session's pool); now +1 (the engine's worker)."""
    before = n_threads()
    engine = Engine(llama_bundle, threads=2, max_context=256, prefill_chunk=16, kv_type="f32")
    sessions = [engine.create_session() for _ in range(16)]
    for i, s in enumerate(sessions):
        s.prefill([3 + i, 4, 5])
        s.decode(7)
    assert n_threads() - before <= engine.threads + 2, (before, n_threads())


def test_sixteen_sessions_commit_their_kv_and_one_workspace(llama_bundle):
    """Each session prefills one whole chunk (every arena row is touched): the 15 sessions after the
    first add their KV bytes, not 15 more workspaces (the old build added 32 MiB here, now 0.94 MiB)."""
    engine = Engine(llama_bundle, threads=2, max_context=256, prefill_chunk=128, kv_type="f32")
    workspace = engine.compiled.program.arena_bytes
    prompt = [3 + i % 300 for i in range(128)]
    first = engine.create_session()
    first.prefill(prompt)
    before = rss_bytes()
    sessions = [engine.create_session() for _ in range(15)]
    for s in sessions:
        s.prefill(prompt)
    grown = rss_bytes() - before
    kv = sum(s.kv_bytes for s in sessions)
    assert workspace >= MiB and kv < 2 * MiB  # the test tells one workspace from sixteen
    assert grown <= kv + 3 * MiB, (grown, kv, workspace)


def run_schedule(engine, plans, interleaved: bool, max_contexts):
    """plans[i]: the calls of session i, each a list of ids (a prefill; one id is a decode). Returns
    every call's logits per session. Interleaved: one call of each session in turn (round robin)."""
    outs = [[] for _ in plans]
    if not interleaved:
        for i, plan in enumerate(plans):
            s = engine.create_session(max_context=max_contexts[i])
            outs[i] = [s.prefill(ids).copy() for ids in plan]
        return outs
    sessions = [engine.create_session(max_context=m) for m in max_contexts]
    for step in range(max(len(p) for p in plans)):
        for i, plan in enumerate(plans):
            if step < len(plan):
                outs[i].append(sessions[i].prefill(plan[step]).copy())
    return outs


def make_plans(vocab: int, seed: int):
    """Four sessions at different positions: prefills of several chunks and of less than one,
    decodes, a ring wrapped past its window (model windows are 8, chunks 4)."""
    rng = np.random.default_rng(seed)

    def ids(n):
        return [int(t) for t in rng.integers(3, vocab, n)]

    return [
        [ids(10), ids(1), ids(1), ids(3), ids(1), ids(1), ids(1)],
        [ids(1), ids(1), ids(1), ids(1), ids(6), ids(1), ids(1), ids(1)],
        [ids(25), ids(1), ids(1), ids(1), ids(9), ids(1)],
        [ids(4), ids(4), ids(2), ids(1), ids(1)],
    ]


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma3"])
def test_interleaved_sessions_equal_each_alone(arch, windowed_bundle, tmp_path_factory):
    if arch == "llama":
        d = tmp_path_factory.mktemp("rr-llama")
        make_hf_model(d / "hf", "llama", seed=5)
        path = convert(d / "hf", d / "m.plm", quant="f32", progress=False)
    else:
        path = windowed_bundle(arch, 8)
    engine = Engine(path, threads=2, max_context=64, prefill_chunk=4, kv_type="f32")
    plans = make_plans(engine.vocab_size, seed=len(arch))
    # A smaller session first, then larger ones: the shared scores grow while sessions hold positions.
    max_contexts = [32, 64, 48, 64]
    alone = run_schedule(engine, plans, interleaved=False, max_contexts=max_contexts)
    together = run_schedule(engine, plans, interleaved=True, max_contexts=max_contexts)
    for i, (a, b) in enumerate(zip(alone, together)):
        for step, (x, y) in enumerate(zip(a, b)):
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=0, err_msg=f"session {i}, call {step}")
