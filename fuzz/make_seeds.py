"""Generates the fuzzers' binary seeds: `python fuzz/make_seeds.py [DIR]` (default
~/.cache/pocketlm/fuzz/seeds) writes DIR/bundle/seed-llama-{f32,int4}.plm and DIR/gguf/seed-llama.gguf
(a tiny random llama, made with transformers and the test helpers), DIR/session/seed-llama-f32.plms (a
short conversation with the f32 one, saved) and, next to them, the input of every recipe in
fuzz/corpus/{bundle,gguf,session}/*.json. Model files stay out of git: the committed corpus
is the chat inputs and these recipes. scripts/fuzz.sh and tests/fuzz/test_corpus_replay.py call it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DIR = Path.home() / ".cache" / "pocketlm" / "fuzz" / "seeds"
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)


def ensure_seeds(out: Path) -> Path:
    """Writes the seeds into `out` unless they are there; (re)writes the recipe inputs; returns `out`."""
    for p in (str(ROOT / "python"), str(ROOT / "tests"), str(ROOT / "tests" / "convert"), str(HERE)):
        if p not in sys.path:
            sys.path.insert(0, p)
    import targets

    wanted = [targets.seed_path(out, kind, name) for kind, names in targets.SEEDS.items() for name in names
              if kind != "session"]
    if not all(p.exists() for p in wanted):
        from gguf_craft import write_gguf
        from testutil import make_hf_model

        from pocketlm.convert import convert

        for kind in targets.SEEDS:
            (out / kind).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            hf = Path(tmp) / "hf"
            model = make_hf_model(hf, "llama", seed=7, **TINY)
            for quant in ("f32", "int4"):
                convert(hf, targets.seed_path(out, "bundle", f"llama-{quant}"), quant=quant, progress=False)
            write_gguf(targets.seed_path(out, "gguf", "llama"), model, hf, "llama",
                       {"attn_v.weight": "Q8_0", "ffn_up.weight": "Q4_0"})
    if not targets.seed_path(out, "session", "llama-f32").exists():
        targets.make_session_seed(out)
    targets.SEEDS_DIR = out
    for kind in targets.SEEDS:
        for recipe in sorted((HERE / "corpus" / kind).glob("*.json")):
            data = targets.corpus_input(kind, recipe, out)
            (out / kind / f"recipe-{recipe.stem}{targets._SUFFIX[kind]}").write_bytes(data)
    return out


if __name__ == "__main__":
    print(ensure_seeds(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR))
