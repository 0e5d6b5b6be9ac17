"""Builds a model with the public Qwen2.5-0.5B dimensions and random weights, and every file the
side-by-side benchmark needs, into ~/.cache/pocketlm/models/qwen05-shape/ (idempotent):

  hf/                      transformers Qwen2ForCausalLM (f16 safetensors) + a 151,936-token tokenizer.json
  qwen05-shape-f16.gguf    convert_hf_to_gguf.py from the llama-cpp-python sdist (bench/build_llamacpp.sh)
  qwen05-shape-Q4_0.gguf   llama-quantize Q4_0 (llama.cpp's default recipe for that type)
  qwen05-shape-Q8_0.gguf   llama-quantize Q8_0
  qwen05-shape-int4.plm    pocketlm convert hf --quant int4 --group-size 32
  qwen05-shape-int8.plm    pocketlm convert hf --quant int8

    python bench/make_qwen05_shape.py [--out DIR] [--llamacpp ~/.cache/pocketlm/llama.cpp]

Random weights make the speed of a real 0.5B model (the work per token depends only on the shapes),
not its text. The tokenizer is synthetic but full size, so sampling and detokenizing run over the
real vocabulary: byte-level BPE whose 151,933 ordinary tokens are the 256 byte symbols, all 65,536
pairs of them and 86,141 triples, plus 3 ChatML special tokens at the end of the vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B)
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
              rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
              sliding_window=None, max_window_layers=24, hidden_act="silu", initializer_range=0.02)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAME = "qwen05-shape"


def log(msg: str) -> None:
    print(f"[make_qwen05_shape] {msg}", file=sys.stderr, flush=True)


def byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: byte b -> a printable unicode character (what ByteLevel emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json with exactly `vocab_size` tokens (3 of them special)."""
    symbols = byte_symbols()
    # Printable ASCII first, so that ordinary text merges into pairs and triples early.
    order = sorted(range(256), key=lambda b: (not (32 <= b < 127), b))
    vocab: dict[str, int] = {symbols[b]: b for b in range(256)}
    merges: list[list[str]] = []
    n_ordinary = vocab_size - len(SPECIALS)
    for a in order:
        for b in order:
            tok = symbols[a] + symbols[b]
            vocab[tok] = len(vocab)
            merges.append([symbols[a], symbols[b]])
    done = False
    for a in order:
        for b in order:
            for c in order:
                if len(vocab) >= n_ordinary:
                    done = True
                    break
                pair = symbols[a] + symbols[b]
                vocab[pair + symbols[c]] = len(vocab)
                merges.append([pair, symbols[c]])
            if done:
                break
        if done:
            break
    assert len(vocab) == n_ordinary, len(vocab)
    added = [{"id": n_ordinary + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(SPECIALS)]
    tok = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768}))


def make_hf(folder: Path) -> None:
    import torch
    import transformers

    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        log(f"{folder} exists")
        return
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(0)
    eos = QWEN05["vocab_size"] - 1  # <|im_end|>
    config = transformers.Qwen2Config(**QWEN05, bos_token_id=QWEN05["vocab_size"] - 3, eos_token_id=eos)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # norms are one and biases zero at init: make them count, as in a trained model
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(torch.float16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder, QWEN05["vocab_size"])
    log(f"hf model: {n / 1e6:.1f} M parameters in {time.time() - t0:.0f} s -> {folder}")


# convert_hf_to_gguf.py refuses BPE vocabularies whose pre-tokenizer hash it does not know; ours is
# synthetic (Qwen2's byte-level pre-tokenizer with a made-up vocabulary), so tell it "qwen2".
_CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[2:]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(map(str, cmd)))
    subprocess.run(list(map(str, cmd)), check=True, **kw)


def _stale(plm: Path) -> bool:
    """A bundle written by an older converter (another weight layout): convert it again."""
    from pocketlm.bundle import read_bundle
    from pocketlm.convert.converter import CONVERTER_VERSION

    prov = read_bundle(plm).metadata.get("provenance", {})
    return prov.get("converter_version") != CONVERTER_VERSION


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/pocketlm/models" / NAME)
    ap.add_argument("--llamacpp", type=Path, default=Path(os.environ.get(
        "LLAMACPP_CACHE", Path.home() / ".cache/pocketlm/llama.cpp")))
    a = ap.parse_args(argv)
    out, llamacpp = a.out.expanduser(), a.llamacpp.expanduser()
    hf = out / "hf"
    make_hf(hf)

    src, binaries = llamacpp / "src", llamacpp / "build" / "bin"
    f16 = out / f"{NAME}-f16.gguf"
    if not f16.exists():
        if not (src / "convert_hf_to_gguf.py").exists():
            sys.exit(f"{src}/convert_hf_to_gguf.py is missing: run bench/build_llamacpp.sh first")
        run([sys.executable, "-c", _CONVERT, src.resolve(), hf, "--outtype", "f16", "--outfile", f"{f16}.tmp"])
        os.replace(f"{f16}.tmp", f16)
    for quant in ("int4", "int8"):
        plm = out / f"{NAME}-{quant}.plm"
        if not plm.exists() or _stale(plm):
            extra = ["--group-size", "32"] if quant == "int4" else []
            run([sys.executable, "-m", "pocketlm", "convert", hf, "-o", plm, "--quant", quant, *extra, "-q"])
    for qtype in ("Q4_0", "Q8_0"):
        q = out / f"{NAME}-{qtype}.gguf"
        if not q.exists():
            if not (binaries / "llama-quantize").exists():
                sys.exit(f"{binaries}/llama-quantize is missing: run bench/build_llamacpp.sh first")
            run([binaries / "llama-quantize", f16, f"{q}.tmp", qtype, "2"], stdout=subprocess.DEVNULL)
            os.replace(f"{q}.tmp", q)
    for f in sorted(out.iterdir()):
        if f.is_file():
            print(f"{f}  {f.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
