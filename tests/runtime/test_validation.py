"""Invalid programs and calls raise errors with a message, never crash."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from runtime_helpers import ProgramBuilder

from pocketlm import _core
from pocketlm.dtypes import DType
from pocketlm.errors import BundleError, ContextOverflowError, UnsupportedModelError


def linear(k=32, n=16, dtype=DType.F32, max_tokens=4):
    """embed -> matmul: returns (builder, x, w, y) for tests that break one piece."""
    b = ProgramBuilder(max_tokens)
    e, _ = b.weight(np.ones((10, k), np.float32))
    x = b.arena(k)
    b.op("embed", [e, b.tokens()], [x])
    w, _ = b.weight(np.ones((n, k), np.float32), dtype)
    y = b.arena(n)
    b.op("matmul", [x, w, -1], [y])
    return b, x, w, y


def test_valid_baseline():
    b, x, w, y = linear()
    prog = b.program(y)
    assert (prog.max_tokens, prog.n_threads, prog.arena_bytes) == (4, 1, b.arena_bytes)
    assert prog.kernel_name in _core.kernels.available()
    out = _core.State(prog, 8).run(np.array([1, 2], np.int32), 0)
    np.testing.assert_allclose(out, np.full((2, 16), 32.0))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda b, x, w, y: b.ops.append(("matmul", [x, w], [y], [], [])), ValueError, "op 2 .matmul."),
    (lambda b, x, w, y: b.ops.append(("conv2d", [x], [y], [], [])), UnsupportedModelError, "conv2d"),
    (lambda b, x, w, y: b.ops.append(("add", [x, 99], [y], [], [])), ValueError, "out of range"),
    (lambda b, x, w, y: b.ops.append(("add", [x, y], [y], [], [])), ValueError, "shape"),
    (lambda b, x, w, y: b.ops.append(("rms_norm", [x, w], [x], [], [1e-5])), ValueError,
     "f32|shape"),
    (lambda b, x, w, y: b.ops.append(("rms_norm", [x, x], [y], [], [1e-5])), ValueError, "op 2 .rms_norm."),
    (lambda b, x, w, y: b.ops.append(("rms_norm", [y, b.const(np.ones(16))], [y], [], [1e-5])),
     ValueError, "in place"),
    (lambda b, x, w, y: b.ops.append(("attention", [x, x, x], [y], [0, 2, 1, 16], [1.0])),
     ValueError, "layer"),
    (lambda b, x, w, y: b.ops.append(("take_last", [x], [y], [], [])), ValueError, "expected"),
    (lambda b, x, w, y: b.tensors[x].update(offset=10**9), ValueError, "arena"),
    (lambda b, x, w, y: b.tensors[x].update(offset=4), ValueError, "multiple of 64"),
    (lambda b, x, w, y: b.tensors[w].update(data=np.zeros(7, np.uint8)), ValueError, "bytes"),
    (lambda b, x, w, y: b.tensors[w].update(dtype=77), UnsupportedModelError, "dtype"),
    (lambda b, x, w, y: (b.tensors[w].pop("dtype"), b.tensors[w].pop("data")), ValueError, "name"),
    (lambda b, x, w, y: b.tensors.__setitem__(w, {"kind": "weight", "name": "wq", "rows": 16,
                                                 "cols": 32}), ValueError, "bundle"),
    (lambda b, x, w, y: b.tensors[y].update(kind="bogus"), ValueError, "kind"),
])
def test_invalid_programs(mutate, error, match):
    b, x, w, y = linear()
    mutate(b, x, w, y)
    with pytest.raises(error, match=match):
        b.program(y)


def test_quantized_k_must_be_multiple_of_32():
    b, x, w, y = linear(k=48, dtype=DType.I8)  # I8 rows may be any length, K may not
    with pytest.raises(UnsupportedModelError, match="K % 32"):
        b.program(y)


def test_bad_program_arguments():
    b, x, w, y = linear()
    with pytest.raises(ValueError):
        b.program(x, n_threads=0)
    with pytest.raises(ValueError):
        b.program(x, n_threads=65)
    with pytest.raises(ValueError, match="output"):
        b.program(w)
    with pytest.raises(UnsupportedModelError):
        b.program(y, kernels="no-such-variant")


def test_run_errors():
    b, x, w, y = linear(max_tokens=4)
    prog = b.program(y, n_threads=2)
    state = _core.State(prog, 6)
    assert state.max_context == 6
    state.run(np.arange(4, dtype=np.int32), 0)
    state.run(np.arange(2, dtype=np.int32), 4)  # fills the context exactly
    with pytest.raises(ContextOverflowError, match="max_context 6"):
        state.run(np.arange(1, dtype=np.int32), 6)
    with pytest.raises(ContextOverflowError):
        state.run(np.arange(3, dtype=np.int32), 4)
    with pytest.raises(ValueError, match="max_tokens"):
        state.run(np.arange(5, dtype=np.int32), 0)
    with pytest.raises(ValueError, match="n_tokens"):
        state.run(np.arange(0, dtype=np.int32), 0)
    with pytest.raises(ValueError, match="vocabulary"):
        state.run(np.array([1, 10], np.int32), 0)
    with pytest.raises(ValueError, match="pos"):
        state.run(np.array([1], np.int32), -1)
    with pytest.raises(ValueError, match="shape"):
        state.run(np.array([1], np.int32), 0, out=np.empty((2, 16), np.float32))
    with pytest.raises(ValueError):
        _core.State(prog, 0)


def test_rope_table_limits_max_context():
    b = ProgramBuilder(2)
    e, _ = b.weight(np.ones((4, 8), np.float32))
    x = b.arena(8)
    b.op("embed", [e, b.tokens()], [x])
    b.op("rope", [x, b.const(np.ones((16, 8)))], [x], iparams=[1, 8, 8])
    prog = b.program(x)
    _core.State(prog, 16)
    with pytest.raises(ContextOverflowError, match="rope"):
        _core.State(prog, 17)


def test_missing_bundle_tensor(tmp_path):
    from pocketlm.bundle import TensorSpec, read_bundle, write_bundle

    a = np.ones((16, 32), np.float32)
    path = tmp_path / "w.plm"
    write_bundle(path, {}, [TensorSpec("wq", DType.F32, a.shape, lambda: a)])
    bundle = read_bundle(path)
    b, x, w, y = linear()
    b.tensors[w] = {"kind": "weight", "name": "wk", "rows": 16, "cols": 32}
    with pytest.raises(BundleError, match="wk"):
        b.program(y, bundle=bundle.core)
    b.tensors[w] = {"kind": "weight", "name": "wq", "rows": 32, "cols": 16}
    with pytest.raises(ValueError, match="shape"):
        b.program(y, bundle=bundle)
    b.tensors[w] = {"kind": "weight", "name": "wq"}  # shape from the bundle
    prog = b.program(y, bundle=bundle)
    out = _core.State(prog, 4).run(np.array([0], np.int32), 0)
    np.testing.assert_allclose(out, np.full((1, 16), 32.0))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_state_memory_is_committed_lazily():
    def rss_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    b = ProgramBuilder(max_tokens=512)
    e, _ = b.weight(np.ones((4, 64), np.float32))
    x = b.arena(2048)  # 4 MiB of arena
    q = b.arena(64)
    b.op("embed", [e, b.tokens()], [q])
    b.op("attention", [q, q, q], [b.arena(64)], iparams=[0, 1, 1, 64], fparams=[0.125])
    del x
    prog = b.program(q, kv=(8, 1, 64))
    before = rss_bytes()
    state = _core.State(prog, 100_000)  # KV cache: 8 layers * 2 * 100k * 256 B = 410 MB
    state.run(np.zeros(1, np.int32), 0)
    assert rss_bytes() - before < 32 << 20


def test_state_keeps_program_alive():
    import gc

    b, x, w, y = linear()
    prog = b.program(y, n_threads=2)
    state = _core.State(prog, 8)
    del prog, b
    gc.collect()
    np.testing.assert_allclose(state.run(np.array([3], np.int32), 0), np.full((1, 16), 32.0))
