// Prefill GEMM for AVX2 and AVX-VNNI (dot_avx2.h: one source, a namespace per variant): as
// gemm_avx512.h with 8 weight rows per ymm, for every row-major quantized type (Q8_0, I8, Q4_0/Q4_1
// with groups of 32/64/128, Q5_0/Q5_1, Q4_K, Q5_K, Q6_K). kernels_avx2.cpp calls it for quantized
// matmuls with at least kGemmMinTokens tokens.
#pragma once
#include "kernels/kernels.h"
#include "kernels/x86/dot_avx2.h"

namespace plm::kernels::PLM_AVX2_NS {

constexpr int kGemmMinTokens = 4;

// Same contract as MatmulFn / MatmulFn2. Returns false, having done nothing, for a weight type
// it does not handle or for T < kGemmMinTokens: the caller then runs its per-row tiles.
bool gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1);
bool gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1);

}  // namespace plm::kernels::PLM_AVX2_NS
