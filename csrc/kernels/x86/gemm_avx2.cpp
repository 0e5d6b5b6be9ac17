// Prefill GEMM (AVX2), see gemm_avx2.h and, for the idea, gemm_avx512.cpp.
//
// One ymm lane is one weight row: vpmaddubsw multiplies 4 unsigned code bytes of each of 8
// rows by 4 signed activation bytes of one token (broadcast), giving 16-bit pair sums. With
// 4-bit codes (0..15) and activations in [-127, 127] a pair sum is at most 2*15*127 = 3810,
// so the 8 k-steps of a 32-block add up in 16 bits (<= 30480) before one vpmaddwd widens
// them to int32 and one float step applies the scales: y[r] += v1[r] * (d * idot) + v2[r] * s
// (Q4_0: v1 = d, v2 = -8d; Q4_1: v1 = d, v2 = m). Wider codes (Q5, Q8, K-quants with 6 bits)
// would overflow that sum and stay on the per-row tiles.
#include "kernels/x86/gemm_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace plm::kernels::avx2 {
namespace {

constexpr int kRows = 8;  // weight rows per group: one per ymm lane
constexpr int kTile = 4;  // tokens per micro-kernel pass (16 ymm registers)

struct alignas(32) GemmBlock {
  __m256i w[8];  // k-step j: lane r holds the codes 4j..4j+3 of row r's 32-block
  __m256 v1, v2;
};
static_assert(sizeof(GemmBlock) == 320, "GemmBlock size");

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 8 rows x 16 bytes -> out[m], lane r = bytes 4m..4m+3 of row r.
inline void transpose_8x16(const uint8_t* const* p, __m256i out[4]) {
  auto t4 = [](const uint8_t* const* q, __m128i* o) {  // 4 rows: a 4x4 dword transpose
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[0]));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[1]));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[2]));
    const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[3]));
    const __m128i ab0 = _mm_unpacklo_epi32(a, b), ab1 = _mm_unpackhi_epi32(a, b);
    const __m128i cd0 = _mm_unpacklo_epi32(c, d), cd1 = _mm_unpackhi_epi32(c, d);
    o[0] = _mm_unpacklo_epi64(ab0, cd0);
    o[1] = _mm_unpackhi_epi64(ab0, cd0);
    o[2] = _mm_unpacklo_epi64(ab1, cd1);
    o[3] = _mm_unpackhi_epi64(ab1, cd1);
  };
  __m128i lo[4], hi[4];
  t4(p, lo);
  t4(p + 4, hi);
  for (int m = 0; m < 4; ++m) out[m] = _mm256_set_m128i(hi[m], lo[m]);
}

// Q4 with one scale per G elements: every 32-run is 16 bytes of nibbles after the block header,
// low nibbles codes 0-15, high nibbles 16-31.
template <int G, bool Asym>
struct Q4Pack {
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2, kRunsPerBlock = G / 32;
  static const uint8_t* block(const uint8_t* row, int run) {
    return row + (size_t)(run / kRunsPerBlock) * kBlockBytes;
  }
  static void pack(const uint8_t* const* rows, int run, GemmBlock& out) {
    const uint8_t* p[kRows];
    for (int i = 0; i < kRows; ++i) p[i] = block(rows[i], run) + kHdr + 16 * (run % kRunsPerBlock);
    __m256i n[4];
    transpose_8x16(p, n);
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      out.w[j] = _mm256_and_si256(n[j], low);
      out.w[j + 4] = _mm256_and_si256(_mm256_srli_epi16(n[j], 4), low);
    }
    alignas(32) float v1[kRows], v2[kRows];
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* b = block(rows[r], run);
      const float d = f16_at(b);
      v1[r] = d;
      v2[r] = Asym ? f16_at(b + 2) : -8.0f * d;
    }
    out.v1 = _mm256_load_ps(v1);
    out.v2 = _mm256_load_ps(v2);
  }
};

inline __m256i bcst4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

