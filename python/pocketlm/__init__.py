"""pocketlm: on-device LLM inference on CPUs."""

from pocketlm.errors import (
    BundleError,
    ContextOverflowError,
    ConversionError,
    PocketLMError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "ContextOverflowError",
    "ConversionError",
    "Engine",
    "PocketLMError",
    "UnsupportedModelError",
    "__version__",
]


def __getattr__(name):
    # Lazy so that `import pocketlm` stays cheap and the converter works without the engine.
    if name in ("Engine", "Session"):
        from pocketlm import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'pocketlm' has no attribute {name!r}")
