"""Rows for tests/scale: the reference answer of a row (a fresh session, the row alone), and JSONL
files written and read back."""

from __future__ import annotations

import json


def alone(engine, row: dict, max_tokens: int) -> str:
    """The greedy answer of a fresh session to the row alone (its own max_tokens, else `max_tokens`)."""
    session = engine.create_session()
    n = row.get("max_tokens", max_tokens)
    if "messages" in row:
        return "".join(session.chat(row["messages"], max_tokens=n, temperature=0))
    return "".join(session.generate(row["prompt"], max_tokens=n, temperature=0))


def write_jsonl(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
