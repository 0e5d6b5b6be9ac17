"""The op schema (csrc/runtime/ops.def) as Python reads it, against what the graph IR and the
lowering derive from it and what the executor accepts."""

from __future__ import annotations

import pytest

from pocketlm import _core
from pocketlm.ir.graph import INPLACE_OK, OPS, Graph
from pocketlm.ir.lower import lower
from pocketlm.ir.schema import SCHEMA, parse
from pocketlm.planner import plan_memory


def test_attention_params_are_named_with_defaults():
    s = SCHEMA["attention"]
    assert [p.name for p in s.ints] == ["layer", "n_heads", "n_kv_heads", "head_dim", "window", "causal"]
    assert [p.default for p in s.ints] == [None, None, None, None, 0, 1]
    assert [(p.name, p.default) for p in s.floats] == [("scale", None), ("softcap", 0.0)]


def test_graph_tables_derive_from_the_schema():
    assert all(OPS[name] == (s.min_inputs, s.max_inputs, s.n_outputs) for name, s in SCHEMA.items())
    assert INPLACE_OK["add"] == (0, 1) and "matmul" not in INPLACE_OK
    assert SCHEMA["matmul"].row_wise and not SCHEMA["attention"].row_wise


def test_every_schema_op_is_an_executor_op():
    # An op with no inputs fails on its arity, not as an unknown op: C++ has every op Python has.
    for name in SCHEMA:
        with pytest.raises(ValueError, match=rf"op 0 \({name}\): expects"):
            _core.Program(None, [{"kind": "tokens"}], [(name, [], [], [], [])], 0, 1, (0, 0, 0), 0, 1)


def test_lowering_lays_out_params_by_name_and_pads_optional_inputs():
    g = Graph()
    q = g.emit("embed", [g.weight("e", (8, 16)), "tokens"], [("T", 16)], "x")[0]
    y = g.emit("matmul", [q, g.weight("w", (16, 16))], [("T", 16)], "y")[0]
    o = g.emit("attention", [y, y, y], [("T", 16)], "o", head_dim=16, n_kv_heads=1, n_heads=1, layer=0,
               scale=0.25)[0]
    g.outputs = (o,)
    _, ops, _ = lower(g, plan_memory(g, 4))
    assert ops[1][1][2] == -1  # matmul's absent bias
    assert ops[2][3:] == ([0, 1, 1, 16, 0, 1], [0.25, 0.0])


def test_parser_refuses_a_required_param_after_an_optional_one():
    with pytest.raises(ValueError, match="required"):
        parse("PLM_OP(x, 1, 1, 1, 0)\nPLM_INT_OR(x, a, 0)\nPLM_INT(x, b)\n")
    with pytest.raises(ValueError, match="before its PLM_OP"):
        parse("PLM_INT(y, a)\n")
    assert parse("#ifndef PLM_OP\n#define PLM_OP(name)\n#endif\nPLM_OP(z, 0, -1, -1, 1)  // c\n")["z"].max_inputs is None
