"""The ops Qwen3 and the Gemma family add, vs numpy: head_rms_norm, geglu, matmul_geglu,
scale, softcap, and attention with a sliding window (ring-buffer KV cache) and soft-capping."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import ProgramBuilder, attention_program, matmul, max_rel_err, rms_norm

from pocketlm.dtypes import DType

rng = np.random.default_rng(4321)


def rand(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run(prog, t, pos=0, max_context=64):
    from pocketlm import _core

    return _core.State(prog, max_context).run(np.arange(t, dtype=np.int32), pos)


def x_program(b: ProgramBuilder, x: np.ndarray):
    """x [T, D] into the arena through an f32 embedding (token t -> row t)."""
    e, _ = b.weight(x)
    xa = b.arena(x.shape[1])
    b.op("embed", [e, b.tokens()], [xa])
    return xa


def gelu_tanh(x):
    x = x.astype(np.float64)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("n_heads,head_dim", [(3, 8), (2, 13), (5, 64)])
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_head_rms_norm(n_heads, head_dim, in_place, n_threads):
    t = 5
    x, w = rand(t, n_heads * head_dim, scale=3.0), rand(head_dim)
    b = ProgramBuilder(max_tokens=8)
    xa = x_program(b, x)
    y = xa if in_place else b.arena(n_heads * head_dim)
    b.op("head_rms_norm", [xa, b.const(w)], [y], iparams=[n_heads, head_dim], fparams=[1e-6])
    got = run(b.program(y, n_threads=n_threads), t)
    ref = rms_norm(x.reshape(t, n_heads, head_dim), w, 1e-6).reshape(t, -1)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_head_rms_norm_rejects_a_wrong_weight():
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, rand(2, 12))
    with pytest.raises(ValueError, match="norm weight"):
        b.op("head_rms_norm", [xa, b.const(rand(12))], [b.arena(12)], iparams=[3, 4], fparams=[1e-6])
        b.program(xa)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_geglu_scale_softcap(n_threads):
    t, d = 5, 37
    a, u = rand(t, d, scale=2.0), rand(t, d)
    b = ProgramBuilder(max_tokens=8)
    xa, xu = x_program(b, a), x_program(b, u)
    y_geglu, y_scale, y_cap = b.arena(d), b.arena(d), b.arena(d)
    b.op("geglu", [xa, xu], [y_geglu])
    b.op("scale", [xa], [y_scale], fparams=[7.5])
    b.op("softcap", [xa], [y_cap], fparams=[1.5])
    for out, ref in [(y_geglu, gelu_tanh(a) * u), (y_scale, a * 7.5), (y_cap, 1.5 * np.tanh(a / 1.5))]:
        got = run(b.program(out, n_threads=n_threads), t)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_unary_ops_in_place():
    t, d = 3, 20
    a = rand(t, d)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, a)
    b.op("scale", [xa], [xa], fparams=[-2.0])
    b.op("softcap", [xa], [xa], fparams=[3.0])
    np.testing.assert_allclose(run(b.program(xa), t), 3.0 * np.tanh(-2.0 * a / 3.0), rtol=1e-5, atol=1e-6)


def test_softcap_needs_a_positive_cap():
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, rand(2, 8))
    b.op("softcap", [xa], [xa], fparams=[0.0])
    with pytest.raises(ValueError, match="cap"):
        b.program(xa)


@pytest.mark.parametrize("dtype", [DType.F32, DType.Q8_0, DType.Q4_1])
def test_matmul_geglu(dtype):
    t, k, f = 3, 64, 40
    x, wg, wu = rand(t, k), rand(f, k, scale=0.2), rand(f, k, scale=0.2)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    gid, g_seen = b.weight(wg, dtype)
    uid, u_seen = b.weight(wu, dtype)
    y = b.arena(f)
    b.op("matmul_geglu", [xa, gid, uid], [y])
    ref = gelu_tanh(matmul(x, g_seen, dtype)) * matmul(x, u_seen, dtype)
    for n_threads in (1, 2):
        assert max_rel_err(run(b.program(y, n_threads=n_threads), t), ref) < 1e-5


# ---- attention: sliding window and soft-capping -----------------------------------------------


def attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale, window=0, softcap=0.0):
    """Every row of q (positions 0..) over k, v (positions 0..), causal, optional window."""
    t = q.shape[0]
    group = n_heads // n_kv_heads
    qh = q.reshape(t, n_heads, head_dim).astype(np.float64)
    kh = k.reshape(t, n_kv_heads, head_dim).astype(np.float64)
    vh = v.reshape(t, n_kv_heads, head_dim).astype(np.float64)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= i) & ((window <= 0) | (j > i - window))
    out = np.zeros((t, n_heads, head_dim))
    for h in range(n_heads):
        s = qh[:, h] @ kh[:, h // group].T * scale
        if softcap:
            s = softcap * np.tanh(s / softcap)
        s = np.where(allowed, s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ vh[:, h // group]
    return out.reshape(t, -1).astype(np.float32)


@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize("chunks", [[7] * 6 + [1] * 10, [1] * 30, [3, 7, 7, 7, 2, 7, 7, 7, 3]])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_sliding_window_attention_across_ring_wrap(window, chunks, n_threads):
    """Chunked prefill and decode whose rows cross the ring's wrap-around many times."""
    from pocketlm import _core

    n_heads, n_kv_heads, head_dim, scale = 4, 2, 8, 0.3
    total = sum(chunks)
    q, k, v = (rand(total, h * head_dim) for h in (n_heads, n_kv_heads, n_kv_heads))
    prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 7, [0, n_heads, n_kv_heads, head_dim, window],
                             [scale, 0.0], n_threads)
    state = _core.State(prog, 128)
    assert state.kv_capacities == [min(128, window + 7 - 1)]
    outs, pos = [], 0
    for c in chunks:
        outs.append(state.run(np.arange(pos, pos + c, dtype=np.int32), pos))
        pos += c
    ref = attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale, window=window)
    np.testing.assert_allclose(np.concatenate(outs), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 150])
