"""Pruning at conversion (pocketlm.prune, `convert --prune`): the masks against brute-force
references, Wanda's input norms against transformers' own activations, and pruned bundles against
transformers running the same pruned weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from convert_fixtures import bundle_f32
from testutil import make_hf_model
from x16util import row_major
from pocketlm import prune as pruning
from pocketlm import quant
from pocketlm.bundle import read_bundle
from pocketlm.convert import convert
from pocketlm.dtypes import DType

TINY = dict(hidden_size=64, intermediate_size=96, vocab_size=256, num_hidden_layers=2)
CAL_TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his sheep. " * 6).strip()


def test_parse_prune():
    assert pruning.parse_prune("2:4") == pruning.PruneSpec(n=2, m=4, method="wanda")
    assert pruning.parse_prune("4:8", "magnitude").label == "4:8"
    s = pruning.parse_prune("60%")
    assert s.fraction == pytest.approx(0.6) and s.label == "60%" and s.sparsity == pytest.approx(0.6)
    assert pruning.parse_prune("2:4").sparsity == 0.5
    for bad in ("4:2", "0:4", "2:4:8", "50", "100%", "0%", "half", "2:128"):
        with pytest.raises(ValueError):
            pruning.parse_prune(bad)
    with pytest.raises(ValueError, match="method"):
        pruning.parse_prune("2:4", "sparsegpt")


def test_n_m_mask_keeps_the_top_n_of_every_group():
    rng = np.random.default_rng(0)
    scores = rng.random((7, 64)).astype(np.float32)
    scores[0, :8] = 1.0  # ties: the lower index is kept
    for n, m in [(2, 4), (1, 4), (4, 8), (3, 8)]:
        keep = pruning.keep_mask(scores, pruning.PruneSpec(n=n, m=m))
        for r in range(scores.shape[0]):
            for g in range(0, 64, m):
                want = sorted(range(g, g + m), key=lambda k: (-scores[r, k], k))[:n]
                assert sorted(np.flatnonzero(keep[r, g:g + m]) + g) == sorted(want)
    with pytest.raises(ValueError, match="multiple of 4"):
        pruning.keep_mask(np.ones((2, 6), np.float32), pruning.PruneSpec(n=2, m=4))


def test_unstructured_mask_drops_the_lowest_share_of_each_row():
    rng = np.random.default_rng(1)
    scores = rng.random((5, 96)).astype(np.float32)
    scores[2] = 0.5  # all equal: the highest indices go first
    for frac in (0.5, 0.6, 0.25):
        keep = pruning.keep_mask(scores, pruning.PruneSpec(fraction=frac))
        drop = int(round(frac * 96))
        for r in range(5):
            assert (~keep[r]).sum() == drop
            if r != 2:
                assert scores[r][keep[r]].min() >= scores[r][~keep[r]].max()
        assert keep[2, :96 - drop].all() and not keep[2, 96 - drop:].any()


def test_wanda_scores_weigh_magnitude_by_input_norm():
    w = np.array([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 1.0]], np.float32)
    norms = np.array([10.0, 1.0, 0.1, 5.0], np.float32)
    # scores row 0: 10, 2, 0.3, 2.5 -> keep k=0, 3; row 1: 40, 1, 0.1, 5 -> keep k=0, 3
    got = pruning.prune(w, pruning.PruneSpec(n=2, m=4, method="wanda"), norms)
    np.testing.assert_array_equal(got, [[1.0, 0, 0, 0.5], [4.0, 0, 0, 1.0]])
    got = pruning.prune(w, pruning.PruneSpec(n=2, m=4, method="magnitude"))
    np.testing.assert_array_equal(got, [[0, -2.0, 3.0, 0], [4.0, 1.0, 0, 0]])  # ties 1.0: lower index kept
    with pytest.raises(ValueError, match="input norms"):
        pruning.prune(w, pruning.PruneSpec(n=2, m=4, method="wanda"))


def _hf_inputs(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """transformers' own inputs of every block linear layer over `tokens` (one window), by
    canonical weight name."""
    import torch

    from pocketlm.models import llama

    acts, hooks = {}, []
    for hf_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        canon = llama.hf_weight_name(hf_name + ".weight")
        if canon is not None and pruning.prunable(canon):
            hooks.append(mod.register_forward_hook(
                lambda mod, inp, out, canon=canon: acts.__setitem__(canon, inp[0][0].double().numpy())))
    with torch.no_grad():
        model(torch.tensor([tokens.tolist()]))
    for h in hooks:
        h.remove()
    return acts


def test_input_norms_match_transformers(tmp_path):
    """Wanda's norms come from pocketlm cutting its own graph at each linear layer's input: against
    transformers' activations (forward hooks) on the same tokens, every block linear layer."""
    model = make_hf_model(tmp_path / "hf", "llama", seed=3, **TINY)
    bundle = convert(tmp_path / "hf", tmp_path / "f32.plm", quant="f32", progress=False)
    tokens = np.random.default_rng(0).integers(3, 256, 40).astype(np.int32)
    names = [t.name for t in read_bundle(bundle).tensors if pruning.prunable(t.name)]
    assert len(names) == 2 * 7
    norms = pruning.input_norms(bundle, tokens, names, threads=1)
    ref = _hf_inputs(model, tokens)
    assert sorted(norms) == sorted(ref) == sorted(names)
    for name in names:
        want = np.sqrt((ref[name] ** 2).sum(axis=0))
        np.testing.assert_allclose(norms[name], want, rtol=1e-5, atol=1e-6 * want.max(), err_msg=name)


