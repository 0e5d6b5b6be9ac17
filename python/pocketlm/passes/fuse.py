"""Fusion passes: fewer, bigger ops for the executor.

- fuse_gate_up_swiglu: silu(x Wg) * (x Wu) as one op (and gelu(x Wg) * (x Wu), GeGLU, as
  matmul_geglu); the gate/up activations never reach memory at full width and x is
  quantized once.
- fuse_parallel_matmuls: matmuls reading the same activation (Q, K, V) become one
  matmul_multi: one activation quantization, one parallel region over all rows.
- fuse_add_rms_norm: a residual add followed by the next RMSNorm of its result.
"""

from __future__ import annotations

from pocketlm.ir.graph import Graph, Node


def _uses(g: Graph) -> dict[str, list[int]]:
    u = g.consumers()
    for o in g.outputs:
        u.setdefault(o, []).append(len(g.nodes))
    return u


def fuse_gate_up_swiglu(g: Graph) -> Graph:
    prod, uses = g.producers(), _uses(g)
    drop: set[int] = set()
    replace: dict[int, Node] = {}
    fused = {"swiglu": "matmul_swiglu", "geglu": "matmul_geglu"}
    for i, n in enumerate(g.nodes):
        if n.op not in fused:
            continue
        gi, ui = prod.get(n.inputs[0]), prod.get(n.inputs[1])
        if gi is None or ui is None:
            continue
        gn, un = g.nodes[gi], g.nodes[ui]
        if not (gn.op == un.op == "matmul" and len(gn.inputs) == len(un.inputs) == 2
                and gn.inputs[0] == un.inputs[0]):
            continue
        if len(uses[n.inputs[0]]) != 1 or len(uses[n.inputs[1]]) != 1:
            continue
        drop.update((gi, ui))
        replace[i] = Node(fused[n.op], (gn.inputs[0], gn.inputs[1], un.inputs[1]), n.outputs)
    return _rebuild(g, drop, replace)


def fuse_parallel_matmuls(g: Graph) -> Graph:
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(g.nodes):
        if n.op == "matmul":
            groups.setdefault(n.inputs[0], []).append(i)
    drop: set[int] = set()
    replace: dict[int, Node] = {}
    for x, idx in groups.items():
        if len(idx) < 2:
            continue
        inputs: list[str] = [x]
        outputs: list[str] = []
        for i in idx:
            n = g.nodes[i]
            inputs += [n.inputs[1], n.inputs[2] if len(n.inputs) > 2 else ""]
            outputs += list(n.outputs)
        replace[idx[0]] = Node("matmul_multi", tuple(inputs), tuple(outputs))
        drop.update(idx[1:])
    return _rebuild(g, drop, replace)


def fuse_add_rms_norm(g: Graph) -> Graph:
    drop: set[int] = set()
    replace: dict[int, Node] = {}
    for i, n in enumerate(g.nodes[:-1]):
        nxt = g.nodes[i + 1]
        if n.op == "add" and nxt.op == "rms_norm" and nxt.inputs[0] == n.outputs[0]:
            replace[i] = Node("add_rms_norm", (n.inputs[0], n.inputs[1], nxt.inputs[1]),
                              (n.outputs[0], nxt.outputs[0]), nxt.attrs)
            drop.add(i + 1)
    return _rebuild(g, drop, replace)


def _rebuild(g: Graph, drop: set[int], replace: dict[int, Node]) -> Graph:
    out = g.copy()
    out.nodes = [replace.get(i, n) for i, n in enumerate(g.nodes) if i not in drop]
    used = set(out.outputs) | {x for n in out.nodes for x in n.inputs + n.outputs}
    out.values = {k: v for k, v in g.values.items() if k in used}
    return out
