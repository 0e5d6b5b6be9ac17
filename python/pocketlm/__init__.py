"""pocketlm: on-device LLM inference on CPUs."""

from pocketlm.errors import (
    BundleError,
    ChatTemplateError,
    ConcurrentUseError,
    ConstraintError,
    ContextOverflowError,
    ConversionError,
    InvalidInputError,
    NonFiniteError,
    PocketLMError,
    QueueFullError,
    SessionFileError,
    StorageError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ChatTemplateError",
    "ConcurrentUseError",
    "ConstraintError",
    "ContextOverflowError",
    "ConversionError",
    "Engine",
    "InvalidInputError",
    "NonFiniteError",
    "PocketLMError",
    "QueueFullError",
    "SessionFileError",
    "Request",
    "Session",
    "StorageError",
    "UnsupportedModelError",
    "__version__",
]


def __getattr__(name):
    # Lazy so that `import pocketlm` stays cheap and the converter works without the engine.
    if name == "Engine":
        from pocketlm.engine import Engine

        return Engine
    if name == "Request":
        from pocketlm.scheduler import Request

        return Request
    if name == "Session":
        from pocketlm.session import Session

        return Session
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
