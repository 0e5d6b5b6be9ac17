"""The metadata shape check reads string literals as a JSON parser does: digits, brackets, commas and
quotes inside a literal (escaped quotes and backslashes included) are not counted as structure, and
everything outside literals is. Reference: json.dumps of the same document with every string (keys
too) replaced by the empty string."""

from __future__ import annotations

import json
import random

import pytest

from pocketlm.metadata import MetadataError, _outside_strings, parse_json_bounded

ALPHABET = ['"', "\\", "\\\\", '\\"', "[", "]", "{", "}", ",", "1" * 50, "a", "é", "\u2028", "\n", "\t", "\x00", "/"]


def _string(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))


def _value(rng: random.Random, depth: int):
    kind = rng.randrange(6 if depth < 4 else 3)
    if kind == 0:
        return _string(rng)
    if kind == 1:
        return rng.choice([0, -7, 12345678901234567890, 1.5e-300, True, False, None])
    if kind == 2:
        return rng.randint(-1000, 1000)
    if kind == 3:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_string(rng): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _dumps_blanked(v) -> str:
    """json.dumps(v) with every string literal, keys included, emptied."""
    if isinstance(v, str):
        return '""'
    if isinstance(v, list):
        return "[" + ", ".join(_dumps_blanked(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join('"": ' + _dumps_blanked(x) for x in v.values()) + "}"
    return json.dumps(v)


@pytest.mark.parametrize("ensure_ascii", [True, False])
def test_outside_strings_against_json_dumps(ensure_ascii):
    rng = random.Random(11)
    for _ in range(2000):
        doc = _value(rng, 0)
        assert _outside_strings(json.dumps(doc, ensure_ascii=ensure_ascii)) == _dumps_blanked(doc)


def test_structure_inside_strings_is_not_counted():
    # 100 brackets deep and 60-digit numbers, all inside literals with escaped quotes around them
    inner = '\\"' + "[" * 100 + "9" * 60 + "\\\\"
    assert parse_json_bounded('{"a": "' + inner + '", "b": [1, 2]}') == {"a": inner.replace('\\"', '"').replace(
        "\\\\", "\\"), "b": [1, 2]}
    # and the same structure outside them is refused
    with pytest.raises(MetadataError, match="nests 101 levels deep"):
        parse_json_bounded('{"a": ' + "[" * 100 + "]" * 100 + "}")
    with pytest.raises(MetadataError, match="more than 40 digits"):
        parse_json_bounded('{"a": "\\\\", "b": ' + "9" * 60 + "}")
