"""pocketlm._core.kernels served by another process: tests/kernels/kernel_server.cpp built for
another CPU and run under an emulator (scripts/test-arm.sh: qemu-aarch64). Same functions,
arguments and results as the extension's module, so the kernel tests run unchanged against the
aarch64 kernels. Chosen by kernelutil when $PLM_TEST_KERNELS holds the server's command line."""

from __future__ import annotations

import shlex
import struct
import subprocess

import numpy as np

_S, _I, _F, _A = "S", "I", "F", "A"
_CODES = {np.dtype(np.float32): b"f", np.dtype(np.uint8): b"b", np.dtype(np.int8): b"c", np.dtype(np.uint16): b"h"}
_DTYPES = {v: k for k, v in _CODES.items()}

# op -> [(name, kind, numpy dtype for arrays, default)]; as csrc/bindings/bind_kernels.cpp.
_VARIANT = ("variant", _S, None)
_SIGNATURES = {
    "available": [],
    "best": [],
    "matmul": [_VARIANT, ("dtype", _I, None), ("weight", _A, np.uint8), ("rows", _I, None), ("cols", _I, None),
               ("x", _A, np.float32), ("n0", _I, None, 0), ("n1", _I, None, -1)],
    "quantize_act": [_VARIANT, ("x", _A, np.float32)],
    "quantize_act2": [_VARIANT, ("x", _A, np.float32)],
    "dequant_row": [("dtype", _I, None), ("raw", _A, np.uint8), ("cols", _I, None), ("variant", _S, None, "ref")],
    "rms_norm": [_VARIANT, ("x", _A, np.float32), ("w", _A, np.float32), ("eps", _F, None)],
    "max": [_VARIANT, ("s", _A, np.float32)],
    "to_f16": [_VARIANT, ("x", _A, np.float32)],
    "scores_q8_0": [_VARIANT, ("rows", _A, np.uint8), ("q", _A, np.float32), ("p0", _I, None), ("p1", _I, None)],
    "weighted_sum_q8_0": [_VARIANT, ("w", _A, np.float32), ("rows", _A, np.uint8), ("out", _A, np.float32)],
    "weighted_sum_f16": [_VARIANT, ("w", _A, np.float32), ("rows", _A, np.uint16), ("out", _A, np.float32)],
    "weighted_sum": [_VARIANT, ("w", _A, np.float32), ("rows", _A, np.float32), ("out", _A, np.float32)],
    "exp_sum": [_VARIANT, ("s", _A, np.float32), ("m", _F, None), ("scale", _F, None)],
    "silu_mul": [_VARIANT, ("g", _A, np.float32), ("u", _A, np.float32)],
    "add": [_VARIANT, ("a", _A, np.float32), ("b", _A, np.float32)],
    "dot": [_VARIANT, ("a", _A, np.float32), ("b", _A, np.float32)],
    "axpy": [_VARIANT, ("a", _F, None), ("x", _A, np.float32), ("y", _A, np.float32)],
    "scale": [_VARIANT, ("a", _F, None), ("y", _A, np.float32)],
}
_SIGNATURES["matmul2"] = _SIGNATURES["matmul"]
_TUPLES = {"quantize_act", "quantize_act2", "exp_sum"}  # several results, returned as a tuple
# Not kernel variants (the sampler's top-k helpers): the local extension's.
_LOCAL = {"top_k_ids", "sample_top_k"}


class RemoteKernels:
    def __init__(self, command: str, env: dict | None = None):
        self.command = command
        self._proc = subprocess.Popen(shlex.split(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)

    def __getattr__(self, op: str):
        if op in _LOCAL:
            from pocketlm import _core

            return getattr(_core.kernels, op)
        if op not in _SIGNATURES:
            raise AttributeError(op)
        return lambda *args, **kwargs: self._call(op, args, kwargs)

    def _call(self, op: str, args: tuple, kwargs: dict):
        params = _SIGNATURES[op]
        if len(args) > len(params):
            raise TypeError(f"{op}() takes {len(params)} arguments, got {len(args)}")
        out = [struct.pack("<I", len(op)), op.encode(), struct.pack("<I", len(params))]
        for i, (name, kind, dtype, *default) in enumerate(params):
            if i < len(args):
                v = args[i]
            elif name in kwargs:
                v = kwargs.pop(name)
            elif default:
                v = default[0]
            else:
                raise TypeError(f"{op}() missing argument {name!r}")
            out.append(self._encode(kind, dtype, v))
        if kwargs:
            raise TypeError(f"{op}() got unexpected arguments {sorted(kwargs)}")
        self._proc.stdin.write(b"".join(out))
        self._proc.stdin.flush()
        return self._reply(op)

    @staticmethod
    def _encode(kind: str, dtype, v) -> bytes:
        if kind == _S:
            b = str(v).encode()
            return b"S" + struct.pack("<I", len(b)) + b
        if kind == _I:
            return b"I" + struct.pack("<q", int(v))
        if kind == _F:
            return b"F" + struct.pack("<d", float(v))
        a = np.ascontiguousarray(v, dtype=dtype)  # as nanobind converts an argument
        return (b"A" + _CODES[a.dtype] + struct.pack("<B", a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
                + a.tobytes())

    def _read(self, n: int) -> bytes:
        b = self._proc.stdout.read(n)
        if len(b) != n:
            raise RuntimeError(f"the kernel server ({self.command}) stopped (exit status {self._proc.poll()})")
        return b

    def _reply(self, op: str):
        status = self._read(1)[0]
        if status:
            (n,) = struct.unpack("<I", self._read(4))
            raise ValueError(self._read(n).decode())
        (count,) = struct.unpack("<I", self._read(4))
        results = [self._result() for _ in range(count)]
        return tuple(results) if op in _TUPLES else results[0]

    def _result(self):
        tag = self._read(1)
        if tag == b"S":
            (n,) = struct.unpack("<I", self._read(4))
            return self._read(n).decode()
        if tag == b"L":
            (count,) = struct.unpack("<I", self._read(4))
            items = []
            for _ in range(count):
                (n,) = struct.unpack("<I", self._read(4))
                items.append(self._read(n).decode())
            return items
        if tag == b"F":
            return struct.unpack("<d", self._read(8))[0]
        code, ndim = self._read(1), self._read(1)[0]
        shape = struct.unpack(f"<{ndim}q", self._read(8 * ndim))
        dtype = _DTYPES[code]
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._read(count * dtype.itemsize), dtype=dtype).reshape(shape).copy()
