"""Context shift (on_overflow="shift", keep=N): the kept tokens stay, the oldest after them leave, the
rest move down with their cached keys re-rotated (State.kv_shift).

The reference for a shift is a fresh session fed the kept + remaining tokens at their new positions:
the first layer's keys and values depend only on each token and its position, so they must equal that
session's (f32, 1e-4) for every architecture, sliding-window rings included; a one-layer model's next
logits must equal its logits too. Then: decoding goes on forever in bounded memory, a re-rendered
conversation still continues after a shift, a shifted session saves and loads, and a ring's rewind
after a shift answers as one of the two sessions it may be equal to.
"""

from __future__ import annotations

import numpy as np
import pytest

from pocketlm import ContextOverflowError, Engine, UnsupportedModelError
from testutil import make_f32_bundle, make_windowed_bundle

DENSE = ("llama", "qwen2", "phi3", "gemma")
RINGED = ("mistral", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, windowed_bundle):
    made = {}
    for arch in DENSE:
        made[arch] = make_f32_bundle(tmp_path_factory.mktemp(arch), arch, seed=3)
        made[arch, 1] = make_f32_bundle(tmp_path_factory.mktemp(arch + "1"), arch, seed=4, num_hidden_layers=1)
    made["gpt2"] = make_f32_bundle(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=3)
    for arch in RINGED:
        made[arch] = windowed_bundle(arch, 8)
    for arch in ("mistral", "gemma2"):  # one sliding-window layer
        made[arch, 1] = make_windowed_bundle(tmp_path_factory.mktemp(arch + "1"), arch, 8, num_hidden_layers=1)
    return made


