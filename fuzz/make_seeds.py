"""Writes the committed seed corpus (fuzz/corpus/{bundle,gguf,chat}/seed-*): small, valid inputs for
each target to mutate. Run once from the repository root (`PYTHONPATH=python:tests python
fuzz/make_seeds.py`); the files are committed, so the replay test does not need transformers."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)

CHAT_SEEDS = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "features": "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}[{{ ns.n }}] {{ m.role | upper }}: {{ m.content | trim }}"
                "{% if loop.last %}{{ tools | tojson(indent=2) }}{% endif %}{% endfor %}{{ bos_token ~ eos_token }}",
    "macros": "{% macro turn(m) %}{{ '<' ~ m.role ~ '>' }}{{ m.content[:50] | replace('\\n', ' ') }}{% endmacro %}"
              "{% for m in messages recursive %}{{ turn(m) }}{{ '%s/%d' % (m.role, loop.length) }}"
              "{{ '{:>4}'.format(loop.index) }}{% endfor %}{{ messages | map(attribute='role') | join(',') }}",
}


def main() -> None:
    sys.path[:0] = [str(HERE.parent / "python"), str(HERE.parent / "tests"), str(HERE.parent / "tests" / "convert")]
    from gguf_craft import write_gguf
    from testutil import make_hf_model

    from pocketlm.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_hf_model(tmp / "hf", "llama", seed=7, **TINY)
        for quant in ("f32", "int4"):
            convert(tmp / "hf", HERE / "corpus" / "bundle" / f"seed-llama-{quant}.plm", quant=quant, progress=False)
        write_gguf(HERE / "corpus" / "gguf" / "seed-llama.gguf", model, tmp / "hf", "llama",
                   {"attn_v.weight": "Q8_0", "ffn_up.weight": "Q4_0"})
    for name, template in CHAT_SEEDS.items():
        (HERE / "corpus" / "chat" / f"seed-{name}.json").write_text(json.dumps({
            "template": template,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
        }, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