@pytest.mark.parametrize("prune,method,quant_", [("2:4", "wanda", "f32"), ("50%", "wanda", "f32"),
                                                  ("50%", "magnitude", "f32"), ("2:4", "magnitude", "int4"),
                                                  ("2:4", "magnitude", "int8"), ("60%", "magnitude", "int8")])
def test_pruned_bundle_matches_transformers_with_the_same_zeros(tmp_path, prune, method, quant_):
    """The bundle's block weights are the source's with exactly the reference masks applied (Wanda's
    norms from transformers' activations over the calibration tokens), embeddings, head and norms
    untouched; int4/int8 keep the zeros exact; the runtime on the pruned bundle agrees with
    transformers running the same pruned weights."""
    import torch

    from pocketlm.engine import Engine, load_tokenizer
    from pocketlm.models import llama

    model = make_hf_model(tmp_path / "hf", "llama", seed=5, **TINY)
    cal = tmp_path / "cal.txt"
    cal.write_text(CAL_TEXT)
    out = convert(tmp_path / "hf", tmp_path / "p.plm", quant=quant_, progress=False, prune=prune, prune_method=method,
                  calibration=cal if method == "wanda" else None)
    b = read_bundle(out)
    spec = pruning.parse_prune(prune, method)
    assert b.metadata["pruning"]["pattern"] == spec.label and b.metadata["pruning"]["method"] == method
    assert b.metadata["pruning"]["tensors"] == 14
    if method == "wanda":
        tokens = np.asarray(load_tokenizer(b).encode(CAL_TEXT), np.int32)
        assert b.metadata["pruning"]["calibration"]["tokens"] == tokens.size
        # Wanda runs the dense model in f32 for an f32 output (else int8, whose rounding shifts the
        # norms a little and so may flip near-tied weights: not compared exactly here)
        # in windows of at most the model's trained length, each a fresh context, as prune.input_norms runs them
        chunk = min(pruning.CALIBRATION_CHUNK, b.metadata["config"]["max_position"])
        windows = [_hf_inputs(model, tokens[i:i + chunk]) for i in range(0, tokens.size, chunk)]
        assert len(windows) == 2  # 473 tokens, 256 positions: the second window is shorter
        ref_inputs = {n: np.concatenate([w[n] for w in windows]) for n in windows[0]}
    state = {llama.hf_weight_name(k): v.float().numpy() for k, v in model.state_dict().items()
             if llama.hf_weight_name(k) is not None}
    pruned = {}
    for name, w in state.items():
        info = b.info(name)
        raw = row_major(b, name) if info.dtype.x16 else np.asarray(b.tensor(name))
        got = quant.dequantize(raw, info.dtype.base, info.shape) if info.dtype.quantized else bundle_f32(b, name)
        got = got.reshape(w.shape)
        if not pruning.prunable(name):
            if quant_ == "f32":
                np.testing.assert_array_equal(got, w, err_msg=name)
            pruned[name] = got  # transformers gets every weight as the bundle holds it
            continue
        norms = np.sqrt((ref_inputs[name] ** 2).sum(axis=0)).astype(np.float32) if method == "wanda" else None
        want = pruning.prune(w, spec, norms)
        assert pruning.zero_fraction(want) == pytest.approx(spec.sparsity, abs=0.01), name
        if info.dtype.quantized:  # the pruned weights quantized as any: so every pruned one is an exact 0
            np.testing.assert_array_equal(raw, quant.quantize(want.reshape(info.shape), info.dtype.base), err_msg=name)
            assert np.all(got[want == 0] == 0), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
        pruned[name] = got
    with torch.no_grad():  # transformers with the bundle's own (pruned, dequantized) weights
        for hf_name, p in model.state_dict().items():
            canon = llama.hf_weight_name(hf_name)
            if canon in pruned:
                p.copy_(torch.from_numpy(pruned[canon]).reshape(p.shape))
        ids = np.random.default_rng(7).integers(3, 256, size=20).tolist()
        ref = model(torch.tensor([ids])).logits[0, -1].float().numpy()
    if quant_ == "f32":
        got = Engine(out, threads=2, max_context=64, kv_type="f32").create_session().prefill(ids)
        np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
    else:  # quantized: what is left is the activations' int8 rounding (near-float with two levels)
        engine = Engine(out, threads=2, max_context=64, kv_type="f32", activations="int8x2")
        s = engine.create_session()
        for got in (engine.create_session().prefill(ids), (s.prefill(ids[:-1]), s.decode(ids[-1]))[1]):
            assert np.abs(got - ref).max() / ref.std() < 0.01
    if quant_ != "f32" and (spec.m == 4 or (spec.m == 0 and quant_ == "int8")):
        # 2:4 in int4 / int8, or >= 50 % in int8: the sparse type wherever the shape allows it
        sparse_type = {"int4": DType.Q4_0_24_X16, "int8": DType.I8_24_X16}[quant_] if spec.m else DType.I8_BITMASK
        sparse = {t.name for t in b.tensors if t.dtype == sparse_type}
        assert sparse == {n for n in pruned if pruning.prunable(n) and b.info(n).shape[1] % 64 == 0}
        assert len(sparse) == 12
        # every kernel variant and layout: in place where the variant has a sparse kernel and the
        # layout asks for it ("auto": where it is the faster one), else expanded at load
        from pocketlm import _core

        want = Engine(out, threads=1, max_context=64, kv_type="f32", activations="int8x2",
                      kernels="ref").create_session().prefill(ids)
        for variant in _core.kernels.available():
            for layout in ("auto", "in-place", "dense"):
                e = Engine(out, threads=2, max_context=64, kv_type="f32", activations="int8x2", kernels=variant,
                           sparse_layout=layout)
                got = e.create_session().prefill(ids)
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (variant, layout)
                s = e.create_session()  # and one-token steps (decode kernels, in place or not)
                s.prefill(ids[:-1])
                got = s.decode(ids[-1])
                assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (variant, layout, "decode")
                # 0 none, 1 in place but slower, 2 faster than dense
                kernel = (_core.kernels.bitmask if sparse_type == DType.I8_BITMASK else _core.kernels.sparse24)(variant)
                in_place = {"auto": kernel == 2, "in-place": kernel > 0, "dense": False}[layout]
                assert e.sparse_expanded == (0 if in_place else 12), (variant, layout)
        with pytest.raises(ValueError, match="sparse_layout"):
            Engine(out, sparse_layout="sparse")


