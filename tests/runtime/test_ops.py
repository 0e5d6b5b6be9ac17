"""Each executor op on small random tensors vs a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import (
    ProgramBuilder,
    attention,
    attention_program,
    matmul,
    max_rel_err,
    rms_norm,
    rope,
    rope_table,
    silu,
)

from pocketlm.dtypes import DType

rng = np.random.default_rng(1234)

QUANT = [DType.Q8_0, DType.Q4_0, DType.Q4_1, DType.Q4_0_G64, DType.Q4_1_G128, DType.I8]


def rand(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run(prog, tokens_or_t, pos=0, max_context=64):
    from pocketlm import _core

    state = _core.State(prog, max_context)
    toks = tokens_or_t if isinstance(tokens_or_t, np.ndarray) else np.zeros(tokens_or_t, np.int32)
    return state.run(toks, pos)


def x_program(b: ProgramBuilder, x: np.ndarray):
    """Feeds x [T, D] into the arena through an f32 embedding of the rows (token t -> row t)."""
    e, _ = b.weight(x)
    tok = b.tokens()
    xa = b.arena(x.shape[1])
    b.op("embed", [e, tok], [xa])
    return xa


def tokens_for(t):
    return np.arange(t, dtype=np.int32)


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.Q8_0, DType.Q4_1, DType.I8])
def test_embed(dtype):
    vocab, d = 11, 64
    e = rand(vocab, d)
    b = ProgramBuilder(max_tokens=8)
    eid, seen = b.weight(e, dtype)
    tok = b.tokens()
    y = b.arena(d)
    b.op("embed", [eid, tok], [y])
    toks = np.array([3, 0, 10, 3, 7], np.int32)
    out = run(b.program(y), toks)
    np.testing.assert_allclose(out, seen[toks], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_rms_norm_add_swiglu(n_threads):
    t, d = 5, 24
    a, bb, w = rand(t, d), rand(t, d), rand(d)
    b = ProgramBuilder(max_tokens=8)
    xa = x_program(b, a)
    xb = x_program(b, bb)
    wid = b.const(w)
    y_norm, y_add, y_sw = b.arena(d), b.arena(d), b.arena(d)
    b.op("rms_norm", [xa, wid], [y_norm], fparams=[1e-5])
    b.op("add", [xa, xb], [y_add])
    b.op("swiglu", [xa, xb], [y_sw])
    # in place: y aliases an input
    b.op("add", [xb, y_norm], [xb])
    for out, ref in [
        (y_norm, rms_norm(a, w, 1e-5)),
        (y_add, a + bb),
        (y_sw, silu(a) * bb),
        (xb, bb + rms_norm(a, w, 1e-5)),
    ]:
        got = run(b.program(out, n_threads=n_threads), tokens_for(t))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_in_place():
    t, d = 3, 40
    a, bb, w = rand(t, d), rand(t, d), rand(d)
    b = ProgramBuilder(max_tokens=4)
    xa, xb = x_program(b, a), x_program(b, bb)
    wid = b.const(w)
    y = b.arena(d)
    b.op("add_rms_norm", [xa, xb, wid], [xa, y], fparams=[1e-6])  # s aliases a
    prog_s, prog_y = b.program(xa), b.program(y)
    np.testing.assert_allclose(run(prog_s, tokens_for(t)), a + bb, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(run(prog_y, tokens_for(t)), rms_norm(a + bb, w, 1e-6),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16] + QUANT)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul(dtype, bias):
    t, k, n = 5, 128, 72
    x, w, bv = rand(t, k), rand(n, k, scale=0.1), rand(n)
    for n_threads in (1, 2):
        b = ProgramBuilder(max_tokens=8)
        xa = x_program(b, x)
        wid, seen = b.weight(w, dtype)
        bid = b.const(bv) if bias else -1
        y = b.arena(n)
        b.op("matmul", [xa, wid, bid], [y])
        got = run(b.program(y, n_threads=n_threads), tokens_for(t))
        ref = matmul(x, seen, dtype) + (bv if bias else 0)
        assert max_rel_err(got, ref) < 1e-5, (dtype, n_threads)


@pytest.mark.parametrize("dtypes", [(DType.F32, DType.F32, DType.F32),
                                    (DType.Q8_0, DType.Q4_0, DType.F16)])
def test_matmul_multi(dtypes):
    t, k = 4, 64
    x = rand(t, k)
    ns = (48, 16, 16)
    ws = [rand(n, k, scale=0.1) for n in ns]
    biases = [rand(48), None, rand(16)]
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    inputs, outputs, refs = [xa], [], []
    for w, bv, dt in zip(ws, biases, dtypes):
        wid, seen = b.weight(w, dt)
        inputs += [wid, b.const(bv) if bv is not None else -1]
        outputs.append(b.arena(w.shape[0]))
        refs.append(matmul(x, seen, dt) + (bv if bv is not None else 0))
    b.op("matmul_multi", inputs, outputs)
    for n_threads in (1, 2):
        for out, ref in zip(outputs, refs):
            got = run(b.program(out, n_threads=n_threads), tokens_for(t))
            assert max_rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("dtype", [DType.F32, DType.Q8_0, DType.Q4_1])
def test_matmul_swiglu(dtype):
    t, k, f = 3, 64, 40
    x, wg, wu = rand(t, k), rand(f, k, scale=0.2), rand(f, k, scale=0.2)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    gid, g_seen = b.weight(wg, dtype)
    uid, u_seen = b.weight(wu, dtype)
    y = b.arena(f)
    b.op("matmul_swiglu", [xa, gid, uid], [y])
    ref = silu(matmul(x, g_seen, dtype)) * matmul(x, u_seen, dtype)
    for n_threads in (1, 2):
        got = run(b.program(y, n_threads=n_threads), tokens_for(t))
        assert max_rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("rope_dim,in_place", [(8, True), (8, False), (4, False), (4, True)])
def test_rope(rope_dim, in_place):
    t, n_heads, head_dim, pos0 = 4, 3, 8, 5
    x = rand(t, n_heads * head_dim)
    table = rope_table(32, rope_dim)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    tab = b.const(table)
    y = xa if in_place else b.arena(n_heads * head_dim)
    b.op("rope", [xa, tab], [y], iparams=[n_heads, head_dim, rope_dim])
    got = run(b.program(y), tokens_for(t), pos=pos0, max_context=32)
    np.testing.assert_allclose(got, rope(x, table, pos0, n_heads, head_dim, rope_dim),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", [(3, 1, 8), (4, 2, 16), (2, 2, 5)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_attention_chunked(n_heads, n_kv_heads, head_dim, n_threads):
    """Causal attention over the KV cache across calls of 4, 3 and 1 rows."""
    from pocketlm import _core

    total, scale = 8, 1.0 / np.sqrt(head_dim)
    q = rand(total, n_heads * head_dim)
    k = rand(total, n_kv_heads * head_dim)
    v = rand(total, n_kv_heads * head_dim)
    prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 4, [1, n_heads, n_kv_heads, head_dim],
                             [scale], n_threads, n_layers=2)
    state = _core.State(prog, 16)
    outs, pos = [], 0
    for chunk in (4, 3, 1):
        outs.append(state.run(np.arange(pos, pos + chunk, dtype=np.int32), pos))
        pos += chunk
    got = np.concatenate(outs)
    ref = attention(q, k, v, 0, n_heads, n_kv_heads, head_dim, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_take_last_and_out_param():
    t, d = 5, 24
    x = rand(t, d)
    b = ProgramBuilder(max_tokens=8)
    xa = x_program(b, x)
    y = b.arena(d, rows=1)
    b.op("take_last", [xa], [y])
    prog = b.program(y)
    assert prog.output_cols == d
    from pocketlm import _core

    state = _core.State(prog, 16)
    out = np.empty((1, d), np.float32)
    got = state.run(tokens_for(t), 0, out=out)
    assert got is out or np.shares_memory(got, out)
    np.testing.assert_array_equal(out, x[-1:])


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 1), (6, 3)])
def test_attention_long_context_decode(n_heads, n_kv_heads):
    """Decode steps deep in the context, where positions are split across threads."""
    from pocketlm import _core

    head_dim, total, scale = 16, 560, 0.25
    q = rand(total, n_heads * head_dim)
    k = rand(total, n_kv_heads * head_dim)
    v = rand(total, n_kv_heads * head_dim)
    ref = attention(q, k, v, 0, n_heads, n_kv_heads, head_dim, scale)
    for n_threads in (1, 2):
        prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 128, [0, n_heads, n_kv_heads, head_dim],
                                 [scale], n_threads)
        state = _core.State(prog, total)
        pos, outs = 0, []
        for chunk in [128] * 4 + [1] * 8 + [10, 1, 1]:
            outs.append(state.run(np.arange(pos, pos + chunk, dtype=np.int32), pos))
            pos += chunk
        np.testing.assert_allclose(np.concatenate(outs), ref[:pos], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv_heads,head_dim", [(4, 1, 64), (6, 3, 32), (2, 2, 128)])
@pytest.mark.parametrize("layer", [0, 1])
def test_attention_q8_0_cache(n_heads, n_kv_heads, head_dim, layer):
    """A Q8_0 KV cache: attention equals the float64 reference over the cache's values dequantized
    (each head's row quantized as pocketlm.quant's Q8_0; keys turned by the Hadamard transform first,
    and back; the first layer's keys f16), in prefill chunks and deep decode steps; and the cache holds
    exactly those bytes."""
    from pocketlm import _core
    from pocketlm.dtypes import DType
    from pocketlm.quant import dequantize, quantize

    total, scale = 300, 1.0 / np.sqrt(head_dim)
    q = rand(total, n_heads * head_dim)
    k = rand(total, n_kv_heads * head_dim) * 3
    v = rand(total, n_kv_heads * head_dim)

    # keys are stored Hadamard-rotated: H k, H the normalized Sylvester Hadamard matrix (symmetric)
    hadamard = np.array([[1.0]])
    while hadamard.shape[0] < head_dim:
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    hadamard /= np.sqrt(head_dim)
    rb = head_dim // 32 * 34
    krb = 2 * head_dim if layer == 0 else rb  # the first layer's keys are f16
    for n_threads in (1, 2):
        prog = attention_program(q, k, v, n_heads, n_kv_heads, head_dim, 64, [layer, n_heads, n_kv_heads, head_dim],
                                 [scale], n_threads, n_layers=2)
        state = _core.State(prog, total, "q8_0")
        assert state.kv_type == "q8_0"
        assert state.kv_used_bytes(total) == total * n_kv_heads * (2 * head_dim + rb + rb + rb)
        pos, outs = 0, []
        for chunk in [64] * 4 + [1] * 8 + [10, 1, 1]:
            outs.append(state.run(np.arange(pos, pos + chunk, dtype=np.int32), pos))
            pos += chunk
        # the cache, per layer K then V, per head its rows ([head][position]), dequantized; keys turned back
        raw = state.kv_export(pos)
        start = 0 if layer == 0 else n_kv_heads * pos * (2 * head_dim + rb)
        k_raw = raw[start:start + n_kv_heads * pos * krb].reshape(n_kv_heads, pos, krb)
        v_raw = raw[start + k_raw.size:start + k_raw.size + n_kv_heads * pos * rb].reshape(n_kv_heads, pos, rb)
        if layer == 0:
            k_vals = k_raw.reshape(-1).view(np.float16).astype(np.float64).reshape(n_kv_heads, pos, head_dim)
            k_vals = k_vals.transpose(1, 0, 2) @ hadamard  # (turned below, as the Q8_0 keys)
        else:
            k_vals = dequantize(k_raw.reshape(-1), DType.Q8_0, (n_kv_heads * pos, head_dim)).astype(np.float64) \
                .reshape(n_kv_heads, pos, head_dim).transpose(1, 0, 2)
        values = [k_vals, dequantize(v_raw.reshape(-1), DType.Q8_0, (n_kv_heads * pos, head_dim))
                  .astype(np.float64).reshape(n_kv_heads, pos, head_dim).transpose(1, 0, 2)]
        packed = [k_raw, v_raw]
        k_deq = (values[0] @ hadamard).reshape(pos, -1)  # H^T = H
        v_deq = values[1].reshape(pos, -1)
        ref = attention(q[:pos], k_deq, v_deq, 0, n_heads, n_kv_heads, head_dim, scale)
        np.testing.assert_allclose(np.concatenate(outs), ref, rtol=1e-4, atol=1e-5)
        # ... which are H k and v, each to within half a quantization step of its block
        for got, want in ((values[0], k[:pos].reshape(pos, n_kv_heads, head_dim) @ hadamard),
                          (values[1], v[:pos].reshape(pos, n_kv_heads, head_dim)))[layer == 0:]:
            blocks = want.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            assert np.all(np.abs(got.reshape(-1, 32) - blocks) <= 0.502 * step + 1e-6)
        # V is stored exactly as pocketlm.quant quantizes it
        v_want = quantize(v[:pos].reshape(-1, head_dim), DType.Q8_0).reshape(pos, n_kv_heads, rb).transpose(1, 0, 2)
        np.testing.assert_array_equal(packed[1], v_want)
        if layer == 0:  # f16 keys: the keys rounded to half
            np.testing.assert_array_equal(k_raw.reshape(-1).view(np.float16).reshape(n_kv_heads, pos, head_dim),
                                          k[:pos].reshape(pos, n_kv_heads, head_dim).transpose(1, 0, 2).astype(np.float16))


def test_q8_0_cache_needs_whole_blocks():
    from pocketlm import _core

    b = ProgramBuilder(max_tokens=4)
    x = b.arena(48)
    e, _ = b.weight(rand(10, 48))
    b.op("embed", [e, b.tokens()], [x])
    prog = b.program(x, kv=(1, 1, 16))  # a KV cache of head_dim 16
    with pytest.raises(Exception, match="multiple of 32"):
        _core.State(prog, 8, "q8_0")


# ---- GPT-2 ops: layer_norm, pos_embed, gelu ---------------------------------------------------


def layer_norm_ref(x, w, b, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)
    return ((x64 - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)


def gelu_tanh_ref(x):
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))).astype(np.float32)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_layer_norm_and_gelu(in_place, n_threads):
    t, d = 5, 37  # not a multiple of any SIMD width
    x = rand(t, d) * 3 + 10  # a large mean: the variance must not cancel
    x[:, ::2] -= 20  # and gelu sees both signs
    w, bias = rand(d), rand(d)
    b = ProgramBuilder(max_tokens=8)
    xa, xg = x_program(b, x), x_program(b, x)
    wid, bid = b.const(w), b.const(bias)
    y_norm = xa if in_place else b.arena(d)
    y_gelu = xg if in_place else b.arena(d)
    b.op("layer_norm", [xa, wid, bid], [y_norm], fparams=[1e-5])
    b.op("gelu", [xg], [y_gelu])
    np.testing.assert_allclose(run(b.program(y_norm, n_threads=n_threads), tokens_for(t)),
                               layer_norm_ref(x, w, bias, 1e-5), rtol=1e-5, atol=1e-5)
    got = run(b.program(y_gelu, n_threads=n_threads), tokens_for(t))
    np.testing.assert_allclose(got, gelu_tanh_ref(x), rtol=1e-5, atol=1e-5)


def test_gelu_matches_transformers_gelu_new():
    import torch
    from transformers.activations import ACT2FN

    x = rand(3, 70, scale=4.0)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    y = b.arena(70)
    b.op("gelu", [xa], [y])
    ref = ACT2FN["gelu_new"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(b.program(y), tokens_for(3)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.Q8_0, DType.I8])
@pytest.mark.parametrize("in_place", [False, True])
def test_pos_embed(dtype, in_place):
    t, d, max_pos, pos0 = 4, 64, 12, 7
    x, table = rand(t, d), rand(max_pos, d)
    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, x)
    pid, seen = b.weight(table, dtype)
    y = xa if in_place else b.arena(d)
    b.op("pos_embed", [xa, pid], [y])
    for n_threads in (1, 2):
        got = run(b.program(y, n_threads=n_threads), tokens_for(t), pos=pos0, max_context=max_pos)
        np.testing.assert_allclose(got, x + seen[pos0:pos0 + t], rtol=1e-6, atol=1e-6)


def test_pos_embed_table_caps_the_context():
    from pocketlm import _core

    b = ProgramBuilder(max_tokens=4)
    xa = x_program(b, rand(4, 8))
    pid, _ = b.weight(rand(10, 8))
    b.op("pos_embed", [xa, pid], [xa])
    prog = b.program(xa)
    _core.State(prog, 10)
    with pytest.raises(Exception, match="position embeddings"):
        _core.State(prog, 11)
