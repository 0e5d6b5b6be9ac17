"""Speculative decoding (pocketlm.speculative) against plain decoding.

- Greedy: for every architecture family's tiny config (full attention and sliding windows whose rings
  wrap), generations with guesses give the tokens plain decoding gives, token for token, and leave
  the session as plain decoding does (its tokens, and the logits of the next token). Drafters: the
  model itself (every guess kept), another random model with the same tokenizer (most rejected), and
  an oracle that knows plain decoding's answer and spoils it at a random place, so a guess is
  rejected at every index of a step.
- Several generations speculating at once in the scheduler's shared steps.
- Sampling: the rejection scheme against the exact distribution of plain sampling (chi-square).
- Prompt lookup on repetitive and non-repetitive text; the executor's multi-row logits (n_out);
  refusals (another tokenizer, bad draft_max).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from pocketlm import _core
from pocketlm.engine import Engine
from pocketlm.errors import InvalidInputError
from pocketlm.speculative import DraftModel, PromptLookup
from testutil import WINDOWED_ARCHS, make_f32_bundle

WINDOW, CHUNK, CTX = 8, 8, 96
N_NEW = 24


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, windowed_bundle):
    made = {}

    def get(arch, seed=7, **overrides):
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in made:
            if arch in WINDOWED_ARCHS and not overrides:
                made[key] = windowed_bundle(arch, WINDOW)
            else:
                made[key] = make_f32_bundle(tmp_path_factory.mktemp(arch), arch, seed=seed, **overrides)
        return made[key]

    return get


def _engine(path, **kw):
    return Engine(path, threads=2, max_context=CTX, prefill_chunk=CHUNK, kv_type="f32", max_batch=4, **kw)


def _plain(engine, prompt, n=N_NEW, **sampling):
    s = engine.create_session()
    text = "".join(s.generate(prompt, max_tokens=n, temperature=0, **sampling))
    return s, text


def _check_same(spec_engine, plain_engine, prompt, n=N_NEW):
    ref_s, ref_text = _plain(plain_engine, prompt, n)
    s, text = _plain(spec_engine, prompt, n)
    assert text == ref_text
    assert s._tokens == ref_s._tokens  # the session holds what plain decoding leaves
    nxt = 5
    np.testing.assert_allclose(s.decode(nxt), ref_s.decode(nxt), rtol=0, atol=1e-4 * 30)
    return s.last_stats


class Oracle:
    """Guesses plain decoding's next tokens (from a reference run) but spoils one at a random index."""

    def __init__(self, answer_tokens, seed):
        from pocketlm.speculative import CostModel

        self.answer = answer_tokens
        self.rng = np.random.default_rng(seed)
        self.costs = CostModel(prior=0.0)

    def draft(self, entries):
        for gen, tokens, k in entries:
            done = len(tokens) - len(gen.ids)  # generated tokens fed or being fed (x0 included)
            guess = list(self.answer[done:done + k])
            if guess:
                j = int(self.rng.integers(0, len(guess) + 1))  # j == len: no spoiling
                if j < len(guess):
                    guess[j] = (guess[j] + 1) % 300 + 3
            gen.spec.drafts, gen.spec.q = guess, [None] * len(guess)


@pytest.mark.parametrize("arch", ("llama", "gpt2", "gemma") + WINDOWED_ARCHS)
def test_greedy_equals_plain_every_drafter(arch, bundles):
    path = bundles(arch)
    plain = _engine(path)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, n).tolist() for n in (37, 5)]  # 37: the rings wrap during prefill
    # the model as its own draft: every guess is kept
    own = _engine(path, draft=plain, draft_max=7)
    for p in prompts:
        st = _check_same(own, plain, p)
        assert st.draft_tokens > 0 and st.accepted_tokens == st.draft_tokens
    # another random model of the same tokenizer (llama-shaped, smaller): most guesses rejected
    other = _engine(bundles("llama", seed=99, hidden_size=32, intermediate_size=64), draft_max=7)
    spec = _engine(path, draft=other, draft_max=7)
    offered = kept = 0
    for p in prompts:
        st = _check_same(spec, plain, p)
        offered, kept = offered + st.draft_tokens, kept + st.accepted_tokens
    assert offered > kept
    # an oracle that spoils a guess at a random index: rejections at every place of a step
    oracle_engine = _engine(path, lookup=True, draft_max=7)
    for seed, p in enumerate(prompts):
        ref_s, _ = _plain(plain, p)
        oracle_engine.speculator = Oracle(ref_s._tokens[len(p):] + [0] * 8, seed)
        oracle_engine._scheduler = None  # made again, with this speculator
        st = _check_same(oracle_engine, plain, p)
        assert 0 < st.accepted_tokens < st.draft_tokens


