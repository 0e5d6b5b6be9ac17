// The 2:4-sparse types (Q4_0_24_X16, I8_24_X16; common.h) for AVX-512 VNNI; uses VBMI where the CPU has it.
#pragma once
#include "kernels/kernels.h"

namespace plm::kernels::avx512 {

// 2:4-sparse matmuls with VBMI (sparse_avx512.cpp, compiled with -mavx512vbmi): call only where
// sparse24_kernel() is kSparse24Faster. Any token count and row range.
template <class Act>
void matmul_sparse24_vbmi(const WeightView& w, const Act* xq, int T, float* y, size_t ldy, int n0, int n1);

// KernelTable::sparse24: kSparse24Faster where the CPU has AVX-512 VBMI (vpermb, vpmultishiftqb), which
// matmul_sparse24's own kernel needs, else kSparse24None.
int sparse24_kernel();

}  // namespace plm::kernels::avx512
