#!/usr/bin/env bash
# Developer build: incremental CMake build of the extension into python/pocketlm/,
# so that `PYTHONPATH=python` imports it. Serialised with a lock so that several
# shells can call it at once. Usage: scripts/dev-build.sh [Release|Debug]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${POCKETLM_VENV:-$HOME/.cache/pocketlm/venv}"
PY="$VENV/bin/python"
BT="${1:-Release}"
BD="build/dev-$BT"
exec 9>build.lock
flock 9
if [ ! -f "$BD/build.ninja" ]; then
  cmake -S . -B "$BD" -G Ninja -DCMAKE_BUILD_TYPE="$BT" -DPython_EXECUTABLE="$PY" >/dev/null
fi
cmake --build "$BD" -j2
# Swap the module in with a rename: overwriting a loaded .so in place crashes running processes.
for so in "$BD"/_core*.so; do
  cp -f "$so" "python/pocketlm/.$(basename "$so").tmp"
  mv -f "python/pocketlm/.$(basename "$so").tmp" "python/pocketlm/$(basename "$so")"
done
