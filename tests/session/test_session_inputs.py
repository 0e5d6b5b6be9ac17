"""Edge inputs of the session API (issue 10, item 8): empty prompts, max_tokens=0, a str stop,
max_context rules, and one session driven from two threads. Each is compared with what the same
request gives through the plain path (a fresh session, a list of stop strings, explicit ids)."""

from __future__ import annotations

import threading

import pytest
from pocketlm.bundle import read_bundle
from pocketlm.engine import Engine
from pocketlm.errors import ConcurrentUseError, ContextOverflowError, InvalidInputError
from testutil import make_f32_bundle, rewrite_bundle

CTX = 96


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_f32_bundle(tmp_path_factory.mktemp("inputs"), "llama", seed=8, name="m.plm")


@pytest.fixture(scope="module")
def engine(bundle):
    return Engine(bundle, threads=1, max_context=CTX, prefill_chunk=16)


@pytest.fixture(scope="module")
def engine_without_bos(bundle, tmp_path_factory):
    special = read_bundle(bundle).metadata["special_tokens"]
    path = rewrite_bundle(bundle, tmp_path_factory.mktemp("nobos") / "nobos.plm",
                          special_tokens={**special, "bos_id": None, "add_bos": False})
    return Engine(path, threads=1, max_context=CTX, prefill_chunk=16)


class _GatedState:
    """Stands in for a session's _core.State: counts tokens run, and can hold a run() until released."""

    def __init__(self, state):
        self.state, self.tokens_run = state, 0
        self.kv_capacities = state.kv_capacities
        self.entered, self.release = threading.Event(), threading.Event()
        self.release.set()

    def run(self, tokens, pos):
        self.tokens_run += len(tokens)
        self.entered.set()
        assert self.release.wait(30)
        return self.state.run(tokens, pos)


def greedy(engine, prompt, n=10, **kw):
    return "".join(engine.create_session().generate(prompt, max_tokens=n, temperature=0, **kw))


# ---- empty prompts -----------------------------------------------------------------------------

def test_empty_text_prompt_starts_from_bos(engine):
    bos = engine.tokenizer.bos_id
    assert bos is not None and engine.tokenizer.encode("") == []
    s = engine.create_session()
    got = "".join(s.generate("", max_tokens=10, temperature=0))
    assert got == greedy(engine, [bos]) and s.tokens[0] == bos


def test_empty_prompt_without_bos_is_invalid_input(engine, engine_without_bos):
    with pytest.raises(InvalidInputError, match="empty prompt"):
        list(engine_without_bos.generate(""))
    for e in (engine, engine_without_bos):
        s = e.create_session()
        with pytest.raises(InvalidInputError, match="empty prompt"):
            list(s.generate([]))
        s.prefill([5, 6, 7])  # a session with history: [] is still nothing to start from
        with pytest.raises(InvalidInputError, match="empty prompt"):
            list(s.generate([]))
        assert s.tokens == [5, 6, 7]


def test_bad_token_ids_are_invalid_input_and_change_nothing(engine):
    s = engine.create_session()
    s.prefill([5, 6, 7])
    for bad in ([5, 6, -1], [5, engine.vocab_size], [5, 1.5], ["a"]):
        with pytest.raises(InvalidInputError):
            list(s.generate(bad))
        with pytest.raises(InvalidInputError):
            s.prefill(bad)
    assert s.tokens == [5, 6, 7]


# ---- max_tokens=0, stop as a str -------------------------------------------------------------------

def test_max_tokens_zero_does_no_work(engine):
    s = engine.create_session()
    s.prefill([5, 6, 7, 8])
    gated = s._state = _GatedState(s._state)
    assert list(s.generate("The quick brown fox", max_tokens=0)) == []
    assert gated.tokens_run == 0 and s.tokens == [5, 6, 7, 8]  # no prefill, no rewind
    assert s.last_stats.prompt_tokens == 0 and s.last_stats.generated_tokens == 0
    with pytest.raises(InvalidInputError, match="max_tokens"):
        list(s.generate("x", max_tokens=-1))


