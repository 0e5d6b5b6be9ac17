"""Shared test helpers: tiny random Hugging Face checkpoints made with transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path


def child_env(**extra: str) -> dict:
    """The environment for a child Python (`python -m pocketlm ...`) that must import the same
    pocketlm as this test process: the source tree in development (PYTHONPATH=python), the installed
    package under scripts/test.sh (whose source tree has no compiled extension)."""
    import pocketlm

    where = str(Path(pocketlm.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([where, os.environ.get("PYTHONPATH", "")]), **extra}


def greedy_continuation(session, logits, n: int) -> list[int]:
    """n greedy tokens from `logits` (the session's last), each fed back with decode()."""
    import numpy as np

    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = session.decode(out[-1])
    return out


def rewrite_bundle(src: Path, dst: Path, **meta_changes) -> Path:
    """A copy of bundle `src` at `dst` with top-level metadata sections replaced, written without the
    loader's check (so that tests can make bundles the converter would refuse)."""
    from pocketlm.bundle import TensorSpec, read_bundle, write_bundle

    bundle = read_bundle(src)
    write_bundle(dst, {**bundle.metadata, **meta_changes},
                 [TensorSpec(t.name, t.dtype, t.shape, lambda n=t.name: bundle.tensor(n)) for t in bundle.tensors])
    return dst


TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and symbols !?.,;:()[]{}",
    "Über café naïve — 東京 😀",
]

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer_files(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer trained on a few lines (offline), saved HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def make_hf_model(folder: Path, arch: str, seed: int = 0, **overrides):
    """Saves a tiny random model of `arch` ("llama", "qwen2", "gpt2", "phi3" or "gemma") with transformers;
    returns it. Overrides use the llama-style names (hidden_size, ...) for every arch."""
    import torch
    import transformers

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.15)
    if arch == "gpt2":
        base.update(tie_word_embeddings=True, num_key_value_heads=None)
    if arch in ("phi3", "gemma"):  # their token ids default past a tiny vocabulary
        base.update(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gemma":
        base.update(tie_word_embeddings=True, head_dim=base["hidden_size"] // base["num_attention_heads"])
    base.update(overrides)
    if arch == "gpt2":  # GPT2Config's own names; multi-head attention, LayerNorm eps
        base = dict(vocab_size=base["vocab_size"], n_embd=base["hidden_size"], n_inner=base["intermediate_size"],
                    n_layer=base["num_hidden_layers"], n_head=base["num_attention_heads"],
                    n_positions=base["max_position_embeddings"], layer_norm_epsilon=base["rms_norm_eps"],
                    tie_word_embeddings=base["tie_word_embeddings"], initializer_range=base["initializer_range"],
                    bos_token_id=1, eos_token_id=2,
                    **{k: v for k, v in overrides.items() if k in ("activation_function", "scale_attn_by_inverse_layer_idx")})
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
           "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
           "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM)}[arch]
    torch.manual_seed(seed)
    config = cls[0](**base)
    model = cls[1](config).eval()
    with torch.no_grad():  # biases and norms are zero/one at init: make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tokenizer_files(folder, base["vocab_size"])
    return model


def make_f32_bundle(folder: Path, arch: str = "llama", seed: int = 0, name: str = "f32.plm", **overrides) -> Path:
    """make_hf_model into folder / "hf", converted to an f32 bundle folder / name; returns its path."""
    from pocketlm.convert import convert

    make_hf_model(folder / "hf", arch, seed=seed, **overrides)
    return convert(folder / "hf", folder / name, quant="f32", progress=False)


# Every architecture with sliding-window layers, as a tiny config: Mistral, Qwen2 and Qwen3 with
# use_sliding_window (Qwen2's first layer full), Phi-3, Gemma 2 (alternating), Gemma 3 (5 windowed : 1 full).
WINDOWED_TINY = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
                     initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def windowed_configs(window: int) -> dict[str, dict]:
    """Per windowed architecture: its config on top of WINDOWED_TINY, with sliding window `window`."""
    return {
        "mistral": dict(num_hidden_layers=2, sliding_window=window, tie_word_embeddings=False),
        "qwen2": dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=window, max_window_layers=1,
                      tie_word_embeddings=False),
        "qwen3": dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=window, max_window_layers=0,
                      tie_word_embeddings=False),
        "phi3": dict(num_hidden_layers=2, sliding_window=window, tie_word_embeddings=False),
        "gemma2": dict(num_hidden_layers=2, sliding_window=window, query_pre_attn_scalar=16,
                       attn_logit_softcapping=20.0, final_logit_softcapping=30.0, tie_word_embeddings=True),
        "gemma3": dict(num_hidden_layers=6, sliding_window=window, query_pre_attn_scalar=16, tie_word_embeddings=True,
                       layer_types=["sliding_attention"] * 5 + ["full_attention"],
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    }


WINDOWED_ARCHS = tuple(sorted(windowed_configs(8)))


def make_windowed_bundle(folder: Path, arch: str, window: int, **overrides) -> Path:
    """A tiny random `arch` (one of WINDOWED_ARCHS) with sliding window `window` (and config `overrides`),
    converted to an f32 bundle at folder / "f32.plm"; returns its path."""
    import torch
    import transformers
    from pocketlm.convert import convert

    classes = {"mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
               "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
               "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
               "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
    config_cls, model_cls = classes[arch]
    torch.manual_seed(len(arch))
    model = model_cls(config_cls(**{**WINDOWED_TINY, **windowed_configs(window)[arch], **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    (folder / "hf").mkdir(parents=True)
    model.save_pretrained(folder / "hf", safe_serialization=True)
    make_tokenizer_files(folder / "hf", WINDOWED_TINY["vocab_size"])
    return convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False)
