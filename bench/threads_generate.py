"""Many callers on one engine: N threads each calling Session.generate at once, against the same N
calls one after another (the scheduler batches the concurrent ones into shared steps).

    python bench/threads_generate.py [MODEL] [--callers 8] [-n 32] [-t 2] [-r 5] [--chat] [--json FILE]

Each round runs both, alternating which goes first; the prompts are N different openings of a text
given to Session.generate (--chat: N different questions as chat requests, Session.chat, which
renders the model's chat template around them: SmolLM2's adds a system prompt, ~30 more tokens
each), greedy, up to n tokens each (the tokens generated are reported: EOS ends a call early). Reports the wall time of each and the ratio sequential / concurrent (median
over rounds, and the range), and checks that both produced the same texts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

# Text to continue (plain generate): openings an instruct model continues rather than ends at once.
OPENINGS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the printing press begins",
    "To make a simple tomato soup, first",
    "The water cycle is the continuous movement of water",
    "In the middle of the night, the old lighthouse keeper",
    "A bicycle stays upright because",
    "The seasons on Earth are caused by",
    "Honeybees live in colonies where",
    "A refrigerator keeps food cold by",
    "Autumn leaves turn red and yellow because",
    "Photosynthesis is the process by which",
    "A prime number is a whole number that",
    "The market was busy that morning:",
    "Airplanes fly because their wings",
    "For a weekend hike, you should pack",
    "Learning a new language is easier when",
]

QUESTIONS = [
    "Describe the water cycle in a few sentences.",
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "What are the main causes of the seasons on Earth?",
    "Give me a recipe for a simple tomato soup.",
    "Why is the sky blue? Explain it to a child.",
    "List some tips for learning a new language.",
    "Describe the life of a honeybee.",
    "How does a refrigerator keep food cold?",
    "Write a poem about autumn leaves.",
    "What is photosynthesis and why does it matter?",
    "Explain what a prime number is, with examples.",
    "Describe a busy market in the morning.",
    "How do airplanes fly?",
    "What should I pack for a weekend hike?",
    "Tell me about the history of the printing press.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--callers", type=int, default=8, help="threads calling generate at once")
    ap.add_argument("-n", type=int, default=32, help="tokens per call (greedy)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="engine threads")
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("--chat", action="store_true", help="send the questions through the chat template")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not 1 <= a.callers <= len(QUESTIONS):
        ap.error(f"--callers must be in 1..{len(QUESTIONS)}")

    from pocketlm.engine import Engine

    engine = Engine(a.model, threads=a.threads, max_batch=max(a.callers, 1))
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[:a.callers]]

    def one(i: int) -> str:
        session = engine.create_session()
        if a.chat:
            return "".join(session.chat(chats[i], max_tokens=a.n, temperature=0))
        return "".join(session.generate(OPENINGS[i], max_tokens=a.n, temperature=0))

    def sequential() -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        out = [one(i) for i in range(a.callers)]
        return time.perf_counter() - t0, out

    def concurrent() -> tuple[float, list[str]]:
        out: list[str | None] = [None] * a.callers

        def work(i):
            out[i] = one(i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(a.callers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0, out

    tokens = 0
    for i in range(a.callers):  # warm-up, and the tokens each call generates
        session = engine.create_session()
        if a.chat:
            "".join(session.chat(chats[i], max_tokens=a.n, temperature=0))
        else:
            "".join(session.generate(OPENINGS[i], max_tokens=a.n, temperature=0))
        tokens += session.last_stats.generated_tokens
    concurrent()
    seq_s, con_s, same = [], [], True
    for r in range(a.rounds):
        order = (sequential, concurrent) if r % 2 == 0 else (concurrent, sequential)
        res = {fn.__name__: fn() for fn in order}
        seq_s.append(res["sequential"][0])
        con_s.append(res["concurrent"][0])
        same &= res["sequential"][1] == res["concurrent"][1]
        print(f"round {r + 1}/{a.rounds}: sequential {seq_s[-1]:.3f} s, concurrent {con_s[-1]:.3f} s, "
              f"ratio {seq_s[-1] / con_s[-1]:.2f}x", file=sys.stderr)
    ratios = [s / c for s, c in zip(seq_s, con_s)]
    result = {"model": a.model, "callers": a.callers, "n": a.n, "chat": a.chat, "generated_tokens": tokens,
              "threads": engine.threads,
              "kernels": engine.kernel_name, "sequential_s_median": statistics.median(seq_s),
              "concurrent_s_median": statistics.median(con_s), "ratio_median": statistics.median(ratios),
              "ratio_min": min(ratios), "ratio_max": max(ratios), "same_texts": same,
              "sequential_s": seq_s, "concurrent_s": con_s}
    print(f"{a.callers} callers x {a.n} tokens ({tokens} generated in all), {engine.threads} threads ({engine.kernel_name}): sequential "
          f"{result['sequential_s_median']:.3f} s, concurrent {result['concurrent_s_median']:.3f} s, "
          f"{result['ratio_median']:.2f}x faster (range {min(ratios):.2f}-{max(ratios):.2f}x over {a.rounds} "
          f"rounds); same texts: {same}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