def test_speculating_sequences_share_steps(bundles):
    path = bundles("qwen2")
    plain = _engine(path)
    spec = _engine(path, draft=_engine(bundles("llama", seed=99, hidden_size=32, intermediate_size=64)), draft_max=5)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 300, n).tolist() for n in (9, 1, 30, 4)]
    want = [_plain(plain, p)[1] for p in prompts]
    requests = [spec.submit(p, max_tokens=N_NEW, temperature=0) for p in prompts]
    assert [r.result(timeout=60) for r in requests] == want
    assert sum(r.stats.draft_tokens for r in requests) > 0


def _exact_pairs(engine, prompt, **sampling):
    """P(t1, t2) of plain sampling, from the sampler's own distributions."""
    from pocketlm.sampling import Sampler, SamplingParams

    sampler = Sampler(SamplingParams(**sampling), engine.vocab_size)
    s = engine.create_session()
    ids1, p1 = sampler.distribution(s.prefill(prompt), prompt)
    joint = {}
    eos = set(engine.tokenizer.eos_ids)
    for a, pa in zip(ids1.tolist(), p1.tolist()):
        if a in eos:
            joint[a, min(eos)] = joint.get((a, min(eos)), 0.0) + pa
            continue
        c = s.clone()
        ids2, p2 = sampler.distribution(c.decode(a), prompt + [a])
        for b, pb in zip(ids2.tolist(), p2.tolist()):
            b = min(eos) if b in eos else b
            joint[a, b] = joint.get((a, b), 0.0) + pa * pb
    return joint


def test_sampling_keeps_the_distribution(bundles, tmp_path):
    """Speculative sampling's (t1, t2) against plain sampling's exact P(t1, t2): a chi-square test over
    1500 seeds (fixed), cells of expected count >= 5 (the rest pooled), at significance 1e-3."""
    from pocketlm.convert import convert

    path = bundles("llama")
    sampling = dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0, repetition_penalty=1.0)
    # the same model quantized to 4 bits: close to it, not equal, so guesses are kept and rejected
    draft = _engine(convert(path.parent / "hf", tmp_path / "int4.plm", quant="int4", progress=False))
    spec = _engine(path, draft=draft, draft_max=3)
    prompt = [5, 17, 42, 99, 7]
    exact = _exact_pairs(_engine(path), prompt, **sampling)
    n = 1500
    counts: dict = {}
    offered = kept = 0
    eos = set(spec.tokenizer.eos_ids)
    for seed in range(n):
        r = spec.submit(prompt, max_tokens=2, seed=seed, **sampling)
        r.result(timeout=60)
        offered, kept = offered + r.stats.draft_tokens, kept + r.stats.accepted_tokens
        key = tuple(r.token_ids)
        if len(key) < 2:  # an EOS ended it (EOS is not in token_ids)
            key = key + (min(eos),)
        counts[key] = counts.get(key, 0) + 1
    assert offered > kept > 0  # both branches of the scheme ran
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * n >= 5]
    obs = [counts.get(c, 0) for c in big] + [n - sum(counts.get(c, 0) for c in big)]
    exp = [exact[c] * n for c in big] + [n * (1 - sum(exact[c] for c in big))]
    if exp[-1] < 5:  # pool a small remainder into the last cell
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    assert chi2 < _chi2_critical(dof, 1e-3), (chi2, dof, sorted(zip(exp, obs), reverse=True)[:8])


