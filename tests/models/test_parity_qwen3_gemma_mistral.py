"""Qwen3, Gemma, Gemma 2, Gemma 3 (text), Mistral (sliding window) and Qwen2/Qwen3 with use_sliding_window
vs transformers.

The same checks as test_transformers_parity.py, whose test functions are imported below and run
here on this module's `case` fixture: f32 last-position logits within 1e-4 (whole, chunked and
decoded), 32 greedy tokens identical, 1 vs 2 threads, quantized bundles vs the f32 model and
across kernel variants. The emulated-reference test is redefined here because the Gemma bundles
store RMSNorm weights as 1 + w. Sliding windows are small (7..24 positions) so that prompts of
100 tokens, chunks of 16 and decode all cross the ring buffer's wrap-around.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_transformers_parity import (  # noqa: F401  (tests collected here with this module's `case`)
    hf_logits,
    prompt,
    quantize_activations,
    test_f32_chunked_prefill_and_decode_match,
    test_f32_last_logits_match,
    test_greedy_32_tokens_identical,
    test_quantized_end_to_end_error_vs_f32,
    test_quantized_simd_matches_scalar_reference_kernels,
    test_threads_one_and_two_agree,
)
from testutil import make_tokenizer_files

from pocketlm import models
from pocketlm.convert import convert
from pocketlm.engine import Engine

CASES = {
    "qwen3": dict(arch="qwen3", head_dim=24),  # head_dim != hidden / heads
    "qwen3-tied-odd": dict(arch="qwen3", hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                           head_dim=12, intermediate_size=72, tie_word_embeddings=True, vocab_size=301),
    "gemma": dict(arch="gemma", num_key_value_heads=1, head_dim=32),
    "gemma-odd": dict(arch="gemma", hidden_size=40, num_attention_heads=3, num_key_value_heads=3, head_dim=20,
                      intermediate_size=72, vocab_size=333),
    "gemma2": dict(arch="gemma2", num_hidden_layers=3, head_dim=32, sliding_window=16, query_pre_attn_scalar=20,
                   attn_logit_softcapping=5.0, final_logit_softcapping=10.0),
    "gemma2-odd": dict(arch="gemma2", hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                       intermediate_size=72, vocab_size=301, sliding_window=7, query_pre_attn_scalar=12,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": dict(arch="gemma3", num_hidden_layers=4, head_dim=32, sliding_window=12, query_pre_attn_scalar=24,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    "gemma3-odd": dict(arch="gemma3", hidden_size=40, num_attention_heads=5, num_key_value_heads=1, head_dim=12,
                       intermediate_size=72, vocab_size=333, num_hidden_layers=3, sliding_window=9,
                       sliding_window_pattern=3, final_logit_softcapping=20.0),
    "mistral": dict(arch="mistral", sliding_window=24),
    # use_sliding_window (off in released checkpoints): layers from max_window_layers on slide.
    "qwen2-swa": dict(arch="qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=10,
                      max_window_layers=1),
    "qwen3-swa": dict(arch="qwen3", num_hidden_layers=3, head_dim=24, use_sliding_window=True,
                      sliding_window=9, max_window_layers=2),
}


def make_model(folder, arch: str, seed: int, **overrides):
    """A tiny random transformers model of `arch`, saved with a tokenizer; returns it."""
    import transformers

    classes = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.15,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch.startswith("gemma"):
        base["tie_word_embeddings"] = True
    base.update(overrides)
    config_cls, model_cls = classes[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**base)).eval()
    with torch.no_grad():  # norms start at one (Gemma: zero, applied as 1 + w): make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer_files(folder, base["vocab_size"])
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    arch = spec.pop("arch")
    folder = tmp_path_factory.mktemp(request.param)
    model = make_model(folder / "hf", arch, seed=len(request.param), **spec)
    bundle = convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False)
    return request.param, folder, model, bundle


def dequantized_reference(model, bundle_path, levels: int = 1):
    """`model` with the bundle's weights dequantized (Gemma norms back to w from 1 + w) and every
    matmul with a quantized weight reading int8-quantized activations, as pocketlm's kernels do."""
    import copy

    from pocketlm.bundle import read_bundle
    from pocketlm.dtypes import DType
    from pocketlm.quant import dequantize

    b = read_bundle(bundle_path)
    arch = b.metadata["architecture"]
    module = models.get(arch)
    infos = {t.name: t for t in b.tensors}
    ref = copy.deepcopy(model)

    def canonical(name):
        canon = module.hf_weight_name(name)
        return "token_embd.weight" if canon == "output.weight" and canon not in infos else canon

    with torch.no_grad():
        for name, p in ref.named_parameters():
            t = infos[canonical(name)]
            w = dequantize(np.asarray(b.tensor(t.name)), DType(t.dtype), tuple(t.shape))
            if arch.startswith("gemma") and t.name.endswith("norm.weight"):
                w = w - 1.0
            p.copy_(torch.from_numpy(np.ascontiguousarray(w.reshape(p.shape))))
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and DType(infos[canonical(name + ".weight")].dtype).quantized:
            mod.register_forward_pre_hook(lambda m, args: (quantize_activations(args[0], levels),))
    return ref


@pytest.mark.parametrize("activations", ["int8", "int8x2"])
@pytest.mark.parametrize("quant", ["f16", "int8", "int4"])
def test_quantized_runtime_matches_emulated_reference(case, quant, activations):
    """As in test_transformers_parity.py: median error tiny, worst case moderate."""
    name, folder, model, _ = case
    qb = convert(folder / "hf", folder / f"{quant}.plm", quant=quant, progress=False)
    ref_model = dequantized_reference(model, qb, levels=2 if activations == "int8x2" else 1)
    engine = Engine(qb, kv_type="f32", threads=2, max_context=64, activations=activations)
    errors = []
    for seed in range(8):
        ids = prompt(24, 300, seed=seed)
        ref = hf_logits(ref_model, ids)[-1]
        got = engine.create_session().prefill(ids)
        errors.append(float(np.abs(got - ref).max() / ref.std()))
    assert np.median(errors) < 1e-3 and max(errors) < 0.1, (quant, errors)


def test_sliding_window_layers_keep_only_their_window(case):
    """A windowed layer's KV cache holds window + chunk - 1 positions, not max_context."""
    name, _, _, bundle = case
    engine = Engine(bundle, kv_type="f32", threads=1, max_context=256, prefill_chunk=16)
    windows = engine.config.get("layer_windows") or [engine.config.get("sliding_window") or 0] * \
        engine.config["n_layers"]
    s = engine.create_session()
    caps = s._state.kv_capacities
    assert caps == [min(256, w + 16 - 1) if w else 256 for w in windows]
    if name.startswith(("gemma2", "gemma3", "mistral")) or name.endswith("-swa"):
        assert min(caps) < 256
