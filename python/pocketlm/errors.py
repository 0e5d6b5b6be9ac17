"""pocketlm's exceptions. The C++ core raises these too (see csrc/bindings/module.cpp).

Every error pocketlm raises on purpose is a PocketLMError; each subclass also derives from the
built-in exception a caller would have caught before it existed (ValueError, OSError, ...), so
`except ValueError` keeps working. The CLI prints any of them as one line, `pocketlm: error: ...`,
and exits with status 1. `shown` quotes a value read from a file in such a message, shortened.

This module must not import pocketlm._core: the extension imports it at start-up.
"""

import reprlib


class PocketLMError(Exception):
    """Base class of every error pocketlm raises on purpose."""


class BundleError(PocketLMError, ValueError):
    """A .plm bundle (or a source model file) is missing, truncated, corrupt or malformed."""


class UnsupportedModelError(PocketLMError, ValueError):
    """The model's architecture, tensor type or feature is not supported."""


class ContextOverflowError(PocketLMError, ValueError):
    """The prompt plus the requested tokens do not fit in the session's context."""


class ConversionError(PocketLMError):
    """A source checkpoint could not be converted."""


class ChatTemplateError(PocketLMError):
    """The chat template is invalid, too costly to render, or failed (possibly on purpose, via
    raise_exception) while rendering."""


class InvalidInputError(PocketLMError, ValueError):
    """A prompt, message or request parameter that cannot be used: text that is not valid
    Unicode, an empty prompt where a token is needed, a parameter out of range."""


class ConstraintError(InvalidInputError):
    """A response_format, regex or grammar that cannot constrain a generation (malformed, or beyond
    what llguidance supports), or a constraint that failed while generating."""


class SessionFileError(PocketLMError, ValueError):
    """A session file that cannot be loaded: not one, truncated or corrupt (a checksum), or saved from
    another model, KV type or context shape."""


class NonFiniteError(PocketLMError, ArithmeticError):
    """The model produced NaN or infinite logits (broken weights or metadata): no token can be
    chosen from them."""


class ConcurrentUseError(PocketLMError, RuntimeError):
    """One Session was used from two threads at once (each thread needs its own session)."""


class StorageError(PocketLMError, OSError):
    """A file could not be written (disk full, no permission, ...). The message names the path."""


class QueueFullError(PocketLMError, RuntimeError):
    """The engine's request queue is full (Engine(max_queue=...)): retry later. A server answers
    it with 503 / 429."""



# -- quoting values from files in messages ---------------------------------------------------------------------

SHOWN_CHARS = 80  # the default length of a value quoted in a message

_REPR = reprlib.Repr()  # containers: their first entries, nested 3 deep, at bounded cost
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset, _REPR.maxfrozenset = 3, 6, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = SHOWN_CHARS


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`value` quoted for an error message (its repr), shortened past `limit` characters.

    A value read from a hostile file (a name, a key, a config entry, a template's message) may be
    megabytes long, and a message must stay one readable line. A string keeps its first `limit`
    characters and says how long it was; an array or object shows its first entries and how many
    there were; any other value is cut like a string."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        text = _REPR.repr(value)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(value)} entries)"
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's 4300-digit limit on conversion to text
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