def layer_kv(session, layer: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """{position: K row [kv_heads, head_dim]} and the same for V, of the positions the session's cache
    holds in `layer` (f32 caches), read from State.kv_export's packing."""
    cache, state = session.kv_cache, session._state
    cfg = session.engine.config
    heads, dh = cfg["n_kv_heads"], cfg["head_dim"]
    data = state.kv_export(cache.end).view(np.float32)
    caps = [int(c) for c in state.kv_capacities]
    off = 0
    for l, cap in enumerate(caps):
        used = min(cache.end, cap)
        k = data[off:off + heads * used * dh].reshape(heads, used, dh)
        off += heads * used * dh
        v = data[off:off + heads * used * dh].reshape(heads, used, dh)
        off += heads * used * dh
        if l == layer:
            break
    floor = 0
    for (c, _), f in zip(cache.rings, cache.floors):
        if c == cap:
            floor = f
    low = max(0, cache.end - cap, floor)
    held = range(low, cache.valid)
    return ({p: k[:, p % cap] for p in held}, {p: v[:, p % cap] for p in held})


def assert_first_layer_equal(shifted, fresh):
    ks, vs = layer_kv(shifted, 0)
    kf, vf = layer_kv(fresh, 0)
    both = sorted(set(ks) & set(kf))
    assert both and both[-1] == shifted.position - 1
    for p in both:
        np.testing.assert_allclose(ks[p], kf[p], rtol=1e-4, atol=1e-4, err_msg=f"K at position {p}")
        np.testing.assert_allclose(vs[p], vf[p], rtol=1e-4, atol=1e-4, err_msg=f"V at position {p}")


@pytest.mark.parametrize("arch", DENSE + RINGED)
@pytest.mark.parametrize("discard", [1, 7, None])
def test_shift_equals_a_fresh_session_of_the_kept_and_remaining_tokens(bundles, arch, discard):
    engine = Engine(bundles[arch], threads=2, kv_type="f32", max_context=40, prefill_chunk=4)
    rng = np.random.default_rng(11)
    tokens = rng.integers(3, 300, 70).tolist()
    s = engine.create_session(on_overflow="shift", keep=4, discard=discard)
    s.prefill(tokens[:30])
    for t in tokens[30:]:  # decode past the context: shifts happen on the way
        s.decode(t)
    assert s.evicted_tokens > 0 and s.position <= 40
    assert s.history == tokens and s.tokens == tokens[:4] + tokens[4 + s.evicted_tokens:]
    fresh = engine.create_session()
    fresh.prefill(s.tokens)
    assert_first_layer_equal(s, fresh)


@pytest.mark.parametrize("arch", DENSE)
def test_one_layer_model_next_logits_equal_a_fresh_session(bundles, arch):
    engine = Engine(bundles[arch, 1], threads=2, kv_type="f32", max_context=32, prefill_chunk=8)
    rng = np.random.default_rng(12)
    tokens = rng.integers(3, 300, 50).tolist()
    s = engine.create_session(on_overflow="shift", keep=3)
    s.prefill(tokens[:32])
    for t in tokens[32:]:
        logits = s.decode(t)
        fresh = engine.create_session()
        np.testing.assert_allclose(logits, fresh.prefill(s.tokens), rtol=1e-4, atol=1e-4)
    assert s.evicted_tokens > 0


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
@pytest.mark.parametrize("discard", [1, 30, None])
def test_one_ring_layer_next_logits_equal_a_fresh_session(bundles, arch, discard):
    """A sliding window after a shift reads the moved positions (and never the kept ones its ring has
    dropped): decode shifts of every size, and a prompt that needs more room than the window leaves
    (the cache is then fed again), each answer as a fresh session fed the tokens the cache holds."""
    engine = Engine(bundles[arch, 1], threads=2, kv_type="f32", max_context=40, prefill_chunk=4)
    rng = np.random.default_rng(16)
    tokens = rng.integers(3, 300, 80).tolist()
    s = engine.create_session(on_overflow="shift", keep=4, discard=discard)
    s.prefill(tokens[:36])
    for t in tokens[36:60]:
        logits = s.decode(t)
        np.testing.assert_allclose(logits, engine.create_session().prefill(s.tokens), rtol=1e-4, atol=1e-4)
    logits = s.prefill(tokens[60:80] + tokens[:14])  # 34 at once: more than a window-safe shift frees
    np.testing.assert_allclose(logits, engine.create_session().prefill(s.tokens), rtol=1e-4, atol=1e-4)
    assert s.evicted_tokens > 0


def test_f16_cache_shifts_close_to_f32(bundles):
    rng = np.random.default_rng(13)
    tokens = rng.integers(3, 300, 60).tolist()
    out = {}
    for kv_type in ("f32", "f16"):
        engine = Engine(bundles["llama"], threads=2, kv_type=kv_type, max_context=32)
        s = engine.create_session(on_overflow="shift", keep=4, discard=5)
        s.prefill(tokens[:20])
        out[kv_type] = np.stack([s.decode(t) for t in tokens[20:]])
    np.testing.assert_allclose(out["f16"], out["f32"], atol=0.05)


def test_generation_goes_on_in_bounded_memory(bundles):
    engine = Engine(bundles["qwen2"], threads=2, max_context=48)
    capped = engine.create_session()
    list(capped.generate([5, 6, 7, 8], max_tokens=200, temperature=0))
    assert capped.last_stats.finish_reason == "context" and capped.last_stats.generated_tokens < 48
    s = engine.create_session(on_overflow="shift", keep=4)
    kv_full = s.kv_cache.used_bytes(48)
    list(s.generate([5, 6, 7, 8], max_tokens=200, temperature=0))
    st = s.last_stats
    assert st.finish_reason == "length" and st.generated_tokens == 200
    assert s.position <= 48 and s.kv_bytes <= kv_full and s.evicted_tokens >= 200 + 4 - 48
    assert s.history[:4] == [5, 6, 7, 8] and len(s.history) == 4 + 199
    # the text it streamed is what it holds: the greedy tokens before the shift are the capped session's
    assert s.history[:capped.position] == capped.tokens


def test_speculative_draft_follows_the_shift(bundles):
    target = Engine(bundles["llama"], threads=2, max_context=40, draft=str(bundles["llama"]), draft_max=3)
    plain = Engine(bundles["llama"], threads=2, max_context=40)
    outs = []
    for engine in (target, plain):
        s = engine.create_session(on_overflow="shift", keep=4)
        outs.append("".join(s.generate([5, 6, 7, 8, 9], max_tokens=120, temperature=0)))
        assert s.evicted_tokens > 0
    assert outs[0] == outs[1]  # the same tokens, shift for shift
    # the draft's session shifted alike (it did not start over), and its guesses were taken
    s = target.create_session(on_overflow="shift", keep=4)
    list(s.generate([5, 6, 7, 8, 9], max_tokens=120, temperature=0))
    drafts = target.speculator._session_for(s)
    assert drafts.evicted_tokens > 0 and drafts.history[:len(drafts.tokens)] == s.history[:len(drafts.tokens)]
    assert s.last_stats.accepted_tokens > 0


def test_a_rerendered_conversation_continues_after_a_shift(bundles):
    engine = Engine(bundles["qwen2"], threads=2, max_context=96)
    s = engine.create_session(on_overflow="shift", keep=8)
    messages = [{"role": "system", "content": "be brief"}]
    shifted = 0
    for turn in range(8):
        messages.append({"role": "user", "content": f"question number {turn} about cats and dogs"})
        before = s.evicted_tokens
        # words, so that the reply's text re-tokenizes (not always into the tokens generated)
        reply = "".join(s.chat(messages, max_tokens=30, temperature=0.8, seed=turn, regex=r"[a-z]+( [a-z]+)*"))
        messages.append({"role": "assistant", "content": reply})
        st = s.last_stats
        if before:  # only the new turn was fed: the conversation so far was found in the history
            text = engine.apply_chat_template(messages[:-1], add_generation_prompt=True)
            assert len(engine.tokenizer.encode(text, add_special_tokens=False)) > s.max_context
            # fed after what it reused (the whole conversation would not fit: its middle would be cut)
            assert st.reused_tokens > 8 and st.reused_tokens + st.prompt_tokens <= s.max_context
            shifted += 1
    assert shifted >= 2
    # a reply that would re-tokenize apart from what was generated, inside the evicted part: the
    # text of the history is continued
    seen = engine.tokenizer.decode(s.history, skip_special_tokens=False)
    assert s._text_continuation(seen + " and more") == s.tokens + engine.tokenizer.encode(" and more",
                                                                                          add_special_tokens=False)
    assert s._text_continuation("something else") is None


def test_prompt_and_keep_limits(bundles):
    engine = Engine(bundles["llama"], threads=2, max_context=32)
    s = engine.create_session(on_overflow="shift", keep=4)
    # a prompt longer than the context: its middle never enters the cache, the history keeps it
    list(s.generate(list(range(3, 60)), max_tokens=1, temperature=0))
    assert s.tokens == list(range(3, 7)) + list(range(60 - 14, 60)) and s.history == list(range(3, 60))
    expected = engine.create_session().prefill(s.tokens + [70])
    np.testing.assert_allclose(s.prefill([70]), expected, rtol=1e-5, atol=1e-5)
    s.reset()
    with pytest.raises(ContextOverflowError, match="after the 4"):
        s.prefill(list(range(3, 33)) + [40, 41, 42])  # 33 tokens in one call: never fit
    assert s.position == 0
    s.prefill(list(range(3, 30)))
    s.prefill(list(range(40, 50)))  # shifts to make room
    assert s.position <= 32 and s.tokens[:4] == [3, 4, 5, 6] and s.tokens[-10:] == list(range(40, 50))
    with pytest.raises(ValueError, match="keep"):
        engine.create_session(on_overflow="shift", keep=32)
    with pytest.raises(ValueError, match="on_overflow"):
        engine.create_session(on_overflow="truncate")
    with pytest.raises(ValueError, match="cannot shift"):
        s.shift(s.position)
    gpt2 = Engine(bundles["gpt2"], threads=2, max_context=32)
    with pytest.raises(UnsupportedModelError, match="no rotary position"):
        gpt2.create_session(on_overflow="shift")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_shifted_session_saves_and_loads(bundles, arch, tmp_path):
    engine = Engine(bundles[arch], threads=2, max_context=40, prefill_chunk=4)
    rng = np.random.default_rng(14)
    s = engine.create_session(on_overflow="shift", keep=4, discard=9)
    s.prefill(rng.integers(3, 300, 36).tolist())
    for t in rng.integers(3, 300, 12).tolist():
        s.decode(t)
    assert s.evicted_tokens > 0
    s.save(tmp_path / "s.plms")
    b = engine.load_session(tmp_path / "s.plms")
    assert (b.tokens, b.history, b.keep, b.on_overflow) == (s.tokens, s.history, 4, "shift")
    assert b.kv_cache.floors == s.kv_cache.floors
    for t in rng.integers(3, 300, 15).tolist():  # on through more shifts, alike
        np.testing.assert_array_equal(b.decode(t), s.decode(t))


@pytest.mark.parametrize("arch", RINGED)
def test_rewind_after_a_shift_answers_as_a_held_or_a_fresh_cache(bundles, arch):
    """A ring's floor after a shift says what it still holds: a rewind it allows must answer as the
    shifted session did; one it refuses re-feeds the tokens, as a fresh session fed them."""
    engine = Engine(bundles[arch], threads=2, kv_type="f32", max_context=40, prefill_chunk=4)
    rng = np.random.default_rng(15)
    base = engine.create_session(on_overflow="shift", keep=4, discard=13)
    base.prefill(rng.integers(3, 300, 38).tolist())
    for t in rng.integers(3, 300, 4).tolist():
        base.decode(t)
    assert base.evicted_tokens > 0
    tail = rng.integers(3, 300, 5).tolist()
    for back in range(1, 12):
        s = base.clone()
        s.prefill(tail)
        expected_held = s.clone()
        expected_held.rewind(s.position - back)
        held = expected_held.kv_cache.valid == expected_held.position
        again = s.tokens[-back:]
        s.rewind(s.position - back)
        logits = s.prefill(again)
        if held:
            ref = base.clone()
            ref_logits = ref.prefill(tail)
            np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
        else:
            fresh = engine.create_session()
            np.testing.assert_allclose(logits, fresh.prefill(s.tokens), rtol=1e-4, atol=1e-4)
