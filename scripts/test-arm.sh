#!/usr/bin/env bash
# The ARM kernels, tested on this x86 machine under emulation: cross-compiles the kernel tests'
# server (tests/kernels/kernel_server.cpp with the scalar reference and every NEON level) for
# aarch64, statically, and runs tests/kernels against it under qemu-aarch64 once per emulated CPU:
#   cortex-a53  ARMv8.0: ref, neon
#   cortex-a76  ARMv8.2 + dotprod: ref, neon, dotprod
#   max         every feature QEMU has: ref, neon, dotprod, i8mm
# (tests/kernels/test_arm_dispatch.py checks that each CPU offers exactly those). Needs Debian's
# qemu-user-static and g++-aarch64-linux-gnu (installed here when run as root). Builds into
# $POCKETLM_CACHE/arm (default ~/.cache/pocketlm/arm). Extra arguments go to pytest.
#
# --e2e instead runs pocketlm itself on aarch64 (tests/arm/test_aarch64.py: tiny models and the real
# SmolLM2 answer against this machine's build, every ARM variant forced in turn): an arm64 Debian
# root extracted by mmdebstrap (python3, numpy, jinja2; no package scripts run), the tokenizers wheel
# for aarch64 from PyPI, and the extension cross-compiled by CMake against that root's Python.
# Usage: scripts/test-arm.sh [--e2e] [-k expr]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(cd "${POCKETLM_VENV:-.venv}" && pwd)"
OUT="${POCKETLM_CACHE:-$HOME/.cache/pocketlm}/arm"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
CXX=aarch64-linux-gnu-g++
. scripts/apt-install.sh
if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  apt_install --no-install-recommends qemu-user-static g++-aarch64-linux-gnu || true
  if ! command -v "$CXX" >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    echo "scripts/test-arm.sh: needs qemu-user-static and g++-aarch64-linux-gnu (Debian packages)" >&2
    exit 1
  fi
fi
E2E=0
if [ "${1:-}" = "--e2e" ]; then E2E=1; shift; fi
if [ "$E2E" = 1 ]; then
  ROOT="$OUT/rootfs"
  if [ ! -x "$ROOT/usr/bin/python3" ]; then
    command -v mmdebstrap >/dev/null || apt_install --no-install-recommends mmdebstrap ||
      { echo "scripts/test-arm.sh: --e2e needs mmdebstrap (a Debian package)" >&2; exit 1; }
    echo "extracting an arm64 Debian root with python3, numpy and jinja2 ..." >&2
    rm -rf "$ROOT" "$ROOT.tar" "$ROOT.tmp"
    mmdebstrap --quiet --variant=extract --arch=arm64 --include=python3,python3-numpy,python3-jinja2,python3-dev \
      bookworm "$ROOT.tar"
    mkdir -p "$ROOT.tmp" && tar -C "$ROOT.tmp" -xf "$ROOT.tar" && rm "$ROOT.tar"
    # what update-alternatives would have linked (package scripts do not run in an extract)
    ln -sf blas/libblas.so.3 "$ROOT.tmp/usr/lib/aarch64-linux-gnu/libblas.so.3"
    ln -sf lapack/liblapack.so.3 "$ROOT.tmp/usr/lib/aarch64-linux-gnu/liblapack.so.3"
    mv "$ROOT.tmp" "$ROOT"
  fi
  PKG="$OUT/pkg"
  TOKENIZERS="$("$VENV/bin/python" -c 'import tokenizers; print(tokenizers.__version__)')"
  if ! ls "$OUT"/wheels/tokenizers-"$TOKENIZERS"-*aarch64*.whl >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip download -q --platform manylinux2014_aarch64 --python-version 3.11 \
      --only-binary=:all: --no-deps "tokenizers==$TOKENIZERS" \
      -d "$OUT/wheels"
  fi
  echo "building pocketlm for aarch64 ..." >&2
  cmake -S . -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_SYSTEM_NAME=Linux \
    -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER="$CXX" -DPython_EXECUTABLE="$VENV/bin/python" \
    -DPython_INCLUDE_DIR="$ROOT/usr/include/python3.11" "-DCMAKE_CXX_FLAGS=-idirafter $ROOT/usr/include" >/dev/null
  cmake --build "$OUT/build" -j2 >/dev/null
  rm -rf "$PKG" && mkdir -p "$PKG"
  cp -r python/pocketlm "$PKG/" && rm -f "$PKG"/pocketlm/_core*.so
  cp "$OUT"/build/_core*.so "$PKG/pocketlm/_core.cpython-311-aarch64-linux-gnu.so"
  cp csrc/runtime/ops.def "$PKG/pocketlm/ir/"
  (cd "$PKG" && "$VENV/bin/python" -m zipfile -e "$OUT"/wheels/tokenizers-"$TOKENIZERS"-*aarch64*.whl .)
  cd tests
  PLM_ARM_PYTHON="qemu-aarch64-static -cpu max -L $(printf %q "$ROOT") $(printf %q "$ROOT/usr/bin/python3")" \
    PLM_ARM_PKG="$PKG" \
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider arm "$@"
fi
FLAGS=(-O2 -std=c++17 -Icsrc -DPLM_ARM=1 -Wall -Wextra -Wno-unused-parameter)
# everything the server is built from, and the compiler: a change to any rebuilds it
stamp="$({ cat tests/kernels/kernel_server.cpp csrc/common.h scripts/test-arm.sh; find csrc/kernels -type f | sort |
           xargs cat; $CXX --version; } | sha256sum | cut -c1-16)"
if [ ! -x "$OUT/kernel_server-$stamp" ]; then
  echo "building the aarch64 kernel server ..." >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  pids=()
  $CXX "${FLAGS[@]}" -c csrc/kernels/arm/kernels_neon.cpp -o "$tmp/neon.o" & pids+=($!)
  $CXX "${FLAGS[@]}" -DPLM_NEON_LEVEL=1 -march=armv8.2-a+dotprod -c csrc/kernels/arm/kernels_neon.cpp \
    -o "$tmp/dotprod.o" & pids+=($!)
  $CXX "${FLAGS[@]}" -DPLM_NEON_LEVEL=2 -march=armv8.2-a+dotprod+i8mm -c csrc/kernels/arm/kernels_neon.cpp \
    -o "$tmp/i8mm.o" & pids+=($!)
  $CXX "${FLAGS[@]}" -c csrc/kernels/ref/kernels_ref.cpp -o "$tmp/ref.o" & pids+=($!)
  $CXX "${FLAGS[@]}" -c csrc/kernels/dispatch.cpp -o "$tmp/dispatch.o" & pids+=($!)
  $CXX "${FLAGS[@]}" -c tests/kernels/kernel_server.cpp -o "$tmp/server.o" & pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid"; done  # set -e: a failed compile stops here
  $CXX -static "$tmp"/*.o -o "$tmp/kernel_server"
  rm -f "$OUT"/kernel_server-*
  mv "$tmp/kernel_server" "$OUT/kernel_server-$stamp"
fi
cd tests
status=0
for cpu in cortex-a53 cortex-a76 max; do
  echo "== tests/kernels on aarch64 ($cpu, qemu-aarch64) ==" >&2
  PLM_TEST_KERNELS="qemu-aarch64-static -cpu $cpu $(printf %q "$OUT/kernel_server-$stamp")" PLM_TEST_ARM_CPU="$cpu" \
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider kernels "$@" || status=1
done
exit $status
