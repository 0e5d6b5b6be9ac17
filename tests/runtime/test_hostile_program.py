"""Programs built by hand through _core with hostile sizes and parameters: the executor computes
every size in checked arithmetic and refuses what would overflow, with a message naming it, before
it reserves anything; a sliding window too large to matter is full attention, not a wrapped ring
(issue 10 item 1: a window near 2^63 made the KV capacity negative and writes ran past the cache)."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_helpers import ProgramBuilder

from pocketlm import _core

HUGE_WINDOW = 2**63 - 5


def attention_program(window: int | None, max_tokens: int = 4, hd: int = 8, vocab: int = 16):
    """embed -> attention (one head, q = k = v = the embedding rows); returns (program, table)."""
    b = ProgramBuilder(max_tokens)
    table = np.random.default_rng(0).standard_normal((vocab, hd)).astype(np.float32)
    e, _ = b.weight(table)
    x = b.arena(hd)
    b.op("embed", [e, b.tokens()], [x])
    o = b.arena(hd)
    iparams, fparams = [0, 1, 1, hd], [0.5]
    if window is not None:
        iparams, fparams = iparams + [window], fparams + [0.0]
    b.op("attention", [x, x, x], [o], iparams, fparams)
    return b.program(o, kv=(1, 1, hd)), table


def causal_attention(rows: np.ndarray, scale: float, window: int = 0) -> np.ndarray:
    """float64 reference: row t attends to rows [lo, t] (lo = t - window + 1 with a window)."""
    x = rows.astype(np.float64)
    out = np.empty_like(x)
    for t in range(len(x)):
        lo = max(0, t - window + 1) if window else 0
        s = x[lo : t + 1] @ x[t] * scale
        p = np.exp(s - s.max())
        out[t] = p @ x[lo : t + 1] / p.sum()
    return out


def run_chunks(program, tokens: np.ndarray, max_context: int, chunk: int) -> np.ndarray:
    state = _core.State(program, max_context, "f32")
    outs = [state.run(tokens[p : p + chunk], p) for p in range(0, len(tokens), chunk)]
    return np.concatenate(outs), state


@pytest.mark.parametrize("window", [HUGE_WINDOW, 2**31, 64])
def test_window_at_or_past_the_context_is_full_attention(window):
    program, table = attention_program(window)
    tokens = np.random.default_rng(1).integers(0, 16, 40).astype(np.int32)
    out, state = run_chunks(program, tokens, max_context=48, chunk=4)
    assert state.kv_capacities == [48]  # not window + max_tokens - 1, wrapped or not
    np.testing.assert_allclose(out, causal_attention(table[tokens], 0.5), rtol=1e-5, atol=1e-5)


def test_window_below_the_context_still_slides():
    program, table = attention_program(5)
    tokens = np.random.default_rng(2).integers(0, 16, 30).astype(np.int32)
    out, state = run_chunks(program, tokens, max_context=48, chunk=4)
    assert state.kv_capacities == [5 + 4 - 1]
    np.testing.assert_allclose(out, causal_attention(table[tokens], 0.5, window=5), rtol=1e-5, atol=1e-5)


def _arena_program(tensor: dict, arena_bytes: int):
    b = ProgramBuilder(1)
    b.tensors.append(tensor)
    return _core.Program(None, b.tensors, [], arena_bytes, 1, (0, 0, 0), 0, 1)


@pytest.mark.parametrize("tensor, arena_bytes, match", [
    # rows x cols x 4 past 2^64 (it wrapped to a small size before)
    ({"kind": "arena", "rows": 2**31 - 1, "cols": 2**31 - 1, "offset": 0}, 2**62, "overflows 64 bits"),
    # an offset near 2^63: offset + size wrapped negative and passed the arena bound
    ({"kind": "arena", "rows": 1, "cols": 16, "offset": 2**63 - 64}, 2**62, "overflows 64 bits"),
    ({"kind": "arena", "rows": 1, "cols": 2**31, "offset": 0}, 2**40, "bad shape"),
    # an inline weight whose byte count passes 2^64
    ({"kind": "weight", "rows": 2**31 - 1, "cols": 2**31 - 1, "dtype": 0, "data": b""}, 0, "overflows 64 bits"),
])
def test_tensor_sizes_that_overflow_are_refused(tensor, arena_bytes, match):
    with pytest.raises(ValueError, match=match):
        _arena_program(tensor, arena_bytes)


def test_kv_config_too_large_is_refused():
    b = ProgramBuilder(1)
    x = b.arena(8)
    for kv in [(1 << 20, 1, 8), (2, 1 << 16, 1 << 16)]:
        with pytest.raises(ValueError, match="KV config too large"):
            _core.Program(None, b.tensors, [], b.arena_bytes, 1, kv, x, 1)


def _heads_program(op: str, iparams: list[int], fparams: list[float], kv=(1, 1, 8)):
    b = ProgramBuilder(2)
    x = b.arena(8)
    y = b.arena(8)
    inputs = [x, x, x] if op == "attention" else [x, b.const(np.ones((4, 2)))] if op == "rope" else \
        [x, b.const(np.ones(4))]
    b.op(op, inputs, [y], iparams, fparams)
    return _core.Program(None, b.tensors, b.ops, b.arena_bytes, 2, kv, y, 1)


@pytest.mark.parametrize("op, iparams, fparams, match", [
    # n_heads x head_dim wrapping to the column count
    ("rope", [2**62, 4, 2], [], "n_heads"),
    ("head_rms_norm", [2**62 + 1, 2**2], [1e-5], "n_heads"),
    ("attention", [0, 2**61, 1, 8], [1.0], "n_heads"),
    ("attention", [0, 8, 1, 8, -1], [1.0, 0.0], "window must be >= 0"),
])
def test_head_parameters_that_overflow_are_refused(op, iparams, fparams, match):
    with pytest.raises(ValueError, match=match):
        _heads_program(op, iparams, fparams)


def test_state_sizes_that_overflow_are_refused():
    # The score scratch is n_threads x (n_heads / n_kv_heads) x max_context floats: with 2^30 query
    # heads of one value and max_context 2^30, 2^68 bytes. The arena is only reserved by State.
    hq = 1 << 30
    b = ProgramBuilder(1)
    q, k, v, o = b.arena(hq), b.arena(1), b.arena(1), b.arena(hq)
    b.op("attention", [q, k, v], [o], [0, hq, 1, 1], [1.0])
    program = _core.Program(None, b.tensors, b.ops, b.arena_bytes, 1, (1, 1, 1), o, 64)
    with pytest.raises(ValueError, match="attention score bytes.*overflows 64 bits"):
        _core.State(program, 1 << 30)
    # KV: 65536 layers x 2 x (2^31 - 1) values x 4 bytes x 2^31 - 1 positions
    b = ProgramBuilder(1)
    x = b.arena(8)
    program = _core.Program(None, b.tensors, [], b.arena_bytes, 1, (1 << 16, 1, 2**31 - 1), x, 1)
    with pytest.raises(ValueError, match="KV .*overflows 64 bits"):
        _core.State(program, 2**31 - 1, "f32")


def test_a_reservation_the_os_refuses_says_what_was_too_large():
    # 2 x (2^31 - 1) values x 4 bytes x 2^20 positions = 2^54 bytes: no overflow, but past the
    # 2^47-byte address space of x86-64 and arm64 user processes, so the reservation itself fails.
    b = ProgramBuilder(1)
    x = b.arena(8)
    program = _core.Program(None, b.tensors, [], b.arena_bytes, 1, (1, 1, 2**31 - 1), x, 1)
    with pytest.raises(MemoryError, match=r"max_context 1048576: KV cache 18014398501093376 bytes \(f32\)"):
        _core.State(program, 1 << 20, "f32")
