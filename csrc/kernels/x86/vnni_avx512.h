// Building blocks shared by the AVX-512 VNNI matmul kernels that keep one weight row per zmm lane
// (gemm_avx512.cpp, x16_avx512.cpp). Include only from files compiled with the AVX-512 flags; the
// unnamed namespace keeps each file's copy its own.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/kernels.h"

namespace plm::kernels::avx512 {
namespace {

// 4 activation bytes broadcast to every lane: the signed operand of a vpdpbusd k-step.
inline __m512i bcst4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// d * s1 (+ d2 * s2) in float: one token's integer sums scaled by its activation scales.
inline __m512 act_scaled(const BlockQ8A& a, __m512i s1, __m512i) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(a.d));
}
inline __m512 act_scaled(const BlockQ8A2& a, __m512i s1, __m512i s2) {
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(a.d2),
                         _mm512_mul_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(a.d)));
}

// Q5: nibble codes `nib` of one k-step (4 bytes a lane) with bit 4 added from each lane's u32 qh:
// byte b of the lane takes bit `shift` + b of qh (the low byte of qh >> shift copied to the lane's
// 4 bytes, byte b keeping its bit b), adding 16 where it is set.
inline __m512i with_high_bit(__m512i nib, __m512i qh, int shift) {
  const __m512i low_byte_x4 =
      _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
  const __m512i bits = _mm512_and_si512(
      _mm512_shuffle_epi8(_mm512_srlv_epi32(qh, _mm512_set1_epi32(shift)), low_byte_x4),
      _mm512_set1_epi32(0x08040201));
  return _mm512_mask_add_epi8(nib, _mm512_test_epi8_mask(bits, bits), nib, _mm512_set1_epi8(0x10));
}

}  // namespace
}  // namespace plm::kernels::avx512
