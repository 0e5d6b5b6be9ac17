"""Lowering: a planned Graph -> the tensor and op tables of the C++ executor.

Each op's inputs and params are laid out by its schema (``pocketlm.ir.schema``): params
by name from the node's attrs, in the schema's order, defaults filled in.
"""

from __future__ import annotations

from pocketlm.ir.graph import S, T, Graph
from pocketlm.ir.schema import SCHEMA
from pocketlm.planner import MemoryPlan

ROWS_T = -1  # the step's rows
ROWS_S = -2  # the step's sequences (one row each after take_last)


def lower(g: Graph, plan: MemoryPlan) -> tuple[list[dict], list[tuple], int]:
    """Returns (tensors, ops, output tensor id) for pocketlm._core.Program."""
    ids: dict[str, int] = {}
    tensors: list[dict] = []

    def tid(name: str) -> int:
        if not name:
            return -1
        if name in ids:
            return ids[name]
        if name == "tokens":
            desc = {"kind": "tokens", "rows": ROWS_T, "cols": 1}
        elif name in g.weights:
            shape = g.weights[name].shape
            rows = 1
            for d in shape[:-1]:
                rows *= d
            desc = {"kind": "weight", "name": name, "rows": rows, "cols": shape[-1]}
        elif name in g.consts:
            c = g.consts[name]
            desc = {"kind": "const", "rows": c.shape[0], "cols": c.shape[-1], "data": c}
        else:
            v = g.values[name]
            rows = ROWS_T if v.rows == T else ROWS_S if v.rows == S else int(v.rows)
            desc = {"kind": "arena", "rows": rows, "cols": v.cols,
                    "offset": plan.offsets[name]}
        ids[name] = len(tensors)
        tensors.append(desc)
        return ids[name]

    ops = []
    for n in g.nodes:
        schema = SCHEMA[n.op]
        ins = [tid(x) for x in n.inputs]
        if schema.max_inputs is not None:  # absent optional inputs travel as -1
            ins += [-1] * (schema.max_inputs - len(ins))
        outs = [tid(o) for o in n.outputs]
        ip, fp = schema.wire_params(n)
        ops.append((n.op, ins, outs, ip, fp))
    if len(g.outputs) != 1:
        raise ValueError("the executor takes exactly one graph output")
    return tensors, ops, ids[g.outputs[0]]
