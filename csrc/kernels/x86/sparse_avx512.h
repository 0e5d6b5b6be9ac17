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

// I8_BITMASK (unstructured-sparse int8) with VBMI2 (vpexpandb): call only where bitmask_kernel() is
// not kSparse24None. One token at a time (decode, verifying steps): each row's stored values
// expanded to their columns, 64 at a time.
template <class Act>
void matmul_bitmask_vbmi2(const WeightView& w, const Act* xq, int T, float* y, size_t ldy, int n0, int n1);
// Rows n .. n + m - 1 of an I8_BITMASK tensor as dense I8 rows (cols bytes each) at out.
void bitmask_rows_vbmi2(const WeightView& w, int n, int m, uint8_t* out);
// KernelTable::bitmask: kSparse24Slower where the CPU has AVX-512 VBMI2, else kSparse24None.
int bitmask_kernel();

}  // namespace plm::kernels::avx512
