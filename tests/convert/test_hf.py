"""Hugging Face checkpoint -> .plm: tensors against transformers' state dict, the recipe's types
and error bounds (docs/quant.md), and the metadata."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil

import numpy as np
import pytest

from convert_fixtures import HF_CASES, bundle_f32, hf_bundles, hf_models, hf_state  # noqa: F401
from x16util import assert_type, row_major
from pocketlm import models, quant
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.dtypes import X16_OF, DType, tensor_nbytes

CASES = sorted(HF_CASES)


def _weights_2d(state):
    return {n: x for n, x in state.items() if x.ndim == 2}


@pytest.mark.parametrize("case", CASES)
def test_f32_is_exact(hf_models, hf_bundles, case):
    folder, model = hf_models[case]
    b = hf_bundles(case, "f32")
    state = hf_state(model)
    if model.config.tie_word_embeddings:
        state.pop("output.weight", None)
    assert sorted(t.name for t in b.tensors) == sorted(state)
    for name, want in state.items():
        info = b.info(name)
        assert info.dtype == DType.F32 and info.shape == want.shape, name
        np.testing.assert_array_equal(bundle_f32(b, name), want, err_msg=name)


@pytest.mark.parametrize("case", CASES)
def test_f16_rounds_once(hf_models, hf_bundles, case):
    b = hf_bundles(case, "f16")
    for name, want in hf_state(hf_models[case][1]).items():
        if name not in b:
            continue
        info = b.info(name)
        if want.ndim == 1:
            assert info.dtype == DType.F32, name
            np.testing.assert_array_equal(bundle_f32(b, name), want)
        else:
            assert info.dtype == DType.F16, name
            np.testing.assert_array_equal(bundle_f32(b, name), want.astype(np.float16).astype(np.float32))


def test_default_for_hf_is_f16(hf_bundles):
    b = hf_bundles("llama", None)
    assert b.metadata["quantization"]["mode"] == "f16"
    assert {t.dtype for t in b.tensors} == {DType.F16, DType.F32}


@pytest.mark.parametrize("case", CASES)
def test_int8_per_row_error_bound(hf_models, hf_bundles, case):
    b = hf_bundles(case, "int8")
    for name, want in _weights_2d(hf_state(hf_models[case][1])).items():
        if name not in b:
            continue
        got = bundle_f32(b, name)
        if want.shape[1] % 32:  # quantized matmuls need K % 32 == 0, i8 included
            assert b.info(name).dtype == DType.F16, name
            continue
        assert_type(b.info(name), DType.I8)
        bound = np.abs(want).max(axis=1, keepdims=True) / 254 * (1 + 1e-5) + 1e-12
        assert np.all(np.abs(got - want) <= bound), name
        np.testing.assert_array_equal(row_major(b, name), quant.quantize(want, DType.I8), err_msg=name)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.01, name



@pytest.mark.parametrize("case", CASES)
def test_int8_group_32_is_q8_0_blocks(hf_models, hf_bundles, case):
    """--quant int8 --group-size 32: one f16 scale per 32 weights (llama.cpp's Q8_0 layout), for
    every 2-D tensor, embeddings and head included; error at most half a step of each block."""
    b = hf_bundles(case, "int8", group_size=32)
    per_row = hf_bundles(case, "int8")
    assert b.metadata["quantization"]["mode"] == "int8" and b.metadata["quantization"]["group_size"] == 32
    assert per_row.metadata["quantization"]["group_size"] is None
    checked = 0
    for name, want in _weights_2d(hf_state(hf_models[case][1])).items():
        if name not in b:
            continue
        if want.shape[1] % 32:
            assert b.info(name).dtype == DType.F16, name
            continue
        assert_type(b.info(name), DType.Q8_0)
        np.testing.assert_array_equal(row_major(b, name), quant.quantize(want, DType.Q8_0), err_msg=name)
        got = bundle_f32(b, name)
        bound = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 254 * 1.002 + 1e-9
        assert np.all(np.abs(got - want).reshape(-1, 32) <= bound), name
        # blocks fit the weights no worse than one scale per row does
        err_row = np.linalg.norm(bundle_f32(per_row, name) - want)
        assert np.linalg.norm(got - want) <= err_row * 1.0001, name
        checked += 1
    assert checked or case == "llama-odd-tied"  # its rows are 48 and 80 wide: all f16


def test_int8_rejects_other_groups_and_asym(hf_models, tmp_path):
    from pocketlm.convert import convert

    folder = hf_models["llama"][0]
    with pytest.raises(ValueError, match="int8 group_size"):
        convert(folder, tmp_path / "a.plm", quant="int8", group_size=64, progress=False)
    with pytest.raises(ValueError, match="symmetric"):
        convert(folder, tmp_path / "b.plm", quant="int8", symmetric=False, progress=False)
    for quant_, head in [("f16", "int4"), ("f32", "int8"), (None, "int4"), ("int4", "int2")]:
        with pytest.raises(ValueError, match="head"):
            convert(folder, tmp_path / "c.plm", quant=quant_, head=head, progress=False)
    assert not list(tmp_path.iterdir())

def _q4_bound(want: np.ndarray, group: int, symmetric: bool) -> np.ndarray:
    """Per-element error bound of Q4 (docs/quant.md): amax/8 for symmetric (the clamped end of the
    range), (max-min)/30 plus the f16 rounding of the minimum for asymmetric; the 0.4% slack is
    the f16 rounding of the scale."""
    g = want.reshape(want.shape[0], -1, group)
    if symmetric:
        bound = np.abs(g).max(axis=2, keepdims=True) / 8
    else:
        lo, hi = g.min(axis=2, keepdims=True), g.max(axis=2, keepdims=True)
        bound = (hi - lo) / 30 + np.abs(lo) * 2.0 ** -10
    return np.broadcast_to(bound * 1.004 + 1e-9, g.shape).reshape(want.shape)


@pytest.mark.parametrize("group,symmetric", [(32, True), (64, True), (128, True), (32, False), (64, False)])
def test_int4_recipe_and_error_bounds(hf_models, hf_bundles, group, symmetric):
    b = hf_bundles("llama", "int4", group_size=group, symmetric=symmetric)
    q4 = {(True, 32): DType.Q4_0, (True, 64): DType.Q4_0_G64, (True, 128): DType.Q4_0_G128,
          (False, 32): DType.Q4_1, (False, 64): DType.Q4_1_G64}[(symmetric, group)]
    fallback = []
    for name, want in hf_state(hf_models["llama"][1]).items():
        info, got = b.info(name), bundle_f32(b, name)
        if want.ndim == 1:
            assert info.dtype == DType.F32
            np.testing.assert_array_equal(got, want)
        elif name in ("token_embd.weight", "output.weight"):
            assert_type(info, DType.Q8_0)
            bound = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 254 * 1.002 + 1e-9
            assert np.all(np.abs(got - want).reshape(-1, 32) <= bound), name
        elif want.shape[1] % group:  # 96-wide ffn_down at group 64, all linear weights at 128: F16
            assert info.dtype == DType.F16, name
            fallback.append(name)
        else:
            assert_type(info, q4)
            assert np.all(np.abs(got - want) <= _q4_bound(want, group, symmetric)), name
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.12, name
            np.testing.assert_array_equal(row_major(b, name), quant.quantize(want, q4), err_msg=name)
    q = b.metadata["quantization"]
    assert q["mode"] == "int4" and q["group_size"] == group and q["symmetric"] is symmetric
    assert sorted(q["f16_fallback"]) == sorted(fallback)
    assert q["types"] == {k: v for k, v in _count_types(b).items()}
    n_fallback = {32: 0, 64: 2, 128: 2 * 7}[group]  # 2 layers x (ffn_down | all 7 linear weights)
    assert len(fallback) == n_fallback


def _count_types(b) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in b.tensors:
        counts[t.dtype.label] = counts.get(t.dtype.label, 0) + 1
    return counts


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_widths_not_multiple_of_32_fall_back_to_f16(hf_bundles, mode):
    """48- and 80-wide rows: no quantized type fits (i8 neither: the kernels need K % 32 == 0)."""
    b = hf_bundles("llama-odd-tied", mode)
    two_d = [t for t in b.tensors if len(t.shape) == 2]
    assert two_d and all(t.dtype == DType.F16 for t in two_d)
    assert sorted(b.metadata["quantization"]["f16_fallback"]) == sorted(t.name for t in two_d)
    assert hf_bundles("llama", mode).metadata["quantization"]["f16_fallback"] == []  # 64/96 wide: all fit


def test_tied_embeddings_store_no_head(hf_bundles):
    b = hf_bundles("llama-odd-tied", "f32")
    assert "output.weight" not in b and "token_embd.weight" in b
    assert b.metadata["config"]["tie_embeddings"] is True
    assert hf_bundles("llama", "f32").metadata["config"]["tie_embeddings"] is False


def test_bf16_sharded_qwen2(hf_models, hf_bundles):
    folder, model = hf_models["qwen2-bf16-sharded"]
    assert len(list(folder.glob("model-*.safetensors"))) >= 2 and (folder / "model.safetensors.index.json").exists()
    b = hf_bundles("qwen2-bf16-sharded", "f32")
    cfg = b.metadata["config"]
    assert b.metadata["architecture"] == "qwen2" and cfg["attn_bias"] is True
    for i in range(model.config.num_hidden_layers):
        for w in ("q", "k", "v"):
            assert f"blk.{i}.attn_{w}.bias" in b
    assert b.metadata["chat_template"].startswith("JINJA:")  # read from chat_template.jinja


def test_metadata(hf_models, hf_bundles):
    folder, model = hf_models["llama"]
    b = hf_bundles("llama", "f32")
    m = b.metadata
    assert m["format_version"] == 1 and m["architecture"] == "llama"
    config = json.loads((folder / "config.json").read_text())
    want_cfg = models.get("llama").config_from_hf(config)
    want_cfg.update(tie_embeddings=False, attn_bias=False, rope_freq_factors=False)
    assert m["config"] == want_cfg
    assert m["quantization"] == {"mode": "f32", "group_size": None, "symmetric": None,
                                 "types": {"f32": len(b.tensors)}, "f16_fallback": []}
    # the tokenizer.json as given, compacted (merges as "a b" strings, no indentation): the same document
    assert m["tokenizer"]["type"] == "hf-json"
    stored, given = json.loads(m["tokenizer"]["json"]), json.loads((folder / "tokenizer.json").read_text())
    for doc in (stored, given):
        doc["model"]["merges"] = [x.split(" ") if isinstance(x, str) else x for x in doc["model"]["merges"]]
    assert stored == given
    assert "<|im_start|>" in m["chat_template"]
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    st = m["special_tokens"]
    assert st["bos_id"] == ids["<|im_start|>"] and ids["<|im_end|>"] in st["eos_ids"]
    assert st["add_bos"] is False
    assert m["generation"] == {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                               "repetition_penalty": 1.1, "greedy_repetition_penalty": 1.0, "max_tokens": 512}
    p = m["provenance"]
    h = hashlib.sha256()
    for f in [folder / "config.json", folder / "model.safetensors"]:
        h.update(f.read_bytes())
    assert p["source"] == folder.name and p["source_format"] == "hf" and p["source_sha256"] == h.hexdigest()
    assert p["converter"].startswith("pocketlm ")
    created = datetime.datetime.fromisoformat(p["created"])
    assert created.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 3600


def test_generation_config_and_eos_union(hf_models, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(hf_models["llama"][0], src)
    (src / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [2, 7], "bos_token_id": 1, "temperature": 0.3, "top_k": 20, "top_p": 0.8,
        "repetition_penalty": 1.1}))
    b = read_bundle(convert(src, tmp_path / "out.plm", quant="f16", progress=False))
    g, st = b.metadata["generation"], b.metadata["special_tokens"]
    assert (g["temperature"], g["top_k"], g["top_p"], g["repetition_penalty"], g["min_p"]) == (0.3, 20, 0.8, 1.1, 0.05)
    assert 2 in st["eos_ids"] and 7 in st["eos_ids"] and len(set(st["eos_ids"])) == len(st["eos_ids"])


def test_output_folder_and_progress_bar(hf_models, tmp_path, capsys):
    out = convert(hf_models["llama"][0], tmp_path, quant="int8", progress=True)
    assert out == tmp_path / "llama.plm" and out.exists()
    err = capsys.readouterr().err
    assert "tensors" in err and "MB" in err and "100.0%" in err
    convert(hf_models["llama"][0], tmp_path / "quiet.plm", quant="int8", progress=False)
    assert capsys.readouterr().err == ""
    assert list(tmp_path.glob(".*tmp*")) == []


@pytest.mark.parametrize("base", sorted(X16_OF), ids=lambda t: t.label)
def test_x16_interleave_round_trips_and_matches_the_documented_layout(base):
    """quant.interleave / deinterleave on real quantized bytes: exact inverses, the same values
    through dequantize, quantize(x16) == interleave(quantize(base)), and the byte positions of
    csrc/common.h ("x16 interleaving") checked one by one."""
    x16 = X16_OF[base]
    rng = np.random.default_rng(int(base))
    code = {DType.Q4_0_G64: 32, DType.Q4_1_G64: 32, DType.Q4_0_G128: 64, DType.Q4_1_G128: 64}.get(
        base, 16 if base in (DType.Q4_0, DType.Q4_1, DType.Q5_0, DType.Q5_1) else 32)  # per block
    bb = 32 if base == DType.I8 else base.block_bytes  # bytes of one row's block (32, 64 or 128 elements)
    # header fields in block order: Q8_0/Q4_0 f16 d; Q4_1 d, m; Q5_0 d, u32 qh; Q5_1 d, m, qh; I8 none
    sizes = {DType.Q8_0: (2,), DType.Q4_0: (2,), DType.Q4_1: (2, 2), DType.I8: (),
             DType.Q5_0: (2, 4), DType.Q5_1: (2, 2, 4), DType.Q4_0_G64: (2,), DType.Q4_0_G128: (2,),
             DType.Q4_1_G64: (2, 2), DType.Q4_1_G128: (2, 2)}[base]
    assert sum(sizes) + code == bb
    for rows, cols in [(16, 128), (48, 384), (64, 256)]:
        # rows of very different magnitudes, so that scales (and I8 row scales) all differ
        x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-4, 2, (rows, 1)))).astype(np.float32)
        raw = quant.quantize(x, base)
        packed = quant.interleave(raw, base, (rows, cols))
        assert packed.dtype == np.uint8 and packed.size == raw.size == tensor_nbytes(x16, (rows, cols))
        assert not np.array_equal(packed, raw)
        assert quant.deinterleave(packed, base, (rows, cols)).tobytes() == raw.tobytes()
        assert quant.interleave_numpy(raw, base, (rows, cols)).tobytes() == packed.tobytes()  # C++ vs numpy
        assert quant.quantize(x, x16).tobytes() == packed.tobytes()
        np.testing.assert_array_equal(quant.dequantize(packed, x16, (rows, cols)),
                                      quant.dequantize(raw, base, (rows, cols)))
        # the documented layout, position by position
        nb = cols // (32 if base == DType.I8 else base.block_elems)
        blocks = raw[: rows * nb * bb].reshape(rows, nb, bb)
        for n in range(rows):
            g, i = divmod(n, 16)
            for blk in range(nb):
                rec = packed[(g * nb + blk) * 16 * bb:][: 16 * bb]
                src = blocks[n, blk]
                at = off = 0  # field start in the record / in the row's block
                for f, size in enumerate(sizes):
                    assert rec[at + size * i:][:size].tobytes() == src[off:][:size].tobytes(), (n, blk, f)
                    at, off = at + 16 * size, off + size
                for u in range(code // 4):
                    got = rec[at + 64 * u + 4 * i:][:4]
                    assert got.tobytes() == src[off + 4 * u:][:4].tobytes(), (n, blk, u)
        assert packed[rows * nb * bb:].tobytes() == raw[rows * nb * bb:].tobytes()  # I8 row scales
        assert packed[rows * nb * bb:].size == (4 * rows if base == DType.I8 else 0)
    with pytest.raises(ValueError, match="16"):  # whole groups of 16 rows only
        quant.interleave(quant.quantize(np.ones((24, 128), np.float32), base), base, (24, 128))
    from pocketlm import _core

    for rows, cols in [(16, 1 << 60), (1 << 14, 1 << 54), (1 << 40, 32)]:  # sizes that wrap a size_t
        with pytest.raises(ValueError):
            _core.interleave_x16(np.zeros(64, np.uint8), int(x16), rows, cols)


@pytest.mark.parametrize("mode,group_size,symmetric,head", [
    ("int8", None, True, None), ("int8", 32, True, None), ("int4", 32, True, None), ("int4", 32, False, None),
    ("int4", 32, False, "int4"), ("int8", None, True, "int4"), ("int4", 32, True, "int8")])
def test_rows_not_multiple_of_16_keep_the_row_major_type(tmp_path, mode, group_size, symmetric, head):
    """One KV head of 24 and an ffn of 72: attn_k/attn_v [24, 96] and ffn_gate/ffn_up [72, 96]
    cannot be cut into groups of 16 rows and keep the row-major base type (ffn_down [96, 72] is
    F16: 72 is not whole 32-blocks); the others are x16. Bytes as quantize() gives them, and the
    model runs with both layouts mixed. head="int4": the embeddings and the head 4-bit too (the
    linears' group and symmetry in int4 mode, Q4_0 in int8 mode), gathered and multiplied as such."""
    from testutil import make_hf_model

    from pocketlm.engine import Engine

    model = make_hf_model(tmp_path / "hf", "llama", hidden_size=96, intermediate_size=72,
                          num_attention_heads=4, num_key_value_heads=1)
    out = convert(tmp_path / "hf", tmp_path / "m.plm", quant=mode, group_size=group_size, symmetric=symmetric,
                  progress=False, head=head)
    b = read_bundle(out)
    q4 = {True: DType.Q4_0, False: DType.Q4_1}  # group 32: the model is 96 wide
    linear = {"int8": DType.I8 if group_size is None else DType.Q8_0,
              "int4": q4[symmetric]}[mode]
    head_type = q4[symmetric] if head == "int4" else \
        DType.Q8_0 if mode == "int4" else linear
    assert b.metadata["quantization"]["head"] == (head or "int8")
    kinds = {True: [], False: []}
    for name, want in _weights_2d(hf_state(model)).items():
        info = b.info(name)
        if want.shape[1] % 32:
            assert name.endswith("ffn_down.weight") and info.dtype == DType.F16, name
            continue
        base = head_type if name in ("token_embd.weight", "output.weight") else linear
        assert_type(info, base)
        kinds[info.dtype.x16].append(name.split(".")[-2])
        np.testing.assert_array_equal(row_major(b, name), quant.quantize(want, base), err_msg=name)
        np.testing.assert_array_equal(bundle_f32(b, name),
                                      quant.dequantize(quant.quantize(want, base), base, want.shape), err_msg=name)
    assert sorted(set(kinds[False])) == ["attn_k", "attn_v", "ffn_gate", "ffn_up"]
    assert sorted(set(kinds[True])) == ["attn_output", "attn_q", "output", "token_embd"]
    labels = b.metadata["quantization"]["types"]
    n_x16 = 2 * 2 + 2  # 2 layers x (attn_q, attn_output), token_embd, output
    if head_type != linear:  # the embeddings and the head (Q8_0 in int4 mode by default)
        assert labels[X16_OF[linear].label] == n_x16 - 2 and labels[X16_OF[head_type].label] == 2
    else:
        assert labels[X16_OF[linear].label] == n_x16
    assert labels[linear.label] == 2 * 4 and labels["f16"] == 2  # (k, v, gate, up), ffn_down
    # the runtime against transformers running the bundle's own (dequantized) weights: what is
    # left is the int8 quantization of activations
    import torch

    from pocketlm.models import llama

    with torch.no_grad():
        for hf_name, p in model.state_dict().items():
            canon = llama.hf_weight_name(hf_name)
            if canon is not None:
                p.copy_(torch.from_numpy(bundle_f32(b, canon)).reshape(p.shape))
        ids = np.random.default_rng(7).integers(0, 320, size=20).tolist()
        ref = model(torch.tensor([ids])).logits[0, -1].float().numpy()
    engine = Engine(out, threads=2, max_context=64, activations="int8x2")  # near-float: the layout is what is tested
    s = engine.create_session()
    for got in (engine.create_session().prefill(ids), (s.prefill(ids[:-1]), s.decode(ids[-1]))[1]):
        err = np.abs(got - ref).max() / ref.std()  # prefill; then decode (one-token matvecs)
        print(f"\n{mode} g{group_size} sym={symmetric} head={head}: max err / std {err:.2e}")
        assert err < 0.01, err


@pytest.mark.parametrize("settings,penalty,greedy", [
    ({}, 1.1, 1.0),                                        # no sampling settings: the measured default, sampling only
    ({"top_k": -5}, 1.1, 1.0),                             # one refused (a warning) is none given
    ({"temperature": 0.6, "top_p": 0.9}, 1.0, None),       # tuned without a penalty: none
    ({"temperature": 0.6, "repetition_penalty": 1.05}, 1.05, None),  # the checkpoint's, greedy too
])
def test_default_repetition_penalty_only_where_the_source_gives_no_sampling_settings(hf_models, tmp_path,
                                                                                     settings, penalty, greedy):
    src = tmp_path / "ckpt"
    shutil.copytree(hf_models["llama"][0], src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1, **settings}))
    g = read_bundle(convert(src, tmp_path / "out.plm", quant="f16", progress=False)).metadata["generation"]
    assert g["repetition_penalty"] == penalty and g.get("greedy_repetition_penalty") == greedy
    assert g["temperature"] == settings.get("temperature", 0.7) and g["top_k"] == 40
