#!/usr/bin/env bash
# Builds llama.cpp's tools (the peer of bench/compare.py) from the llama-cpp-python sdist on PyPI,
# into a cache outside the repository. Idempotent: a second run only prints the paths.
#
#   bench/build_llamacpp.sh            # ~10-15 min on 2 cores the first time
#   LLAMACPP_PY_VERSION=0.3.36 LLAMACPP_CACHE=~/.cache/pocketlm/llama.cpp bench/build_llamacpp.sh
#   LLAMACPP_ISA=avx2 bench/build_llamacpp.sh   # a second build, into build-avx2/, as on a CPU without
#                                               # AVX-512 or AVX-VNNI (AVX2+FMA+F16C+BMI2): the peer of
#                                               # `bench/compare.py --isa avx2` on an AVX-512 machine
#
# Layout of the cache:
#   sdist/llama_cpp_python-<v>.tar.gz   the source as downloaded (pip download --no-binary :all:)
#   llama_cpp_python-<v>/               the extracted sdist
#   src -> llama_cpp_python-<v>/vendor/llama.cpp   convert_hf_to_gguf.py, gguf-py/, models/ggml-vocab-*
#   build/bin/                          llama-bench, llama-batched-bench, llama-perplexity, llama-quantize,
#                                       llama-completion, llama-speculative, llama-server
#   build-avx2/bin/                     the same tools built for AVX2 only (LLAMACPP_ISA=avx2)
#   VERSION                             the pinned llama-cpp-python version that was built
set -euo pipefail

VERSION="${LLAMACPP_PY_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$HOME/.cache/pocketlm/llama.cpp}"
VENV="${POCKETLM_VENV:-$HOME/.cache/pocketlm/venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || PY="$(command -v python3)"
JOBS="${JOBS:-2}"
ISA="${LLAMACPP_ISA:-native}"
case "$ISA" in
  native) BUILD=build; ISA_FLAGS=(-DGGML_NATIVE=ON) ;;
  # Every x86 extension past AVX2 off, so ggml's compile-time choice matches an AVX2-only laptop.
  avx2) BUILD=build-avx2
        ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                   -DGGML_BMI2=ON -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF
                   -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF) ;;
  *) echo "LLAMACPP_ISA must be native or avx2, not '$ISA'" >&2; exit 2 ;;
esac
# llama-completion is the plain prompt -> text tool; llama-server the peer of bench/serve_load.py.
TARGETS=(llama-bench llama-batched-bench llama-perplexity llama-quantize llama-completion llama-speculative
         llama-server)

mkdir -p "$CACHE/sdist"
cd "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

built() {
  for t in "${TARGETS[@]}"; do [ -x "$BUILD/bin/$t" ] || return 1; done
  [ "$(cat "$BUILD/VERSION" 2>/dev/null || cat VERSION 2>/dev/null)" = "$VERSION" ]
}

if built; then
  echo "llama.cpp (llama-cpp-python $VERSION) already built in $CACHE/$BUILD/bin" >&2
else
  sdist="sdist/llama_cpp_python-$VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    # An sdist fetched earlier by someone else on this machine saves a 75 MB download.
    shared="$HOME/.cache/pocketlm/llama-cpp-python-sdist/llama_cpp_python-$VERSION.tar.gz"
    if [ -f "$shared" ]; then
      cp "$shared" "$sdist"
    else
      "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
    fi
  fi
  if [ ! -d "llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
    tar xzf "$sdist"
  fi
  ln -sfn "llama_cpp_python-$VERSION/vendor/llama.cpp" src

  # Option names checked against this version's CMakeLists: LLAMA_CURL is gone (LLAMA_OPENSSL
  # replaced it); static libraries so the binaries run from anywhere without LD_LIBRARY_PATH; the
  # examples for llama-speculative (only the TARGETS are built).
  # Configure from the real path, not through the `src` symlink: the sdist's submodule .git file
  # points at ../../.git, which ninja would resolve lexically through the symlink to a missing file
  # and re-run CMake forever ("manifest 'build.ninja' still dirty").
  real_src="$(cd "llama_cpp_python-$VERSION/vendor/llama.cpp" && pwd -P)"
  if ! grep -q "CMAKE_HOME_DIRECTORY:INTERNAL=$real_src\$" "$BUILD/CMakeCache.txt" 2>/dev/null; then
    rm -rf "$BUILD"
  fi
  start=$(date +%s)
  cmake -S "$real_src" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release "${ISA_FLAGS[@]}" -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        $(command -v ninja >/dev/null && echo -G Ninja)
  cmake --build "$BUILD" -j"$JOBS" --target "${TARGETS[@]}"
  echo "$VERSION" > "$BUILD/VERSION"
  [ "$BUILD" = build ] && echo "$VERSION" > VERSION
  echo "built in $(( $(date +%s) - start )) s" | tee "$BUILD/build-time.txt" >&2
fi

echo "binaries:           $CACHE/$BUILD/bin  (${TARGETS[*]})"
echo "convert_hf_to_gguf: $CACHE/src/convert_hf_to_gguf.py  (uses $CACHE/src/gguf-py)"
echo "vocab test files:   $CACHE/src/models/ggml-vocab-*.gguf (+ .inp / .out)"