template <class Block, int RT>
void micro(const GemmBlock* wb, int nruns, const Block* x, float* y, size_t ldy, int valid) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const GemmBlock& W = wb[b];
    __m256i s1[RT], s2[RT];
    for (int t = 0; t < RT; ++t) {
      s1[t] = _mm256_setzero_si256();
      if constexpr (kTwo) s2[t] = _mm256_setzero_si256();
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m256i w = _mm256_load_si256(&W.w[j]);
#pragma GCC unroll 4
      for (int t = 0; t < RT; ++t) {
        const Block& a = x[(size_t)t * nruns + b];
        s1[t] = _mm256_add_epi16(s1[t], _mm256_maddubs_epi16(w, bcst4(a.qs + 4 * j)));
        if constexpr (kTwo) s2[t] = _mm256_add_epi16(s2[t], _mm256_maddubs_epi16(w, bcst4(a.qs2 + 4 * j)));
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s1[t], ones)), _mm256_set1_ps(a.d));
      if constexpr (kTwo)
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s2[t], ones)), _mm256_set1_ps(a.d2), f);
      acc[t] = _mm256_fmadd_ps(f, W.v1, acc[t]);
      acc[t] = _mm256_fmadd_ps(W.v2, _mm256_set1_ps(a.s), acc[t]);
      if constexpr (kTwo) acc[t] = _mm256_fmadd_ps(W.v2, _mm256_set1_ps(a.s2), acc[t]);
    }
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  for (int t = 0; t < RT; ++t) _mm256_maskstore_ps(y + (size_t)t * ldy, mask, acc[t]);
}

template <class P, class Block>
void gemm_impl(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  const int nruns = (int)(w.cols / 32);
  // Grows once to the largest K this thread sees; later calls do not allocate.
  thread_local std::vector<GemmBlock> scratch;
  if (scratch.size() < (size_t)nruns) scratch.resize((size_t)nruns);
  GemmBlock* wb = scratch.data();
  for (int g = n0; g < n1; g += kRows) {
    const int valid = std::min(kRows, n1 - g);
    const uint8_t* rows[kRows];  // a short last group repeats its last row; those lanes are not stored
    for (int i = 0; i < kRows; ++i) rows[i] = w.data + (size_t)(g + std::min(i, valid - 1)) * w.row_stride;
    for (int b = 0; b < nruns; ++b) P::pack(rows, b, wb[b]);
    for (int t0 = 0; t0 < T; t0 += kTile) {
      const Block* x = xq + (size_t)t0 * nruns;
      float* yt = y + (size_t)t0 * ldy + g;
      switch (std::min(kTile, T - t0)) {
        case 1: micro<Block, 1>(wb, nruns, x, yt, ldy, valid); break;
        case 2: micro<Block, 2>(wb, nruns, x, yt, ldy, valid); break;
        case 3: micro<Block, 3>(wb, nruns, x, yt, ldy, valid); break;
        default: micro<Block, 4>(wb, nruns, x, yt, ldy, valid); break;
      }
    }
  }
}

template <class Block>
void gemm_any(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  switch (w.dtype) {
    case DType::Q4_0: gemm_impl<Q4Pack<32, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1: gemm_impl<Q4Pack<32, true>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0_G64: gemm_impl<Q4Pack<64, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0_G128: gemm_impl<Q4Pack<128, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1_G64: gemm_impl<Q4Pack<64, true>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1_G128: gemm_impl<Q4Pack<128, true>>(w, xq, T, y, ldy, n0, n1); break;
    default: break;  // gemm_supports() is false
  }
}

}  // namespace

bool gemm_supports(DType t) {
  switch (t) {
    case DType::Q4_0: case DType::Q4_1: case DType::Q4_0_G64: case DType::Q4_0_G128: case DType::Q4_1_G64:
    case DType::Q4_1_G128:
      return true;
    default:
      return false;
  }
}

void gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1) {
  gemm_any(w, xq, T, y, ldy, n0, n1);
}
void gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1) {
  gemm_any(w, xq, T, y, ldy, n0, n1);
}

}  // namespace plm::kernels::avx2
