// Matmuls of the row-interleaved x16 weight types (common.h) for AVX2 + FMA + F16C, and AVX-VNNI
// (dot_avx2.h: one source, a namespace per variant), any token count.
#pragma once
#include "kernels/kernels.h"
#include "kernels/x86/dot_avx2.h"

namespace plm::kernels::PLM_AVX2_NS {

// MatmulFn / MatmulFn2 for Q8_0_X16, Q4_0_X16, Q4_1_X16, I8_X16, Q5_0_X16, Q5_1_X16 and the
// group-64/128 Q4 types Q4_0_G64_X16 .. Q4_1_G128_X16 (dispatching on w.dtype).
void matmul_x16(const WeightView& w, const float* x, size_t ldx, const BlockQ8A* xq, int T, float* y,
                size_t ldy, int n0, int n1);
void matmul2_x16(const WeightView& w, const float* x, size_t ldx, const BlockQ8A2* xq, int T, float* y,
                 size_t ldy, int n0, int n1);

}  // namespace plm::kernels::PLM_AVX2_NS
