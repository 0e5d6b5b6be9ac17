"""A 2-layer mini transformer as one executor program vs numpy, over chunked calls."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from runtime_helpers import (
    ProgramBuilder,
    attention,
    matmul,
    max_rel_err,
    rms_norm,
    rope,
    rope_table,
    silu,
)

from pocketlm import _core
from pocketlm.dtypes import DType

EPS = 1e-5


@dataclasses.dataclass
class Cfg:
    vocab: int = 37
    dim: int = 24
    n_heads: int = 3
    n_kv_heads: int = 1
    head_dim: int = 8
    ffn: int = 40
    n_layers: int = 2
    max_pos: int = 64


def random_weights(cfg: Cfg, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    w = {"embed": r(cfg.vocab, cfg.dim, scale=1.0), "norm": 1 + r(cfg.dim, scale=0.1),
         "out": r(cfg.vocab, cfg.dim)}
    for i in range(cfg.n_layers):
        w[f"{i}.ln1"] = 1 + r(cfg.dim, scale=0.1)  # (dim,)
        w[f"{i}.wq"], w[f"{i}.bq"] = r(qd, cfg.dim), r(qd)  # (n_heads*head_dim, dim)
        w[f"{i}.wk"], w[f"{i}.bk"] = r(kvd, cfg.dim), r(kvd)  # (n_kv_heads*head_dim, dim)
        w[f"{i}.wv"], w[f"{i}.bv"] = r(kvd, cfg.dim), r(kvd)
        w[f"{i}.wo"] = r(cfg.dim, qd)  # (dim, n_heads*head_dim)
        w[f"{i}.ln2"] = 1 + r(cfg.dim, scale=0.1)
        w[f"{i}.wg"], w[f"{i}.wu"] = r(cfg.ffn, cfg.dim), r(cfg.ffn, cfg.dim)  # (ffn, dim)
        w[f"{i}.wd"] = r(cfg.dim, cfg.ffn)  # (dim, ffn)
    return w


MATRICES = ("embed", "out", "wq", "wk", "wv", "wo", "wg", "wu", "wd")


def build(cfg: Cfg, w: dict, max_tokens: int, dtype=DType.F32, last_only=False,
          n_threads=1, bundle=None, kernels=""):
    """Returns (program, the weights as the kernels see them). With a bundle, matrices are
    referenced by name instead of inline."""
    b = ProgramBuilder(max_tokens)
    seen = dict(w)

    def mat(name):
        if name.split(".")[-1] not in MATRICES:
            return b.const(w[name])
        if bundle is not None:
            return b._add({"kind": "weight", "name": name, "rows": w[name].shape[0],
                           "cols": w[name].shape[1]})
        tid, seen[name] = b.weight(w[name], dtype)
        return tid

    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    table = b.const(rope_table(cfg.max_pos, cfg.head_dim))
    x, h = b.arena(cfg.dim), b.arena(cfg.dim)
    q, k, v, o = b.arena(qd), b.arena(kvd), b.arena(kvd), b.arena(qd)
    f = b.arena(cfg.ffn)
    b.op("embed", [mat("embed"), b.tokens()], [x])
    for i in range(cfg.n_layers):
        b.op("rms_norm", [x, mat(f"{i}.ln1")], [h], fparams=[EPS])
        b.op("matmul_multi", [h, mat(f"{i}.wq"), mat(f"{i}.bq"), mat(f"{i}.wk"), mat(f"{i}.bk"),
                              mat(f"{i}.wv"), mat(f"{i}.bv")], [q, k, v])
        b.op("rope", [q, table], [q], iparams=[cfg.n_heads, cfg.head_dim, cfg.head_dim])
        b.op("rope", [k, table], [k], iparams=[cfg.n_kv_heads, cfg.head_dim, cfg.head_dim])
        b.op("attention", [q, k, v], [o], iparams=[i, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim],
             fparams=[cfg.head_dim ** -0.5])
        b.op("matmul", [o, mat(f"{i}.wo"), -1], [h])
        b.op("add_rms_norm", [x, h, mat(f"{i}.ln2")], [x, h], fparams=[EPS])
        b.op("matmul_swiglu", [h, mat(f"{i}.wg"), mat(f"{i}.wu")], [f])
        b.op("matmul", [f, mat(f"{i}.wd"), -1], [h])
        b.op("add", [x, h], [x])
    b.op("rms_norm", [x, mat("norm")], [h], fparams=[EPS])
    if last_only:
        last = b.arena(cfg.dim, rows=1)
        b.op("take_last", [h], [last])
        h = last
    logits = b.arena(cfg.vocab, rows=1 if last_only else -1)
    b.op("matmul", [h, mat("out"), -1], [logits])
    prog = b.program(logits, kv=(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim),
                     n_threads=n_threads, bundle=bundle, kernels=kernels)
    return prog, seen


def reference(cfg: Cfg, w: dict, tokens: np.ndarray, dtype=DType.F32) -> np.ndarray:
    """Logits for every position of one uncached pass over `tokens`; with a quantized dtype,
    activations are quantized before each matmul as the kernels do."""

    def mm(x, name):
        return matmul(x, w[name], dtype)

    table = rope_table(cfg.max_pos, cfg.head_dim)
    x = w["embed"][tokens]
    for i in range(cfg.n_layers):
        h = rms_norm(x, w[f"{i}.ln1"], EPS)
        q = mm(h, f"{i}.wq") + w[f"{i}.bq"]
        k = mm(h, f"{i}.wk") + w[f"{i}.bk"]
        v = mm(h, f"{i}.wv") + w[f"{i}.bv"]
        q = rope(q, table, 0, cfg.n_heads, cfg.head_dim, cfg.head_dim)
        k = rope(k, table, 0, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)
        o = attention(q, k, v, 0, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim ** -0.5)
        x = x + mm(o, f"{i}.wo")
        h = rms_norm(x, w[f"{i}.ln2"], EPS)
        x = x + mm(silu(mm(h, f"{i}.wg")) * mm(h, f"{i}.wu"), f"{i}.wd")
    return mm(rms_norm(x, w["norm"], EPS), "out")


def run_chunks(prog, tokens, chunks, max_context=32):
    state = _core.State(prog, max_context)
    outs, pos = [], 0
    for n in chunks:
        outs.append(state.run(tokens[pos:pos + n], pos))
        pos += n
    return outs


TOKENS = np.array([5, 17, 3, 36, 0, 9, 9, 21, 2], np.int32)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_chunked_equals_whole_and_numpy(n_threads):
    cfg = Cfg()
    w = random_weights(cfg)
    prog, seen = build(cfg, w, max_tokens=9, n_threads=n_threads)
    ref = reference(cfg, seen, TOKENS)
    whole = run_chunks(prog, TOKENS, [9])[0]
    chunked = np.concatenate(run_chunks(prog, TOKENS, [5, 3, 1]))
    np.testing.assert_allclose(whole, ref, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)


def test_last_only_decode_and_threads_agree():
    cfg = Cfg()
    w = random_weights(cfg, seed=1)
    outs = {}
    for n_threads in (1, 2):
        prog, seen = build(cfg, w, max_tokens=5, last_only=True, n_threads=n_threads)
        outs[n_threads] = run_chunks(prog, TOKENS, [5, 3, 1])
    ref = reference(cfg, seen, TOKENS)
    for got, pos in zip(outs[1], (4, 7, 8)):
        assert got.shape == (1, cfg.vocab)
        np.testing.assert_allclose(got[0], ref[pos], rtol=2e-4, atol=2e-4)
    for a, b in zip(outs[1], outs[2]):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [DType.Q8_0, DType.Q4_0])
def test_quantized_model(dtype):
    cfg = Cfg(vocab=40, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96)
    w = random_weights(cfg, seed=2)
    prog, seen = build(cfg, w, max_tokens=9, dtype=dtype, n_threads=2)
    ref = reference(cfg, seen, TOKENS, dtype)
    whole = run_chunks(prog, TOKENS, [9])[0]
    chunked = np.concatenate(run_chunks(prog, TOKENS, [5, 3, 1]))
    assert max_rel_err(whole, ref) < 1e-4
    # Chunks of 3 tokens and of 9 take different matmul kernels (per-row tiles vs the
    # prefill GEMM): another float summation order, and an activation code may then round
    # the other way. Both stay as close to the reference as the whole prefill.
    assert max_rel_err(chunked, ref) < 1e-4


def test_bundle_weights(tmp_path):
    from pocketlm.bundle import TensorSpec, read_bundle, write_bundle

    cfg = Cfg(vocab=40, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96)
    w = random_weights(cfg, seed=3)
    specs = [TensorSpec(name, DType.F32, arr.shape, (lambda a=arr: a)) for name, arr in w.items()
             if name.split(".")[-1] in MATRICES]
    path = tmp_path / "mini.plm"
    write_bundle(path, {"architecture": "test"}, specs)
    bundle = read_bundle(path)
    prog, _ = build(cfg, w, max_tokens=9, bundle=bundle.core)
    del bundle  # the Program keeps the mapping alive
    got = run_chunks(prog, TOKENS, [9])[0]
    np.testing.assert_allclose(got, reference(cfg, w, TOKENS), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("variant", _core.kernels.available())
def test_kernel_variants_agree(variant):
    cfg = Cfg(vocab=40, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn=96)
    w = random_weights(cfg, seed=4)
    prog, seen = build(cfg, w, max_tokens=9, dtype=DType.Q4_1, n_threads=2, kernels=variant)
    assert prog.kernel_name == variant
    got = np.concatenate(run_chunks(prog, TOKENS, [5, 3, 1]))
    assert max_rel_err(got, reference(cfg, seen, TOKENS, DType.Q4_1)) < 1e-4


def test_pool_wakes_after_idle_and_states_are_independent():
    """Workers fall asleep between calls (after ~200 us) and must wake for the next one;
    two States of one Program keep separate caches."""
    import time

    cfg = Cfg()
    w = random_weights(cfg, seed=5)
    prog, seen = build(cfg, w, max_tokens=9, last_only=True, n_threads=2)
    ref = reference(cfg, seen, TOKENS)
    s1, s2 = _core.State(prog, 16), _core.State(prog, 16)
    for pos, tok in enumerate(TOKENS):
        a = s1.run(TOKENS[pos:pos + 1], pos)
        if pos % 3 == 0:
            time.sleep(0.002)
        bb = s2.run(TOKENS[pos:pos + 1], pos)
        np.testing.assert_allclose(a[0], ref[pos], rtol=2e-4, atol=2e-4)
        np.testing.assert_array_equal(a, bb)
