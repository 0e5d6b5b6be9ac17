"""A small graph IR: immutable, printable nodes over named values.

Values are 2-D activations ``(rows, cols)`` whose ``rows`` is an int, ``"T"`` (the
number of tokens in the current step) or ``"S"`` (the number of sequences in it: a
batched step runs the rows of several sequences, and ``take_last`` keeps the last row
of each). Weights are named bundle
tensors; constants are numpy arrays computed at compile time (e.g. RoPE tables).

The op set is closed (``OPS``): the executor's ops come from its schema
(``pocketlm.ir.schema``, ``csrc/runtime/ops.def``), plus front-end ops folded away
before lowering. Model files only emit ops through ``pocketlm.models.layers``; passes in
``pocketlm.passes`` rewrite graphs into new graphs; ``pocketlm.planner`` assigns
arena offsets; ``pocketlm.ir.lower`` turns the result into the executor's tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pocketlm.ir.schema import SCHEMA

T = "T"  # symbolic row count: tokens in the current step
S = "S"  # symbolic row count: sequences in the current step (one row each after take_last)

# op -> (min inputs, max inputs or None, n outputs or None for variadic)
FRONTEND_OPS: dict[str, tuple[int, int | None, int | None]] = {
    # folded away before lowering
    "rope_table": (0, 1, 1),  # optional input: per-frequency divisors (Llama 3 GGUF)
}
OPS: dict[str, tuple[int, int | None, int | None]] = {
    **FRONTEND_OPS,
    # executor ops: csrc/runtime/ops.def
    **{name: (s.min_inputs, s.max_inputs, s.n_outputs) for name, s in SCHEMA.items()},
}

# Ops whose output 0 may share memory with an input that dies at that op: input indices.
INPLACE_OK: dict[str, tuple[int, ...]] = {
    name: tuple(i for o, i in s.inplace if o == 0) for name, s in SCHEMA.items() if s.inplace}


@dataclass(frozen=True)
class Value:
    name: str
    rows: int | str
    cols: int


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]   # value, weight or const names; "" = absent optional input
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def with_(self, **changes: Any) -> "Node":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class WeightRef:
    name: str
    shape: tuple[int, ...]  # as stored: (out, in) for linear weights, (dim,) for norms


@dataclass
class Graph:
    values: dict[str, Value] = field(default_factory=dict)
    weights: dict[str, WeightRef] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    inputs: tuple[str, ...] = ("tokens",)
    outputs: tuple[str, ...] = ()
    _counter: int = 0

    # ---- building -------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}.{self._counter}"

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        prev = self.weights.get(name)
        if prev is not None and prev.shape != tuple(shape):
            raise ValueError(f"weight {name} used with shapes {prev.shape} and {shape}")
        self.weights[name] = WeightRef(name, tuple(int(s) for s in shape))
        return name

    def emit(self, op: str, inputs: list[str] | tuple[str, ...], out_shapes: list[tuple], hint: str,
             **attrs: Any) -> list[str]:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        outs = []
        for rows, cols in out_shapes:
            name = self.fresh(hint)
            self.values[name] = Value(name, rows, int(cols))
            outs.append(name)
        node = Node(op, tuple(inputs), tuple(outs), tuple(sorted(attrs.items())))
        check_node(self, node)
        self.nodes.append(node)
        return outs

    def shape(self, name: str) -> tuple[int | str, int]:
        if name in self.values:
            v = self.values[name]
            return (v.rows, v.cols)
        if name in self.weights:
            s = self.weights[name].shape
            return (s[0] if len(s) > 1 else 1, s[-1])
        if name in self.consts:
            c = self.consts[name]
            return (c.shape[0], c.shape[-1])
        if name == "tokens":
            return (T, 1)
        raise KeyError(name)

    # ---- utilities ------------------------------------------------------
    def copy(self) -> "Graph":
        return Graph(dict(self.values), dict(self.weights), dict(self.consts), list(self.nodes),
                     self.inputs, self.outputs, self._counter)

    def producers(self) -> dict[str, int]:
        return {o: i for i, n in enumerate(self.nodes) for o in n.outputs}

    def consumers(self) -> dict[str, list[int]]:
        uses: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for x in n.inputs:
                if x:
                    uses.setdefault(x, []).append(i)
        return uses

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def dump(self, max_nodes: int | None = None) -> str:
        lines = []
        for n in self.nodes[:max_nodes]:
            outs = ", ".join(f"%{o}{list(self.shape(o))}" for o in n.outputs)
            ins = ", ".join(_fmt_input(self, x) for x in n.inputs)
            attrs = " ".join(f"{k}={_short(v)}" for k, v in n.attrs)
            lines.append(f"{outs} = {n.op}({ins}){'  ' + attrs if attrs else ''}")
        if max_nodes is not None and len(self.nodes) > max_nodes:
            lines.append(f"... ({len(self.nodes) - max_nodes} more nodes)")
        lines.append("outputs: " + ", ".join(f"%{o}" for o in self.outputs))
        return "\n".join(lines)


def _fmt_input(g: Graph, x: str) -> str:
    if not x:
        return "_"
    if x in g.weights:
        return "@" + x
    if x in g.consts:
        return "$" + x
    return "%" + x


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)) and len(v) > 4:
        return f"[{len(v)} items]"
    return str(v)


def check_node(g: Graph, n: Node) -> None:
    lo, hi, n_out = OPS[n.op]
    if len(n.inputs) < lo or (hi is not None and len(n.inputs) > hi):
        raise ValueError(f"{n.op}: expected {lo}..{hi} inputs, got {len(n.inputs)}")
    if n_out is not None and len(n.outputs) != n_out:
        raise ValueError(f"{n.op}: expected {n_out} outputs, got {len(n.outputs)}")
    for x in n.inputs:
        if x and x != "tokens" and x not in g.values and x not in g.weights and x not in g.consts:
            raise ValueError(f"{n.op}: unknown input {x!r}")


def validate(g: Graph) -> None:
    """Every input is defined before use and every output is produced once."""
    defined = set(g.weights) | set(g.consts) | set(g.inputs)
    for i, n in enumerate(g.nodes):
        check_node(g, n)
        for x in n.inputs:
            if x and x not in defined:
                raise ValueError(f"node {i} ({n.op}) reads {x!r} before it is defined")
        for o in n.outputs:
            if o in defined:
                raise ValueError(f"node {i} ({n.op}) redefines {o!r}")
            defined.add(o)
    for o in g.outputs:
        if o not in defined:
            raise ValueError(f"graph output {o!r} is never produced")
