// The 2:4-sparse types (Q4_0_24_X16, I8_24_X16; common.h) for AVX2 + FMA + F16C, and AVX-VNNI
// (dot_avx2.h: one source, a namespace per variant).
#pragma once
#include "kernels/kernels.h"
#include "kernels/x86/dot_avx2.h"

namespace plm::kernels {
const KernelTable* PLM_AVX2_TABLE();  // this variant's table (kernels_avx2.cpp), for prefill's fallback
}

namespace plm::kernels::PLM_AVX2_NS {

// MatmulFn / MatmulFn2 for both sparse types (dispatching on w.dtype), any token count and row range.
template <class Act>
void matmul_sparse24(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y, size_t ldy,
                     int n0, int n1);

}  // namespace plm::kernels::PLM_AVX2_NS
