// Prefetch of attention's KV rows, for the SIMD kernels' scores and P.V loops (each SIMD file
// compiles this with its own target flags; the anonymous namespace keeps those copies apart).
#pragma once

#include <cstddef>

namespace plm::kernels {
namespace {

// Attention reads each sequence's run of KV rows (head_dim values, or their Q8_0 blocks) once per
// layer and step, from memory when many sequences share a step: rows are prefetched this many
// ahead of their use (AVX-512, 8 sequences at ~300 positions: the P.V and score loops had waited
// on these loads; with it a batched decode step took 8 % less time). A prefetch past the last
// row reads nothing useful and never faults.
constexpr int kKvRowsAhead = 24;
inline void prefetch_span(const void* p, size_t bytes) {
  for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + o, 0, 3);
}

}  // namespace
}  // namespace plm::kernels
