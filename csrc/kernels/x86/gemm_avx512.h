// Prefill GEMM for AVX-512 VNNI: many tokens against a group of 16 weight rows at a time.
// kernels_avx512.cpp calls it for quantized matmuls with at least kGemmMinTokens tokens;
// below that its per-row tiles are faster (the repack here is paid once per call).
#pragma once
#include "kernels/kernels.h"

namespace plm::kernels::avx512 {

// From 4 tokens on this is faster than the per-row tiles (measured one thread, K=896,
// N=4864, Q4_0 / Q8_0, int8 and int8x2 activations: at T=4 0.72-1.0x their time per token,
// at T=16 0.48-0.53x; at T=2 1.05-1.3x).
constexpr int kGemmMinTokens = 4;

// Same contract as MatmulFn / MatmulFn2. Returns false, having done nothing, for a weight type
// it does not handle or for T < kGemmMinTokens: the caller then runs its per-row tiles.
bool gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1);
bool gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1);

}  // namespace plm::kernels::avx512
