// Prefill GEMM for AVX2 (no VNNI): as gemm_avx512.h with 8 weight rows per ymm, for the
// 4- and 5-bit types (Q4_0/Q4_1 with groups of 32/64/128, Q4_K, Q5_0/Q5_1). kernels_avx2.cpp calls it for
// quantized matmuls with at least kGemmMinTokens tokens.
#pragma once
#include "kernels/kernels.h"

namespace plm::kernels::avx2 {

constexpr int kGemmMinTokens = 4;

bool gemm_supports(DType t);
void gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1);
void gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1);

}  // namespace plm::kernels::avx2
