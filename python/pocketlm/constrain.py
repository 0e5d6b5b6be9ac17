"""Constrained decoding: output that always matches a JSON schema, a regular expression or a grammar.

At each step the generation's `Constraint` masks the logits to the tokens its grammar allows next (a
bitmask over the vocabulary from llguidance, the library llama.cpp and LiteRT-LM use), the sampler
draws from what is left with the request's own parameters, and the token is fed to the grammar. When
the grammar is complete and admits nothing more the generation ends ("stop"); EOS is allowed only
where the grammar may end. So the text parses, whatever the model would have preferred; only
`max_tokens` or the context can cut it short ("length").

What a generation takes (`Session.generate`, `Engine.submit`, the server's `response_format`):

    response_format={"type": "json_object"}                           any JSON object
    response_format={"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}
    regex=r"\\d{3}-\\d{4}"                                              a regular expression (Rust syntax)
    grammar='start: "yes" | "no"'                                      Lark (llguidance's syntax), or GBNF
                                                                       (llama.cpp's: `root ::= ...`)

The mask is computed in the scheduler's step, for each constrained sequence only (~0.1-1 ms a
token): the other sequences of the step sample as before. Constrained generations do not speculate.
llguidance is an optional dependency (`pip install llguidance`, in the `server` extra).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from pocketlm.errors import ConstraintError  # an InvalidInputError

_lock = threading.Lock()


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("constrained decoding needs llguidance: pip install llguidance "
                                "(or pocketlm[server])") from None
    return llguidance


def _lltokenizer(engine):
    """llguidance's view of the engine's tokenizer (made once per engine: ~0.2 s for 50k tokens)."""
    with _lock:
        tok = getattr(engine, "_lltokenizer", None)
        if tok is None:
            llg = _llguidance()
            t = engine.tokenizer
            tok = llg.LLTokenizer(t.tokenizer_json, n_vocab=engine.vocab_size,
                                  eos_token=list(t.eos_ids) or None)
            engine._lltokenizer = tok
        return tok


def grammar_text(response_format: dict | None = None, regex: str | None = None,
                 grammar: str | None = None) -> str | None:
    """The llguidance grammar for one of the three ways to constrain (None: unconstrained).
    Raises ConstraintError naming what is wrong with the request's shape."""
    given = [name for name, v in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
             if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one of response_format, regex and grammar, not {' and '.join(given)}")
    if regex is not None:
        if not isinstance(regex, str):
            raise ConstraintError("regex must be a string")
        return _convert("regex", regex)
    if grammar is not None:
        if not isinstance(grammar, str):
            raise ConstraintError("grammar must be a string (Lark or GBNF)")
        return _convert("grammar", grammar)
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("response_format must be an object with a 'type'")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar(ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ConstraintError("response_format.json_schema must be an object with a 'schema' object")
        schema = spec.get("schema", {})  # OpenAI: absent means any JSON
        return _json_grammar(schema or {"type": "object"})
    raise ConstraintError(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")


def _convert(kind: str, text: str) -> str:
    try:
        return _llguidance().grammar_from(kind, text)
    except ValueError as e:  # GBNF that does not translate; the matcher checks the rest
        raise ConstraintError(f"the {kind} cannot be used: {e}") from None


# JSON on one line with json.dumps' separators: a grammar that allows any whitespace between tokens lets
# a small model loop on tabs and newlines until max_tokens (seen with SmolLM2). A schema's own
# "x-guidance" options still override these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# Numbers bounded as llama.cpp's JSON grammars bound them, so that a model repeating a digit cannot run
# a number to max_tokens: an integer with no bound of its own gets +-(10^16 - 1), a number 10^15 and
# 9 decimal places (multipleOf 1e-9). Every output still validates against the schema as given.
MAX_INTEGER = 10**16 - 1
MAX_NUMBER = 10**15
NUMBER_STEP = 1e-9
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "unevaluatedProperties",
               "unevaluatedItems", "propertyNames")


# json_object: any object, its numbers bounded as above (a bare {"type": "object"} would leave the
# numbers of its values unbounded).
ANY_OBJECT = {
    "$defs": {"value": {"anyOf": [
        {"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
        {"type": "array", "items": {"$ref": "#/$defs/value"}},
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}]}},
    "type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}


def bounded_numbers(schema: Any) -> Any:
    """A copy of `schema` whose integers and numbers have bounds on their digits (above)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    types = out.get("type")
    types = set(types) if isinstance(types, list) else {types}
    if "integer" in types or "number" in types:
        limit = MAX_INTEGER if "number" not in types else MAX_NUMBER
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -limit
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = limit
        if "number" in types and "multipleOf" not in out:
            out["multipleOf"] = NUMBER_STEP
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [bounded_numbers(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: bounded_numbers(s) for k, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if key in out:
            out[key] = [bounded_numbers(s) for s in out[key]] if isinstance(out[key], list) \
                else bounded_numbers(out[key])
    return out


def _json_grammar(schema: dict) -> str:
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(json.dumps(bounded_numbers(schema)), defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as e:
        raise ConstraintError(f"the JSON schema cannot be used: {e}") from None


class Constraint:
    """One generation's grammar state: the mask of the tokens allowed next, and the tokens taken."""

    def __init__(self, engine, grammar: str):
        llg = _llguidance()
        self.vocab_size = engine.vocab_size
        self.matcher = llg.LLMatcher(_lltokenizer(engine), grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(f"the constraint cannot be used: {self.matcher.get_error()}")
        self._mask = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)

    @property
    def finished(self) -> bool:
        """The grammar is complete and admits no further token."""
        return self.matcher.is_stopped()

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf. Raises ConstraintError
        if the grammar allows none (it failed: a limit, or a state it cannot leave)."""
        m = self.matcher
        m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little", count=self.vocab_size).view(bool)
        if m.is_error() or not allowed.any():
            raise ConstraintError(f"the constraint failed: {m.get_error() or 'no token is allowed'}")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise ConstraintError(f"the constraint refused token {token}: {self.matcher.get_error()}")


def make_constraint(engine, response_format: dict | None = None, regex: str | None = None,
                    grammar: str | None = None) -> Constraint | None:
    text = grammar_text(response_format, regex, grammar)
    return None if text is None else Constraint(engine, text)