def test_refusals_leave_nothing_behind(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", seed=5, **TINY)
    cal = tmp_path / "cal.txt"
    cal.write_text(CAL_TEXT)
    cases = [
        (dict(quant=None, prune="2:4", prune_method="magnitude"), "pruning needs --quant"),
        (dict(quant="int4", symmetric=False, prune="2:4", prune_method="magnitude"), "symmetric"),
        (dict(quant="f16", prune="2:4"), "calibration text"),
        (dict(quant="f16", prune="2:4", prune_method="magnitude", calibration=cal), "no calibration"),
        (dict(quant="f16", prune="3:4:5", prune_method="magnitude"), "N:M"),
        (dict(quant="f16", prune="2:4", calibration=tmp_path / "missing.txt"), "no such calibration file"),
        (dict(quant="f16", prune="2:64", prune_method="magnitude"), "multiple of 64"),  # 96-wide ffn_down
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            convert(tmp_path / "hf", tmp_path / "x.plm", progress=False, **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "hf"]


def test_cli_prune_and_inspect(tmp_path):
    make_hf_model(tmp_path / "hf", "llama", seed=5, **TINY)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "p.plm", "--quant", "f16", "--prune", "2:4",
            "--prune-method", "magnitude", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", tmp_path / "p.plm")
    assert "pruning" in r.stdout and "pattern=2:4" in r.stdout and "method=magnitude" in r.stdout
    assert "2:4 (50 %)" not in r.stdout  # f16: dense storage
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "s.plm", "--quant", "int4", "--prune", "2:4",
            "--prune-method", "magnitude", "-q")
    assert r.returncode == 0, r.stderr
    r = cli("inspect", tmp_path / "s.plm")
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("blk.0.attn_q.weight"))
    assert "q4_0_24_x16" in row and "2:4 (50 %)" in row and "sparsity" in r.stdout
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "q.plm", "--quant", "f16", "--prune", "2:4", "-q")
    assert r.returncode == 1 and "--calibration" in r.stderr and not (tmp_path / "q.plm").exists()
    r = cli("convert", tmp_path / "hf", "-o", tmp_path / "q.plm", "--quant", "f16", "--prune-method", "wanda", "-q")
    assert r.returncode == 1 and "go with --prune" in r.stderr


