"""Session invariants on a tiny f32 model: what generate() streams equals a plain argmax /
sampling loop over prefill/decode; cached prefixes give what a fresh session gives."""

from __future__ import annotations

import numpy as np
import pytest

from testutil import make_hf_model
from pocketlm import ContextOverflowError
from pocketlm.convert import convert
from pocketlm.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = tmp_path_factory.mktemp("sess")
    make_hf_model(d / "hf", "qwen2", seed=11)
    return Engine(convert(d / "hf", d / "m.plm", quant="f32", progress=False), threads=2, max_context=96,
                  prefill_chunk=16)


def greedy_ids(engine, ids, n):
    s = engine.create_session()
    logits = s.prefill(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = s.decode(t)
    return out


def test_generate_streams_the_greedy_tokens(engine):
    ids = engine.tokenizer.encode("To be, or not to be")
    expected = engine.tokenizer.decode(greedy_ids(engine, ids, 20), skip_special_tokens=True)
    s = engine.create_session()
    pieces = list(s.generate(ids, max_tokens=20, temperature=0))
    assert "".join(pieces) == expected
    assert s.last_stats.generated_tokens == 20 and s.last_stats.finish_reason == "length"
    assert s.position == len(ids) + 19  # the last sampled token is not fed back


def test_prefix_reuse_equals_fresh_session(engine):
    s = engine.create_session()
    first = "".join(s.generate("The quick brown fox", max_tokens=6, temperature=0))
    follow = engine.tokenizer.encode("The quick brown fox") + s.tokens[len(engine.tokenizer.encode("The quick brown fox")):]
    follow += engine.tokenizer.encode(" jumps over")
    again = "".join(s.generate(follow, max_tokens=8, temperature=0))
    assert s.last_stats.reused_tokens > 0 and s.last_stats.prompt_tokens < len(follow)
    fresh = "".join(engine.create_session().generate(follow, max_tokens=8, temperature=0))
    assert again == fresh and first


def test_diverging_prompt_rewinds(engine):
    s = engine.create_session()
    s.prefill(engine.tokenizer.encode("alpha beta gamma delta"))
    other = engine.tokenizer.encode("alpha beta zeta")
    got = "".join(s.generate(other, max_tokens=8, temperature=0))
    assert got == "".join(engine.create_session().generate(other, max_tokens=8, temperature=0))


def test_stop_strings_cut_the_stream(engine):
    full = "".join(engine.create_session().generate("Numbers 0123", max_tokens=30, temperature=0))
    assert len(full) > 6
    stop = full[3:6]
    cut = "".join(engine.create_session().generate("Numbers 0123", max_tokens=30, temperature=0, stop=[stop]))
    assert cut == full[:full.find(stop)]


def test_seeded_sampling_is_reproducible(engine):
    a = "".join(engine.create_session().generate("def add", max_tokens=16, temperature=1.0, seed=7))
    b = "".join(engine.create_session().generate("def add", max_tokens=16, temperature=1.0, seed=7))
    assert a == b


def test_context_limits(engine):
    s = engine.create_session()
    with pytest.raises(ContextOverflowError, match="context"):
        s.prefill(list(range(97)))
    with pytest.raises(ContextOverflowError):
        list(s.generate(list(range(1, 98)), max_tokens=4))
    # generation that runs into the end of the context stops cleanly
    list(s.generate(list(range(1, 90)), max_tokens=50, temperature=0))
    assert s.last_stats.finish_reason == "context" and s.position == 96


def test_reset_and_rewind(engine):
    s = engine.create_session()
    ids = engine.tokenizer.encode("hello world, hello")
    a = s.prefill(ids)
    s.reset()
    assert s.position == 0
    b = s.prefill(ids)
    s.rewind(3)
    c = s.prefill(ids[3:])
    assert np.array_equal(a, b) and np.abs(a - c).max() < 1e-5


def test_chat_renders_template_and_streams(engine):
    msgs = [{"role": "user", "content": "hi"}]
    text = engine.apply_chat_template(msgs)
    assert text.endswith("<|im_start|>assistant\n")
    assert isinstance("".join(engine.chat(msgs, max_tokens=5, temperature=0)), str)


def test_score_matches_step_by_step_logprobs(engine):
    ids = engine.tokenizer.encode("The lighthouse keeper climbed the spiral stairs every evening at dusk.")
    assert len(ids) > 20
    s = engine.create_session(logits="all")
    lp = s.score(ids[:12])
    lp2 = s.score(ids[12:])  # continues the same context
    assert np.isnan(lp[0]) and not np.isnan(lp2[0])
    got = np.concatenate([lp[1:], lp2])
    ref = []
    g = engine.create_session()
    logits = g.prefill(ids[:1])
    for t in ids[1:]:
        z = logits.astype(np.float64)
        ref.append(z[t] - z.max() - np.log(np.exp(z - z.max()).sum()))
        logits = g.decode(t)
    assert np.abs(got - np.array(ref)).max() < 1e-4
    with pytest.raises(ValueError, match="logits"):
        engine.create_session().score(ids)


def penalized_greedy_ids(engine, ids, n, penalty, last_n=64):
    """Argmax after transformers' RepetitionPenaltyLogitsProcessor over the last `last_n` tokens
    (prompt included, as llama.cpp's penalty window)."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    proc = RepetitionPenaltyLogitsProcessor(penalty)
    s = engine.create_session()
    logits = s.prefill(ids)
    seen, out = list(ids), []
    for _ in range(n):
        window = torch.tensor([seen[-last_n:]])
        t = int(proc(window, torch.from_numpy(np.array(logits, np.float32))[None])[0].argmax())
        out.append(t)
        seen.append(t)
        logits = s.decode(t)
    return out


def test_the_default_repetition_penalty_is_for_sampling(engine, tmp_path):
    """The checkpoint gives no sampling settings, so the bundle carries the measured default penalty
    (1.1) for sampling. Greedy decoding (temperature 0) stays the model's argmax unless a penalty
    is asked for; asked for, it is transformers' penalty before the argmax. A checkpoint's own
    penalty applies to greedy decoding too, as transformers applies it."""
    import json

    g = engine.generation_defaults
    assert g["repetition_penalty"] == 1.1 and g["greedy_repetition_penalty"] == 1.0
    ids = engine.tokenizer.encode("the the the the the")
    plain = greedy_ids(engine, ids, 24)
    penalized = penalized_greedy_ids(engine, ids, 24, 1.1)
    assert plain != penalized  # the prompt is one the penalty changes
    s = engine.create_session()
    list(s.generate(ids, max_tokens=24, temperature=0))
    assert s.last_text_ids[-24:] == plain
    list(s.generate(ids, max_tokens=24, temperature=0, repetition_penalty=1.1))
    assert s.last_text_ids[-24:] == penalized
    make_hf_model(tmp_path / "hf", "qwen2", seed=11)  # the same model, with a penalty of its own
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1}))
    own = Engine(convert(tmp_path / "hf", tmp_path / "own.plm", quant="f32", progress=False), threads=2,
                 max_context=96, prefill_chunk=16)
    assert "greedy_repetition_penalty" not in own.generation_defaults
    s = own.create_session()
    list(s.generate(ids, max_tokens=24, temperature=0))
    assert s.last_text_ids[-24:] == penalized
