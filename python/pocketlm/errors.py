"""pocketlm's exceptions. The C++ core raises these too (see csrc/bindings/module.cpp).

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