def _pruned_at_source(tmp_path, seed: int, spec):
    """A tiny llama whose block weights are pruned by `spec`, saved as a Hugging Face folder tmp_path / "hf"
    with its tokenizer (as published pruned checkpoints are); returns the transformers model."""
    import torch

    from pocketlm.models import llama

    model = make_hf_model(tmp_path / "dense", "llama", seed=seed, **TINY)
    with torch.no_grad():
        for name, p in model.named_parameters():
            canon = llama.hf_weight_name(name)
            if canon is not None and pruning.prunable(canon):
                p.copy_(torch.from_numpy(pruning.prune(p.numpy(), spec)))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    for f in (tmp_path / "dense").iterdir():
        if f.name.startswith("tokenizer"):
            (tmp_path / "hf" / f.name).write_bytes(f.read_bytes())
    return model


def _logits_with_bundle_weights(model, bundle, ids):
    """transformers' last logits for `ids` with every weight as `bundle` holds it (dequantized)."""
    import torch

    from pocketlm.models import llama

    with torch.no_grad():
        for hf_name, p in model.state_dict().items():
            canon = llama.hf_weight_name(hf_name)
            if canon is not None:
                info = bundle.info(canon)
                raw = row_major(bundle, canon) if info.dtype.x16 else np.asarray(bundle.tensor(canon))
                val = quant.dequantize(raw, info.dtype.base, info.shape) if info.dtype.quantized else bundle_f32(bundle, canon)
                p.copy_(torch.from_numpy(val.reshape(p.shape)))
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def test_a_checkpoint_pruned_2_4_at_the_source_is_stored_sparse(tmp_path):
    """A Hugging Face checkpoint whose block weights are already 2:4 (as published pruned models
    are) converts with --quant int4 to the 2:4-sparse type without --prune, runs as transformers
    does with the bundle's weights; --sparse off keeps it dense, with the same values."""
    from pocketlm.engine import Engine
    from pocketlm.models import llama

    model = _pruned_at_source(tmp_path, 8, pruning.PruneSpec(n=2, m=4, method="magnitude"))
    sparse = read_bundle(convert(tmp_path / "hf", tmp_path / "s.plm", quant="int4", progress=False))
    dense = read_bundle(convert(tmp_path / "hf", tmp_path / "d.plm", quant="int4", sparse="off", progress=False))
    assert "pruning" not in sparse.metadata
    s_types = {t.name: t.dtype for t in sparse.tensors}
    assert sum(d == DType.Q4_0_24_X16 for d in s_types.values()) == 12  # all but the 96-wide ffn_down
    assert DType.Q4_0_24_X16 not in {t.dtype for t in dense.tensors}
    source = {llama.hf_weight_name(k): v.numpy() for k, v in model.state_dict().items()
              if llama.hf_weight_name(k) is not None}
    for name, dt in s_types.items():
        if dt == DType.Q4_0_24_X16:  # the source's zeros stay exact, its kept weights quantized as q4_0
            got = quant.dequantize(np.asarray(sparse.tensor(name)), dt, sparse.info(name).shape)
            np.testing.assert_array_equal(np.asarray(sparse.tensor(name)), quant.quantize(source[name], dt))
            assert np.all(got[source[name] == 0] == 0)
    ids = np.random.default_rng(9).integers(3, 256, size=20).tolist()
    ref = _logits_with_bundle_weights(model, sparse, ids)
    got = Engine(tmp_path / "s.plm", threads=2, max_context=64, kv_type="f32", activations="int8x2").create_session().prefill(ids)
    assert np.abs(got - ref).max() / ref.std() < 0.01