def test_windowed_decode_deep_in_context_split_over_threads(window):
    """Long decode: the positions of each row are split into chunks over the threads."""
    from pocketlm import _core

    n_heads, n_kv_heads, head_dim, scale, total = 4, 1, 16, 0.25, 420
    q, k, v = (rand(total, h * head_dim) for h in (n_heads, n_kv_heads, n_kv_heads))
    ref = attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale, window=window, softcap=2.0)
    for n_threads in (1, 2):
        prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 64,
                                 [0, n_heads, n_kv_heads, head_dim, window], [scale, 2.0], n_threads)
        state = _core.State(prog, 512)
        pos, outs = 0, []
        for c in [64] * 5 + [1] * 90 + [10]:
            outs.append(state.run(np.arange(pos, pos + c, dtype=np.int32), pos))
            pos += c
        np.testing.assert_allclose(np.concatenate(outs), ref[:pos], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5, 100])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_f16_kv_cache_equals_attention_over_half_rounded_keys_and_values(window, n_threads):
    """kv_type="f16" stores K and V rounded to half (to nearest even) and computes in float: the
    reference is the float64 attention over exactly those rounded values. Chunked prefill, long
    decode split over the threads, and (window 5) the ring's wrap-around."""
    from pocketlm import _core

    n_heads, n_kv_heads, head_dim, scale, total = 6, 2, 64, 0.125, 300
    q, k, v = (rand(total, h * head_dim, scale=2.0) for h in (n_heads, n_kv_heads, n_kv_heads))
    half = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    ref = attention_ref(q, half(k), half(v), n_heads, n_kv_heads, head_dim, scale, window=window)
    prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 32, [0, n_heads, n_kv_heads, head_dim, window],
                             [scale, 0.0], n_threads)
    state = _core.State(prog, 512, "f16")
    f32 = _core.State(prog, 512)
    assert state.kv_type == "f16" and f32.kv_type == "f32" and 2 * state.kv_bytes == f32.kv_bytes
    pos, outs = 0, []
    for c in [32, 32, 7, 1, 20] + [1] * 208:
        outs.append(state.run(np.arange(pos, pos + c, dtype=np.int32), pos))
        pos += c
    np.testing.assert_allclose(np.concatenate(outs), ref[:pos], rtol=1e-5, atol=1e-5)
    exact = attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale, window=window)
    assert max_rel_err(exact[:pos], ref[:pos]) > 1e-5  # the rounding is visible, so the test could fail


def test_kv_type_is_checked():
    from pocketlm import _core

    q = rand(2, 8)
    prog = attention_program(q, q, q, 1, 1, 8, 4, [0, 1, 1, 8, 0], [1.0, 0.0], 1)
    with pytest.raises(ValueError, match="kv_type"):
        _core.State(prog, 16, "bf16")


def test_softcapped_attention_matches_reference():
    n_heads, n_kv_heads, head_dim, scale, total = 2, 2, 8, 1.0, 12
    q, k, v = (rand(total, h * head_dim, scale=3.0) for h in (n_heads, n_kv_heads, n_kv_heads))
    prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 16, [0, n_heads, n_kv_heads, head_dim, 0],
                             [scale, 5.0], 1)
    got = run(prog, total)
    ref = attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale, softcap=5.0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert max_rel_err(ref, attention_ref(q, k, v, n_heads, n_kv_heads, head_dim, scale)) > 1e-2  # it matters


def test_kv_memory_follows_the_window():
    from pocketlm import _core

    def state(window):
        q, k, v = rand(4, 8), rand(4, 8), rand(4, 8)
        prog = attention_program(q, k, v, 1, 1, 8, 16, [0, 1, 1, 8, window], [1.0, 0.0], 1)
        return _core.State(prog, 4096)

    full, windowed = state(0), state(64)
    assert full.kv_capacities == [4096] and windowed.kv_capacities == [64 + 16 - 1]
    assert windowed.kv_bytes * 4096 == full.kv_bytes * (64 + 16 - 1)


def test_one_layer_cannot_mix_windows():
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, rand(2, 8))
    o1, o2 = b.arena(8), b.arena(8)
    b.op("attention", [xa, xa, xa], [o1], iparams=[0, 1, 1, 8, 4], fparams=[1.0, 0.0])
    b.op("attention", [xa, xa, xa], [o2], iparams=[0, 1, 1, 8, 0], fparams=[1.0, 0.0])
    with pytest.raises(ValueError, match="window"):
        b.program(o2, kv=(1, 1, 8))
