// Q4_0_24_X16 (2:4-sparse 4-bit weights, common.h) for AVX-512 VNNI; uses VBMI where the CPU has it.
#pragma once
#include "kernels/kernels.h"

namespace plm::kernels::avx512 {

// MatmulFn for Q4_0_24_X16, any token count and row range.
void matmul_sparse24(const WeightView& w, const float* x, size_t ldx, const BlockQ8A* xq, int T, float* y,
                     size_t ldy, int n0, int n1);

// True where the CPU has AVX-512 VBMI (vpermb, vpmultishiftqb), which matmul_sparse24's own kernel needs.
bool sparse24_native();

}  // namespace plm::kernels::avx512