def test_a_checkpoint_half_zeros_at_the_source_is_stored_bitmask(tmp_path):
    """A Hugging Face checkpoint whose block weights are 60 % zeros in no pattern converts with
    --quant int8 to i8_bitmask without --prune (--sparse off: dense i8), with the source's zeros
    and the int8 mode's codes, and runs as transformers does with the bundle's weights; int4 has
    no unstructured type and stays dense."""
    from pocketlm.engine import Engine
    from pocketlm.models import llama

    model = _pruned_at_source(tmp_path, 9, pruning.PruneSpec(fraction=0.6, method="magnitude"))
    sparse = read_bundle(convert(tmp_path / "hf", tmp_path / "s.plm", quant="int8", progress=False))
    dense = read_bundle(convert(tmp_path / "hf", tmp_path / "d.plm", quant="int8", sparse="off", progress=False))
    int4 = read_bundle(convert(tmp_path / "hf", tmp_path / "q.plm", quant="int4", progress=False))
    source = {llama.hf_weight_name(k): v.numpy() for k, v in model.state_dict().items()
              if llama.hf_weight_name(k) is not None}
    stored = {t.name for t in sparse.tensors if t.dtype == DType.I8_BITMASK}
    assert stored == {n for n in source if pruning.prunable(n) and source[n].shape[1] % 64 == 0} and len(stored) == 12
    assert DType.I8_BITMASK not in {t.dtype for t in dense.tensors} | {t.dtype for t in int4.tensors}
    for name in stored:
        raw = np.asarray(sparse.tensor(name))
        np.testing.assert_array_equal(raw, quant.quantize(source[name], DType.I8_BITMASK))
        want = quant.dequantize(row_major(dense, name), DType.I8, source[name].shape)
        np.testing.assert_array_equal(quant.dequantize(raw, DType.I8_BITMASK, source[name].shape), want)
    ids = np.random.default_rng(10).integers(3, 256, size=20).tolist()
    ref = _logits_with_bundle_weights(model, sparse, ids)
    for layout in ("auto", "dense"):
        e = Engine(tmp_path / "s.plm", threads=2, max_context=64, kv_type="f32", activations="int8x2",
                   sparse_layout=layout)
        got = e.create_session().prefill(ids)
        assert np.abs(got - ref).max() / ref.std() < 0.01, layout
    r = subprocess.run([sys.executable, "-m", "pocketlm", "inspect", str(tmp_path / "s.plm")], capture_output=True,
                       text=True, timeout=300)
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("blk.0.attn_q.weight"))
    zeros = 100 * (1 - np.count_nonzero(source["blk.0.attn_q.weight"]) / source["blk.0.attn_q.weight"].size)
    assert "i8_bitmask" in row and f"{zeros:.1f} %" in row, row


def test_other_patterns_of_half_zeros_are_stored_bitmask_in_int8(tmp_path):
    """--prune 1:4 (75 % zeros) in int8: no 2:4 type holds it, the bitmask type does; int4 stays dense."""
    make_hf_model(tmp_path / "hf", "llama", seed=5, **TINY)
    b = read_bundle(convert(tmp_path / "hf", tmp_path / "q.plm", quant="int8", prune="1:4", prune_method="magnitude",
                            progress=False))
    stored = {t.name for t in b.tensors if t.dtype == DType.I8_BITMASK}
    assert stored == {t.name for t in b.tensors if pruning.prunable(t.name) and t.shape[1] % 64 == 0} and len(stored) == 12
    for name in stored:  # one kept of every four
        w = quant.dequantize(np.asarray(b.tensor(name)), DType.I8_BITMASK, b.info(name).shape)
        assert np.all(np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1) <= 1)
    b4 = read_bundle(convert(tmp_path / "hf", tmp_path / "q4.plm", quant="int4", prune="1:4", prune_method="magnitude",
                             progress=False))
    assert not any(t.dtype.sparse or t.dtype.bitmask for t in b4.tensors)