def test_a_str_stop_is_one_stop_string(engine):
    prompt = "To be, or not"
    full = greedy(engine, prompt, 30)
    # A stop string some of whose characters occur before it: stopping on each character would cut earlier.
    stop = next(full[i:i + 3] for i in range(1, len(full) - 3)
                if full.find(full[i:i + 3]) == i and min(full.find(c) for c in full[i:i + 3]) < i)
    got = greedy(engine, prompt, 30, stop=stop)
    assert got == greedy(engine, prompt, 30, stop=[stop]) == full[:full.find(stop)]
    with pytest.raises(InvalidInputError, match="stop"):
        greedy(engine, prompt, 30, stop=[1, 2])


# ---- max_context ---------------------------------------------------------------------------------

def test_max_context_rules(engine):
    assert engine.create_session().max_context == CTX
    assert engine.create_session(max_context=None).max_context == CTX
    assert engine.create_session(max_context=CTX).max_context == CTX
    assert engine.create_session(max_context=1).max_context == 1
    for bad in (0, -5):
        with pytest.raises(InvalidInputError, match="at least 1"):
            engine.create_session(max_context=bad)
    for bad in ("64", 64.0, True):
        with pytest.raises(InvalidInputError, match="integer"):
            engine.create_session(max_context=bad)
    for big in (CTX + 1, 2**31, 2**70):
        with pytest.raises(ContextOverflowError, match=f"{big}.*{CTX}"):
            engine.create_session(max_context=big)


# ---- one session, two threads ---------------------------------------------------------------------

def test_second_thread_gets_concurrent_use_error_while_generate_runs(engine):
    prompt = "The quick brown fox"
    want = greedy(engine, prompt, 12)
    s = engine.create_session()
    first_piece, go_on = threading.Event(), threading.Event()
    result = {}

    def consumer():
        pieces = []
        for piece in s.generate(prompt, max_tokens=12, temperature=0):
            pieces.append(piece)
            first_piece.set()
            assert go_on.wait(30)
        result["text"] = "".join(pieces)

    a = threading.Thread(target=consumer)
    a.start()
    assert first_piece.wait(30)
    errors = []

    def intruder():
        for call in (lambda: s.prefill([5]), lambda: s.decode(5), lambda: s.rewind(0), s.reset,
                     lambda: list(s.generate("hello", max_tokens=3)), lambda: s.forward([5])):
            try:
                call()
            except ConcurrentUseError as e:
                errors.append(str(e))

    b = threading.Thread(target=intruder)
    b.start()
    b.join(30)
    go_on.set()
    a.join(30)
    assert len(errors) == 6 and all("generate()" in e for e in errors)
    assert result["text"] == want  # the intruder changed nothing
    assert list(s.generate(prompt, max_tokens=0)) == []  # free again


def test_second_thread_gets_concurrent_use_error_during_prefill(engine):
    s = engine.create_session()
    gated = s._state = _GatedState(s._state)
    gated.release.clear()
    a = threading.Thread(target=lambda: s.prefill([5, 6, 7]))
    a.start()
    assert gated.entered.wait(30)  # thread a is inside the executor call
    with pytest.raises(ConcurrentUseError, match="prefill"):
        s.decode(9)
    gated.release.set()
    a.join(30)
    assert s.tokens == [5, 6, 7]
    s.decode(9)
    assert s.tokens == [5, 6, 7, 9]


def test_an_unfinished_generator_holds_the_session_until_closed(engine):
    s = engine.create_session()
    g = s.generate("The quick brown fox", max_tokens=20, temperature=0)
    next(g)
    with pytest.raises(ConcurrentUseError, match="unfinished generator"):
        s.prefill([5])
    g.close()
    s.rewind(0)
    for _ in s.generate("The quick brown fox", max_tokens=20, temperature=0):
        break  # a loop left early drops its generator, which closes it
    s.rewind(0)
    with pytest.raises(ContextOverflowError):  # an error inside generate frees the session too
        list(s.generate(list(range(3, CTX + 5))))
    assert s.prefill([5]).shape == (engine.vocab_size,)


def test_sessions_of_one_engine_run_in_threads_at_once(engine):
    """Sessions share the engine's weights and program, not their state: four threads, each with
    its own session, give what the same prompts give one after another."""
    prompts = ["The quick brown fox", "Once upon a time", "hello world", "a b c d e f"]
    want = ["".join(engine.create_session().generate(p, max_tokens=16, temperature=0)) for p in prompts]
    got: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        s = engine.create_session()
        start.wait(30)
        got[i] = "".join(s.generate(prompts[i], max_tokens=16, temperature=0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got.get(i) for i in range(len(prompts))] == want
