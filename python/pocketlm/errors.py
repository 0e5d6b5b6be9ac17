"""pocketlm's exceptions. The C++ core raises these too (see csrc/bindings/module.cpp).

Every error pocketlm raises on purpose is a PocketLMError; each subclass also derives from the
built-in exception a caller would have caught before it existed (ValueError, OSError, ...), so
`except ValueError` keeps working. The CLI prints any of them as one line, `pocketlm: error: ...`,
and exits with status 1.

This module must not import pocketlm._core: the extension imports it at start-up.
"""


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


class NonFiniteError(PocketLMError, ArithmeticError):
    """The model produced NaN or infinite logits (broken weights or metadata): no token can be
    chosen from them."""


class ConcurrentUseError(PocketLMError, RuntimeError):
    """One Session was used from two threads at once (each thread needs its own session)."""


class StorageError(PocketLMError, OSError):
    """A file could not be written (disk full, no permission, ...). The message names the path."""