def _chi2_critical(dof: int, alpha: float) -> float:
    """Upper alpha quantile of chi-square(dof) by the Wilson-Hilferty approximation (within ~1 % here)."""
    z = {1e-3: 3.090232}[alpha]
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_prompt_lookup_proposals():
    pl = PromptLookup(max_ngram=3)
    assert pl.propose([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert pl.propose([1, 2, 3, 4, 9, 2, 3, 4, 7, 3, 4], 2) == [7, 3]  # the latest occurrence of "3 4"
    assert pl.propose([1, 2, 3], 4) == []                            # nothing repeats
    assert pl.propose([5, 5], 4) == [5]


def test_prompt_lookup_equals_plain(bundles):
    path = bundles("llama")
    plain = _engine(path)
    spec = _engine(path, lookup=True, draft_max=7)
    rep = [11, 12, 13, 14, 15, 16] * 4
    st = _check_same(spec, plain, rep)
    rng = np.random.default_rng(8)
    _check_same(spec, plain, rng.integers(3, 300, 20).tolist())
    assert st.draft_tokens > 0


@pytest.fixture(scope="module")
def rowmajor_int4(tmp_path_factory):
    """A tiny Llama quantized to int4 whose K/V/gate/up rows (24, 72) are not whole groups of 16: they
    keep the row-major Q4_0 layout, which a step of 4 tokens or more runs through the prefill GEMM."""
    from pocketlm.convert import convert
    from testutil import make_hf_model

    folder = tmp_path_factory.mktemp("rowmajor")
    make_hf_model(folder / "hf", "llama", seed=5, hidden_size=96, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=2048)
    return convert(folder / "hf", folder / "int4.plm", quant="int4", progress=False)


def _check_verified_rows(e: Engine, ids: np.ndarray, contexts) -> None:
    """After each context length ctx of ids, the logits of the next 9 tokens verified in one step
    equal, bit for bit, those of the 9 steps of one token each on a second session."""
    program = e.compiled.program
    for ctx in contexts:
        a, b = e.create_session(), e.create_session()
        a.prefill(ids[:ctx].tolist())
        b.prefill(ids[:ctx].tolist())
        got = _core.run_batch(program, [(a._state, ids[ctx:ctx + 9], ctx, 9)])
        want = np.stack([_core.run_batch(program, [(b._state, ids[ctx + i:ctx + i + 1], ctx + i)])[0] for i in range(9)])
        np.testing.assert_array_equal(got, want)


def test_verified_rows_are_exactly_a_step_of_one(rowmajor_int4):
    """The logits of a token verified among k + 1 rows equal, bit for bit, those of decoding it alone:
    row-major quantized weights (GEMM from 4 tokens) and attention over several 512-position chunks."""
    e = Engine(rowmajor_int4, threads=2, max_context=1200, prefill_chunk=16, lookup=True, draft_max=8)
    ids = np.random.default_rng(2).integers(3, 300, 1120).astype(np.int32)
    _check_verified_rows(e, ids, (5, 1100))  # one attention chunk; three
    plain = Engine(rowmajor_int4, threads=2, max_context=400, prefill_chunk=16)
    oracle_engine = Engine(rowmajor_int4, threads=2, max_context=400, prefill_chunk=16, lookup=True, draft_max=8)
    p = ids[:150].tolist()
    ref_s, ref_text = _plain(plain, p, 40)
    oracle_engine.speculator = Oracle(ref_s._tokens[len(p):] + [0] * 8, 4)
    s, text = _plain(oracle_engine, p, 40)
    assert text == ref_text and s._tokens == ref_s._tokens
    assert 0 < s.last_stats.accepted_tokens < s.last_stats.draft_tokens


@pytest.fixture(scope="module")
def kquant_llama(tmp_path_factory):
    """A tiny Llama from a crafted GGUF whose matmuls are K-quants (Q4_K, Q5_K, Q6_K), kept as they
    are: row-major tiles whose sum order a verifying step must share with a step of one token."""
    craft = str(Path(__file__).resolve().parents[1] / "convert")  # gguf_craft.py, beside the GGUF tests
    if craft not in sys.path:
        sys.path.insert(0, craft)
    from gguf_craft import write_gguf
    from pocketlm.convert import convert
    from testutil import make_hf_model

    root = tmp_path_factory.mktemp("kquant")
    model = make_hf_model(root / "hf", "llama", seed=9, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    types = {"attn_q.weight": "Q4_K", "attn_k.weight": "Q4_K", "attn_v.weight": "Q6_K", "attn_output.weight": "Q5_K",
             "ffn_gate.weight": "Q4_K", "ffn_up.weight": "Q4_K", "ffn_down.weight": "Q6_K", "output.weight": "Q6_K"}
    write_gguf(root / "k.gguf", model, root / "hf", "llama", types)
    return convert(root / "k.gguf", root / "k.plm", progress=False)


def test_verified_kquant_rows_are_exactly_a_step_of_one(kquant_llama):
    """As above for K-quant weights, whose tiles of several tokens are not the tiles of one."""
    e = Engine(kquant_llama, threads=2, max_context=600, prefill_chunk=16)
    _check_verified_rows(e, np.random.default_rng(4).integers(3, 300, 540).astype(np.int32), (5, 530))


def test_run_batch_returns_the_last_rows(bundles):
    e = _engine(bundles("llama"), lookup=True, draft_max=5)
    program = e.compiled.program
    ids = np.array([4, 8, 15, 16, 23, 42], dtype=np.int32)
    a, b = e.create_session(), e.create_session()
    got = _core.run_batch(program, [(a._state, ids, 0, 4)])
    want = np.stack([_core.run_batch(program, [(b._state, ids[i:i + 1], i)])[0] for i in range(ids.size)])[-4:]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    with pytest.raises(ValueError, match="n_out"):
        _core.run_batch(program, [(e.create_session()._state, ids, 0, 7)])
    wide = Engine(bundles("llama"), threads=2, max_context=CTX, prefill_chunk=32, max_batch=2, lookup=True, draft_max=3)
    assert wide.compiled.program.max_seqs == 2 + 2 * 3 < 12
    with pytest.raises(ValueError, match="output rows"):
        _core.run_batch(wide.compiled.program, [(wide.create_session()._state, ids[:4], 0, 4) for _ in range(3)])


def test_refusals(bundles, tmp_path):
    path = bundles("llama")
    with pytest.raises(ValueError, match="choose one"):
        _engine(path, draft=path, lookup=True)
    with pytest.raises(ValueError, match="draft_max"):
        _engine(path, lookup=True, draft_max=CHUNK)
    other_vocab = make_f32_bundle(tmp_path, "llama", seed=1, vocab_size=256)
    with pytest.raises(InvalidInputError, match="tokenizer"):
        DraftModel(_engine(path), _engine(other_vocab))


def test_cli_run_and_bench(bundles, tmp_path):
    import json
    import subprocess
    import sys

    from testutil import child_env

    path = str(bundles("llama"))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "pocketlm", "run", path, "-p", "hello hello hello hello", "-n", "12", "--temp", "0",
         "-c", "96", *extra], capture_output=True, text=True, env=child_env())
    plain, spec = run(), run("--lookup", "--draft-max", "4")
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout and "drafts kept" in spec.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("say it again: one two three\n\nand again: four five six four five six\n")
    r = subprocess.run([sys.executable, "-m", "pocketlm", "bench", path, "--lookup", "-n", "8", "-r", "1", "--json", "-",
                        "-q", "--prompts", str(prompts)], capture_output=True, text=True, env=child_env())
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["same_output"] is True and res["drafter"] == "lookup" and res["prompts"] == 2


def test_best_k():
    from pocketlm.speculative import best_k

    assert best_k(0.76, 0.44, 16) == 2    # Qwen2.5-Coder 0.5B drafting for 1.5B, as measured
    assert best_k(0.76, 0.0, 16) == 16    # free guesses (lookup): as many as allowed
    assert best_k(0.1, 0.44, 16) == 1
    assert best_k(0.95, 0.1, 16) > 8


def test_cost_model():
    from pocketlm.speculative import CostModel, best_k

    c = CostModel(prior=0.3)
    assert c.cost == 0.3 and c.best_k(0.76, 16) == best_k(0.76, 0.3, 16) == 3  # before any step: the prior
    # memory-bound steps: extra rows nearly free -> many guesses
    for rows, secs in [(2, 0.060), (3, 0.061), (5, 0.063)] * 2:
        c.step(rows, secs)
    assert c.best_k(0.9, 16) >= 8
    # compute-bound: each extra row costs 40 % of a step and a guess 25 %: few guesses
    c = CostModel(prior=0.3)
    for rows, secs in [(2, 0.067), (3, 0.093), (4, 0.119), (6, 0.171)] * 2:
        c.step(rows, secs)
    c.guessed(0.016)
    assert c.best_k(0.9, 16) <= 3 and abs(c.cost - (0.016 + 0.026) / (0.067 - 0.026)) < 1e-6


def test_threads_speculating_at_once(bundles):
    """16 threads generate at once on an engine with a draft model (shared draft and verification
    steps, sequences joining and leaving): each text equals plain decoding's, no thread hangs."""
    import threading

    path = bundles("llama")
    plain = _engine(path)
    spec = _engine(path, draft=_engine(bundles("llama", seed=99, hidden_size=32, intermediate_size=64)), draft_max=5)
    rng = np.random.default_rng(12)
    prompts = [rng.integers(3, 300, int(rng.integers(1, 30))).tolist() for _ in range(16)]
    want = [_plain(plain, p, 16)[1] for p in prompts]
    got: list = [None] * len(prompts)
    errors: list = []

    def run(i):
        try:
            got[i] = _plain(spec, prompts[i], 16)[1]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and not errors
    assert got == want


@pytest.mark.parametrize("quant,activations,kernels", [("int4", "int8", ""), ("int4", "int8x2", ""),
                                                      ("int8", "int8x2", ""), ("int4", "int8x2", "avx2"),
                                                      ("int8", "int8", "avx2")])
def test_verified_rows_of_2_4_sparse_weights_are_exactly_a_step_of_one(tmp_path_factory, quant, activations, kernels):
    """2:4-sparse weights (q4_0_24_x16 and i8_24_x16, pruned at conversion) read in place: a verifying
    step of 9 rows gives each row the logits of a one-token step, bit for bit, with one and two
    activation levels, with the best kernels and with AVX2's (x86)."""
    from pocketlm.convert import convert
    from pocketlm.dtypes import DType
    from testutil import make_hf_model

    folder = tmp_path_factory.mktemp("sparse24")
    make_hf_model(folder / "hf", "llama", seed=6, hidden_size=128, intermediate_size=192,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    out = convert(folder / "hf", folder / "s.plm", quant=quant, prune="2:4", prune_method="magnitude",
                  progress=False)
    from pocketlm.bundle import read_bundle

    sparse = DType.Q4_0_24_X16 if quant == "int4" else DType.I8_24_X16
    assert sum(t.dtype == sparse for t in read_bundle(out).tensors) > 0
    if kernels and kernels not in _core.kernels.available():
        pytest.skip(f"no {kernels} kernels on this CPU")
    e = Engine(out, threads=2, max_context=700, prefill_chunk=16, activations=activations, kernels=kernels,
               sparse_layout="in-place")
    assert e.sparse_expanded == 0 or _core.kernels.sparse24(e.kernel_name) == 0
    ids = np.random.default_rng(3).integers(3, 300, 640).astype(np.int32)
    _check_verified_rows(e, ids, (5, 600))
