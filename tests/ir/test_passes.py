"""The IR and each pass's effect on a small graph, checked by evaluating the graph
with a plain numpy interpreter before and after the pass (the reference)."""

import math

import numpy as np
import pytest

from pocketlm import models
from pocketlm.ir.graph import Graph, validate
from pocketlm.passes import PIPELINE, run_pipeline
from pocketlm.passes.dce import eliminate_dead_code, last_position_only
from pocketlm.passes.fold import fold_constants, rope_inv_freq
from pocketlm.passes.fuse import fuse_add_rms_norm, fuse_gate_up_swiglu, fuse_parallel_matmuls

CFG = models.get("qwen2").config_from_hf(dict(
    model_type="qwen2", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
    num_key_value_heads=1, intermediate_size=40, tie_word_embeddings=False, rms_norm_eps=1e-5))
MAXPOS = 32


def build():
    g = Graph()
    models.get("qwen2").build(g, CFG, MAXPOS)
    return g


def random_weights(g, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(w.shape).astype(np.float32) * 0.3 for name, w in g.weights.items()}


def interpret(g, weights, tokens):
    """Reference evaluation of a graph in numpy (float64), one whole sequence, no cache."""
    env = dict(weights)
    env.update({k: v.astype(np.float64) for k, v in g.consts.items()})
    env["tokens"] = np.asarray(tokens)
    T = len(tokens)

    def rms(x, w, eps):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def mm(x, w, b=None):
        y = x @ w.T.astype(np.float64)
        return y + b if b is not None else y

    def silu(x):
        return x / (1 + np.exp(-x))

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    for n in g.nodes:
        a = [env[x] if x else None for x in n.inputs]
        if n.op == "rope_table":
            inv = rope_inv_freq(n.attr("rope_dim"), n.attr("theta"), None)
            ang = np.arange(n.attr("max_positions"))[:, None] * inv[None]
            out = [np.concatenate([np.cos(ang), np.sin(ang)], 1)]
        elif n.op == "embed":
            out = [a[0][a[1]].astype(np.float64)]
        elif n.op == "rms_norm":
            out = [rms(a[0], a[1], n.attr("eps"))]
        elif n.op == "add":
            out = [a[0] + a[1]]
        elif n.op == "matmul":
            out = [mm(a[0], a[1], a[2] if len(a) > 2 else None)]
        elif n.op == "matmul_multi":
            out = [mm(a[0], a[i], a[i + 1]) for i in range(1, len(a), 2)]
        elif n.op == "swiglu":
            out = [silu(a[0]) * a[1]]
        elif n.op == "matmul_swiglu":
            out = [silu(mm(a[0], a[1])) * mm(a[0], a[2])]
        elif n.op == "add_rms_norm":
            s = a[0] + a[1]
            out = [s, rms(s, a[2], n.attr("eps"))]
        elif n.op == "take_last":
            out = [a[0][-1:]]
        elif n.op == "layer_norm":
            mu = a[0].mean(-1, keepdims=True)
            var = ((a[0] - mu) ** 2).mean(-1, keepdims=True)
            out = [(a[0] - mu) / np.sqrt(var + n.attr("eps")) * a[1] + a[2]]
        elif n.op == "pos_embed":
            out = [a[0] + a[1][:T]]
        elif n.op == "gelu":
            x = a[0]
            out = [0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))]
        elif n.op == "head_rms_norm":
            x = a[0].reshape(a[0].shape[0], n.attr("n_heads"), n.attr("head_dim"))
            out = [rms(x, a[1], n.attr("eps")).reshape(a[0].shape)]
        elif n.op == "geglu":
            out = [gelu_tanh(a[0]) * a[1]]
        elif n.op == "matmul_geglu":
            out = [gelu_tanh(mm(a[0], a[1])) * mm(a[0], a[2])]
        elif n.op == "scale":
            out = [a[0] * n.attr("s")]
        elif n.op == "softcap":
            out = [n.attr("cap") * np.tanh(a[0] / n.attr("cap"))]
        elif n.op == "rope":
            x, tab = a[0].copy(), a[1]
            H, D, R = n.attr("n_heads"), n.attr("head_dim"), n.attr("rope_dim")
            cos, sin = tab[:T, :R // 2], tab[:T, R // 2:]
            x = x.reshape(T, H, D)
            x1, x2 = x[..., :R // 2].copy(), x[..., R // 2:R].copy()
            x[..., :R // 2] = x1 * cos[:, None] - x2 * sin[:, None]
            x[..., R // 2:R] = x2 * cos[:, None] + x1 * sin[:, None]
            out = [x.reshape(T, H * D)]
        elif n.op == "attention":
            H, KV, D = n.attr("n_heads"), n.attr("n_kv_heads"), n.attr("head_dim")
            q, k, v = (t.reshape(T, -1, D) for t in a)
            o = np.zeros((T, H, D))
            W, cap = n.attr("window", 0), n.attr("softcap", 0.0)
            i, j = np.arange(T)[:, None], np.arange(T)[None, :]
            allowed = (j <= i) & ((W <= 0) | (j > i - W))
            for h in range(H):
                s = q[:, h] @ k[:, h // (H // KV)].T * n.attr("scale")
                if cap:
                    s = cap * np.tanh(s / cap)
                s = np.where(allowed, s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                o[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // (H // KV)]
            out = [o.reshape(T, H * D)]
        else:
            raise AssertionError(n.op)
        env.update(zip(n.outputs, out))
    return env[g.outputs[0]]


def test_model_graph_is_valid_and_printable():
    g = build()
    validate(g)
    text = g.dump()
    assert "attention(" in text and "@blk.1.ffn_down.weight" in text
    assert g.shape(g.outputs[0]) == ("T", CFG["vocab_size"])


@pytest.mark.parametrize("stage", range(len(PIPELINE)))
def test_each_pass_preserves_the_last_position_logits(stage):
    g = build()
    w = random_weights(g)
    tokens = [3, 17, 4, 42, 8, 1, 0]
    ref = interpret(g, w, tokens)[-1]
    snaps = []
    run_pipeline(g, PIPELINE[:stage + 1], snaps)
    after = interpret(snaps[-1][1], w, tokens)[-1]
    np.testing.assert_allclose(after, ref, rtol=1e-6, atol=1e-6)  # folded table is f32


def test_fold_constants_turns_rope_table_into_a_constant():
    g = fold_constants(build())
    assert "rope_table" not in g.op_counts()
    (name, table), = g.consts.items()
    assert table.shape == (MAXPOS, CFG["head_dim"]) and table.dtype == np.float32
    hd = CFG["head_dim"]
    inv = 1.0 / CFG["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    assert table[5, 1] == pytest.approx(math.cos(5 * inv[1]), abs=1e-6)
    assert table[5, hd // 2 + 1] == pytest.approx(math.sin(5 * inv[1]), abs=1e-6)


def test_last_position_only_then_dce_shrinks_the_head_to_one_row_per_sequence():
    g = fold_constants(build())
    g2 = eliminate_dead_code(last_position_only(g))
    assert g2.shape(g2.outputs[0]) == ("S", CFG["vocab_size"])  # one row per sequence of the step
    assert g2.op_counts()["take_last"] == 1
    # the full-width final norm and head are gone: same number of matmuls and norms as before
    assert g2.op_counts()["matmul"] == g.op_counts()["matmul"]
    assert g2.op_counts()["rms_norm"] == g.op_counts()["rms_norm"]
    head = [n for n in g2.nodes if n.op == "matmul" and n.inputs[1] == "output.weight"]
    assert len(head) == 1 and g2.values[head[0].inputs[0]].rows == "S"


def test_dce_removes_unused_nodes_only():
    g = fold_constants(build())
    x = g.nodes[0].outputs[0]
    from pocketlm.models import layers as L

    L.linear(g, x, g.weight("unused.weight", (7, CFG["hidden_size"])))  # result never read
    assert "unused.weight" in g.weights
    g2 = eliminate_dead_code(g)
    assert len(g2.nodes) == len(g.nodes) - 1 and "unused.weight" not in g2.weights


def test_fusions_count_and_shape():
    g = eliminate_dead_code(last_position_only(fold_constants(build())))
    L = CFG["n_layers"]
    g1 = fuse_gate_up_swiglu(g)
    assert g1.op_counts()["matmul_swiglu"] == L and "swiglu" not in g1.op_counts()
    g2 = fuse_parallel_matmuls(g1)
    multi = [n for n in g2.nodes if n.op == "matmul_multi"]
    assert len(multi) == L and all(len(n.outputs) == 3 for n in multi)
    assert all(n.inputs[2] and n.inputs[4] and n.inputs[6] for n in multi)  # qwen2 q/k/v biases kept
    g3 = fuse_add_rms_norm(g2)
    # every residual add but the last is followed by the next norm
    assert g3.op_counts()["add_rms_norm"] == 2 * L - 1
    assert g3.op_counts()["add"] == 1


def test_invalid_graph_is_rejected():
    g = build()
    g.nodes.insert(0, g.nodes[5])  # use before definition
    with pytest.raises(ValueError, match="before it is defined"):
        validate(g)


OTHER_ARCHS = {
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_embd=24, n_layer=2, n_head=3, n_positions=MAXPOS),
    "phi3": dict(model_type="phi3", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                 num_key_value_heads=1, intermediate_size=40, partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("arch", sorted(OTHER_ARCHS))
def test_pipeline_preserves_logits_of_other_architectures(arch):
    module = models.get(arch)
    cfg = module.config_from_hf(OTHER_ARCHS[arch])
    g = Graph()
    module.build(g, cfg, MAXPOS)
    w = random_weights(g, seed=2)
    tokens = [3, 17, 4, 42, 8, 1, 0]
    ref = interpret(g, w, tokens)[-1]
    final = run_pipeline(g)
    np.testing.assert_allclose(interpret(final, w, tokens)[-1], ref, rtol=1e-6, atol=1e-6)
    if arch == "gpt2":  # the final LayerNorm runs on the last row of each sequence only
        norms = [n for n in final.nodes if n.op == "layer_norm"]
        assert final.values[norms[-1].outputs[0]].rows == "S"


# Qwen3 and the Gemma family: q/k head norms, GeGLU, embedding scale, soft-capping, windows.
QWEN3_GEMMA_ARCHS = {
    "qwen3": dict(model_type="qwen3", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, head_dim=10, intermediate_size=40),
    "gemma": dict(model_type="gemma", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16, intermediate_size=40),
    "gemma2": dict(model_type="gemma2", vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, intermediate_size=40, sliding_window=3,
                   query_pre_attn_scalar=12, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": dict(model_type="gemma3_text", vocab_size=50, hidden_size=24, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=40,
                   sliding_window=4, sliding_window_pattern=2),
}


@pytest.mark.parametrize("arch", sorted(QWEN3_GEMMA_ARCHS))
def test_pipeline_preserves_logits_of_qwen3_and_gemma(arch):
    module = models.get(arch)
    cfg = module.config_from_hf(QWEN3_GEMMA_ARCHS[arch])
    g = Graph()
    module.build(g, cfg, MAXPOS)
    w = random_weights(g, seed=3)
    tokens = [3, 17, 4, 42, 8, 1, 0, 9, 33]
    ref = interpret(g, w, tokens)[-1]
    final = run_pipeline(g)
    np.testing.assert_allclose(interpret(final, w, tokens)[-1], ref, rtol=1e-6, atol=1e-6)
    counts = final.op_counts()
    if arch.startswith("gemma"):  # GeGLU fused with its projections
        assert counts["matmul_geglu"] == cfg["n_layers"] and "geglu" not in counts
    if arch in ("qwen3", "gemma3"):
        assert counts["head_rms_norm"] == 2 * cfg["n_layers"]
    if arch == "gemma2":  # the final soft-cap runs on the last row of each sequence only
        (cap,) = [n for n in final.nodes if n.op == "softcap"]
        assert final.values[cap.outputs[0]].rows == "S"
        windows = [n.attr("window", 0) for n in final.nodes if n.op == "attention"]
        assert windows == [3, 0]


def test_window_changes_the_interpreted_attention():
    """Guards the interpreter itself: a window shorter than the prompt must matter."""
    cfg = models.get("gemma2").config_from_hf(QWEN3_GEMMA_ARCHS["gemma2"])
    g = Graph()
    models.get("gemma2").build(g, cfg, MAXPOS)
    w = random_weights(g, seed=3)
    tokens = [3, 17, 4, 42, 8, 1, 0, 9, 33]
    g2 = Graph()
    models.get("gemma2").build(g2, {**cfg, "layer_windows": [0, 0]}, MAXPOS)
    assert np.abs(interpret(g, w, tokens)[-1] - interpret(g2, w, tokens)[-1]).max() > 1e-3
