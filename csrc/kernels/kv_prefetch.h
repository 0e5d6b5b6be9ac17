// Prefetch of attention's KV rows, for the SIMD kernels' scores and P.V loops (each SIMD file
// compiles this with its own target flags; the anonymous namespace keeps those copies apart).
#pragma once

#include <cstddef>
#include <cstdint>

namespace plm::kernels {
namespace {

// Attention reads each sequence's run of KV rows (head_dim values, or their Q8_0 blocks) once per
// layer and step, from memory when many sequences share a step: rows are prefetched this many
// ahead of their use (AVX-512, 8 sequences at ~300 positions: the P.V and score loops had waited
// on these loads; with it a batched decode step took 8 % less time).
constexpr int kKvRowsAhead = 24;

// Prefetches row p + kKvRowsAhead of a run of n rows, `ldr` bytes apart from `base`, its bytes
// [off, off + bytes): every 64-byte line they touch. Nothing past the run's last row. The address
// is computed as an integer, never as a pointer past the buffer.
inline void prefetch_kv_row(const void* base, size_t ldr, int64_t p, int64_t n, size_t off, size_t bytes) {
  if (p + kKvRowsAhead >= n) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(base) + (uintptr_t)(p + kKvRowsAhead) * ldr + off;
  for (uintptr_t line = a & ~(uintptr_t)63; line < a + bytes; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 3);
}

}  // namespace
}  // namespace plm::kernels
