// Software prefetch for the decode (one token) matmul paths of the AVX2 and NEON kernels, and for
// the multi-token (batched decode) passes of the AVX-512 x16 kernel.
//
// Decode streams every weight byte once from memory, in short runs (a tile of a few rows, or one
// row) that the hardware prefetcher barely trains on. Each K iteration of a decode unit therefore
// prefetches its share of the bytes of the unit `ahead` units further on (contiguous when rows
// are), so that those loads are in flight while this unit computes. A K iteration covers a number
// of bytes that is not a multiple of the 64-byte line, so the share is a fractional step:
// iteration i fetches the lines that start in [i*step, (i+1)*step) of the 64-aligned span, every
// line exactly once. Prefetches never fault, so running past the end of the weights is harmless.
// (kernels_avx512.cpp keeps its own variant: whole lines per iteration, tuned separately.)
//
// Each SIMD file compiles this with its own target flags; the anonymous namespace (internal
// linkage) keeps those copies apart.
#pragma once

#include <cstddef>
#include <cstdint>

namespace plm::kernels {
namespace {

// Locality as __builtin_prefetch takes it: 3 = into L1 (decode: the bytes are used at once), 2 = into
// L2 (multi-token tiles: prefetching a whole next group into L1 stalled on the miss buffers).
template <int Locality>
struct PrefetchTo {
  const uint8_t* p = nullptr;  // 64-aligned start of the bytes to fetch for this unit; nullptr: none
  size_t step = 0;             // bytes per K iteration
  inline void at(int64_t i) const {
    if (!p) return;
    const size_t end = (size_t)(i + 1) * step;
    for (size_t o = ((size_t)i * step + 63) & ~(size_t)63; o < end; o += 64) __builtin_prefetch(p + o, 0, Locality);
  }
};
using Prefetch = PrefetchTo<3>;
using PrefetchL2 = PrefetchTo<2>;

// The prefetch for the decode unit (tile or row) starting at `unit`, `unit_bytes` long, over `iters`
// K iterations, fetching the unit `ahead` units further on.
template <int Locality = 3>
inline PrefetchTo<Locality> decode_prefetch(const uint8_t* unit, size_t unit_bytes, int64_t iters, int ahead) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(unit + (size_t)ahead * unit_bytes);
  const size_t lead = a & 63;  // cover the whole first line
  PrefetchTo<Locality> pf;
  pf.p = reinterpret_cast<const uint8_t*>(a - lead);
  pf.step = (unit_bytes + lead + (size_t)iters - 1) / (size_t)iters;
  return pf;
}

}  // namespace
}  // namespace plm::kernels
