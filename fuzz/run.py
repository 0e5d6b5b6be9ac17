"""atheris entry point: `python fuzz/run.py TARGET [libFuzzer options] [corpus dirs]` (scripts/fuzz.sh
passes the options). TARGET is a key of targets.TARGETS; pocketlm and jinja2 are instrumented for
coverage (the C++ core is not: scripts/fuzz.sh reader fuzzes it natively)."""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["pocketlm", "jinja2"]):
    import pocketlm.bundle  # noqa: F401
    import pocketlm.chat  # noqa: F401
    import pocketlm.chat_sandbox  # noqa: F401
    import pocketlm.convert  # noqa: F401
    import pocketlm.engine  # noqa: F401
    import pocketlm.generation  # noqa: F401
    import pocketlm.kv_cache  # noqa: F401
    import pocketlm.scheduler  # noqa: F401
    import pocketlm.session  # noqa: F401
    import pocketlm.session_file  # noqa: F401
    import pocketlm.signing  # noqa: F401
    import pocketlm.store  # noqa: F401
    import pocketlm.store.plmfile  # noqa: F401
    import pocketlm.server.app  # noqa: F401
    import pocketlm.server.ollama_api  # noqa: F401
    import pocketlm.server.openai_api  # noqa: F401

import targets  # noqa: E402


def main() -> None:
    target = sys.argv.pop(1)
    check, mutate = targets.TARGETS[target]
    atheris.Setup(sys.argv, check, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
