"""Static memory plan: no larger than the naive sum, no overlap of tensors alive together."""

import dataclasses

import pytest
from pocketlm import models
from pocketlm.ir.graph import Graph
from pocketlm.passes import run_pipeline
from pocketlm.planner import ALIGN, check_plan, plan_memory, value_bytes


def compiled(arch="llama", fused=True, **over):
    hf = dict(model_type=arch, vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=True)
    hf.update(over)
    mod = models.get(arch)
    g = Graph()
    mod.build(g, mod.config_from_hf(hf), 64)
    return run_pipeline(g) if fused else run_pipeline(g, passes=[p for p in __import__(
        "pocketlm.passes", fromlist=["PIPELINE"]).PIPELINE if p[0] == "fold_constants"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_tokens", [1, 7, 64])
def test_plan_is_compact_and_overlap_free(arch, fused, max_tokens):
    g = compiled(arch, fused)
    plan = plan_memory(g, max_tokens)
    check_plan(plan)
    assert plan.arena_bytes <= plan.naive_bytes
    assert set(plan.offsets) == set(g.values)
    # every value fits its buffer, and the arena holds at least the largest value
    for b in plan.buffers:
        assert all(value_bytes(g, v, max_tokens) <= b.nbytes for v in b.names)
        assert b.offset % ALIGN == 0
    assert plan.arena_bytes >= max(value_bytes(g, v, max_tokens) for v in g.values)
    # a layered model reuses memory across layers: far below the naive sum
    assert plan.arena_bytes < plan.naive_bytes / 3


def test_check_plan_catches_an_overlap():
    g = compiled()
    plan = plan_memory(g, 8)
    bufs = list(plan.buffers)
    # move the second buffer on top of the first one, where both are alive
    a = bufs[0]
    for i, b in enumerate(bufs[1:], 1):
        if not (a.end < b.start or b.end < a.start):
            bufs[i] = type(b)(b.names, b.nbytes, b.start, b.end, a.offset)
            break
    bad = dataclasses.replace(plan, buffers=tuple(bufs))
    with pytest.raises(AssertionError, match="overlap"):
        check_plan(bad)


def test_summary_reports_savings():
    plan = plan_memory(compiled(), 16)
    assert "naive sum" in plan.summary() and "saved" in plan.summary()


def test_rows_per_sequence_are_planned_for_max_seqs():
    """After take_last a value has one row per sequence of the step ("S"): planned at max_seqs rows."""
    g = compiled()
    out = g.outputs[0]
    assert g.values[out].rows == "S"
    one, four = plan_memory(g, 8), plan_memory(g, 8, max_seqs=4)
    assert value_bytes(g, out, 8, 4) == 4 * value_bytes(g, out, 8, 1) == 4 * 4 * g.values[out].cols
    check_plan(four)
    assert four.arena_bytes >= one.arena_bytes and four.max_seqs == 4
    assert "4 sequences" in four.summary()
