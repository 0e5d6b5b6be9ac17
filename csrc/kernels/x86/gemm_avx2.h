// Prefill GEMM for AVX2 (no VNNI): as gemm_avx512.h with 8 weight rows per ymm, for the
// 4- and 5-bit types (Q4_0/Q4_1 with groups of 32/64/128, Q4_K, Q5_0/Q5_1). kernels_avx2.cpp calls it for
// quantized matmuls with at least kGemmMinTokens tokens.
#pragma once
#include "kernels/kernels.h"

namespace plm::kernels::avx2 {

constexpr int kGemmMinTokens = 4;

// Same contract as MatmulFn / MatmulFn2. Returns false, having done nothing, for a weight type
// it does not handle or for T < kGemmMinTokens: the caller then runs its per-row tiles.
bool gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1);
bool gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1);

}  // namespace plm::kernels::avx2
