"""Does the default repetition penalty cost correct code? pass@1 of small Python functions, sampled
with the model's defaults, with the penalty at 1.0 and at 1.1: each answer's first ```python block
runs in a fresh interpreter (5 s limit) with the prompt's asserts.

    python bench/code_penalty.py [MODEL] [-n 5] [--settings 'rep=1.0;rep=1.1']
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from pocketlm import Engine  # noqa: E402

TASKS = [
    ("is_prime(n) that returns True if the integer n is a prime number",
     "assert is_prime(2) and is_prime(97) and not is_prime(1) and not is_prime(91) and not is_prime(0)"),
    ("fib(n) that returns the n-th Fibonacci number, with fib(0) == 0 and fib(1) == 1",
     "assert fib(0) == 0 and fib(1) == 1 and fib(10) == 55 and fib(20) == 6765"),
    ("reverse_words(s) that returns the words of the string s in reverse order, separated by single spaces",
     "assert reverse_words('hello big world') == 'world big hello' and reverse_words('a') == 'a'"),
    ("count_vowels(s) that returns how many of the characters of s are vowels (a, e, i, o, u, either case)",
     "assert count_vowels('Hello World') == 3 and count_vowels('xyz') == 0 and count_vowels('AEIOU') == 5"),
    ("flatten(xs) that flattens a list of lists into one list, in order",
     "assert flatten([[1, 2], [3], []]) == [1, 2, 3] and flatten([]) == []"),
    ("gcd(a, b) that returns the greatest common divisor of two positive integers",
     "assert gcd(12, 18) == 6 and gcd(7, 13) == 1 and gcd(100, 10) == 10"),
    ("is_palindrome(s) that returns True if s reads the same backwards, ignoring case",
     "assert is_palindrome('Racecar') and is_palindrome('abba') and not is_palindrome('abc')"),
    ("factorial(n) that returns n! for an integer n >= 0",
     "assert factorial(0) == 1 and factorial(5) == 120 and factorial(10) == 3628800"),
    ("max_subarray(nums) that returns the largest sum of a contiguous non-empty subarray of nums",
     "assert max_subarray([-2, 1, -3, 4, -1, 2, 1, -5, 4]) == 6 and max_subarray([-3, -1]) == -1"),
    ("to_snake(name) that converts a camelCase name to snake_case",
     "assert to_snake('helloWorld') == 'hello_world' and to_snake('parseHttpResponse') == 'parse_http_response'"),
]


def passes(answer: str, check: str) -> bool:
    m = re.search(r"```(?:python|py)?\n(.*?)```", answer, re.S)
    code = m.group(1) if m else answer
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code + "\n\n" + check + "\n")
    try:
        return subprocess.run([sys.executable, f.name], capture_output=True, timeout=5).returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        Path(f.name).unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("-n", type=int, default=5, help="seeds per task")
    ap.add_argument("--settings", default="rep=1.0;rep=1.1")
    a = ap.parse_args()
    engine = Engine(a.model, threads=2, prefix_cache_mb=0)
    for setting in a.settings.split(";"):
        penalty = float(setting.split("=")[1])
        ok = total = 0
        for task, check in TASKS:
            messages = [{"role": "user", "content": f"Write a Python function {task}. Reply with the code only."}]
            for seed in range(a.n):
                s = engine.create_session()
                answer = "".join(s.chat(messages, max_tokens=384, seed=seed, repetition_penalty=penalty))
                ok += passes(answer, check)
                total += 1
        print(f"{setting}: {ok}/{total} pass ({100 * ok / total:.0f} %)", flush=True)


if __name__ == "__main__":
    main()
