// The integer dot products of the 256-bit x86 kernels (gemm_avx2.cpp, x16_avx2.cpp,
// kernels_avx2.cpp), which are compiled once per variant from the same source:
//
//   PLM_AVX2_VNNI   namespace      table name       instructions  (table: kernels_avx2.cpp)
//   0 (default)     avx2           "avx2"           vpmaddubsw into 16-bit pair sums, vpmaddwd to widen
//   1               avxvnni        "avxvnni"        VEX vpdpbusd (AVX-VNNI: Intel since Alder Lake, Zen 5)
//   2               avxvnni_evex   "avxvnni-evex"   EVEX vpdpbusd on ymm (AVX512-VL + AVX512-VNNI)
//
// The two VNNI builds are the same code; only the encoding of vpdpbusd differs. The EVEX one
// exists so that the VNNI code path is run and tested on AVX-512 machines too (this one has no
// AVX-VNNI, and QEMU's TCG does not emulate it); it is never the best variant where AVX-512 is.
//
// The kernels accumulate "sums" that are 16-bit pair sums without VNNI (which callers must widen
// before they overflow: see each kernel's bounds) and int32 with VNNI (where widen() is a no-op
// and the bounds do not apply). Every variant gives the same integers, so the same results.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#ifndef PLM_AVX2_VNNI
#define PLM_AVX2_VNNI 0
#endif
#if PLM_AVX2_VNNI == 0
#define PLM_AVX2_NS avx2
#define PLM_AVX2_NAME "avx2"
#define PLM_AVX2_TABLE avx2_kernel_table
#elif PLM_AVX2_VNNI == 1
#define PLM_AVX2_NS avxvnni
#define PLM_AVX2_NAME "avxvnni"
#define PLM_AVX2_TABLE avxvnni_kernel_table
#elif PLM_AVX2_VNNI == 2
#define PLM_AVX2_NS avxvnni_evex
#define PLM_AVX2_NAME "avxvnni-evex"
#define PLM_AVX2_TABLE avxvnni_evex_kernel_table
#else
#error "PLM_AVX2_VNNI must be 0, 1 or 2"
#endif

namespace plm::kernels::PLM_AVX2_NS {
namespace {

constexpr bool kVnni = PLM_AVX2_VNNI != 0;

// The 4 bytes at p (4 activation codes, or 2 words) in every dword lane.
inline __m256i bcst4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// s + w * a over 4-byte groups: w unsigned bytes, a signed bytes. Without VNNI, s holds 16-bit
// pair sums (vpmaddubsw saturates a pair above 32767: the callers' codes keep below it).
inline __m256i dp_add(__m256i s, __m256i w, __m256i a) {
#if PLM_AVX2_VNNI == 1
  return _mm256_dpbusd_avx_epi32(s, w, a);
#elif PLM_AVX2_VNNI == 2
  return _mm256_dpbusd_epi32(s, w, a);
#else
  return _mm256_add_epi16(s, _mm256_maddubs_epi16(w, a));
#endif
}

// dp_add onto zero.
inline __m256i dp_first(__m256i w, __m256i a) {
  if constexpr (kVnni) return dp_add(_mm256_setzero_si256(), w, a);
  else return _mm256_maddubs_epi16(w, a);
}

// The sums as int32 lanes (each the sum of its 4 bytes' products).
inline __m256i widen(__m256i s) {
  if constexpr (kVnni) return s;
  else return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}

// int32 s + w * a for signed bytes w and a, as |w| * sign(a, w): exact for every w including
// -128 (|-128| reads as the unsigned byte 128, a pair at most 2*128*127 = 32512). wabs = |w|.
inline __m256i dp_signed(__m256i s, __m256i wabs, __m256i w, __m256i a) {
  const __m256i sa = _mm256_sign_epi8(a, w);
  if constexpr (kVnni) return dp_add(s, wabs, sa);
  else return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, sa), _mm256_set1_epi16(1)));
}

}  // namespace
}  // namespace plm::kernels::PLM_AVX2_NS
