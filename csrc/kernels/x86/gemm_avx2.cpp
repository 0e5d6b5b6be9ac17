// Prefill GEMM (AVX2), see gemm_avx2.h and, for the idea, gemm_avx512.cpp.
//
// One ymm lane is one weight row: vpmaddubsw multiplies 4 unsigned code bytes of each of 8
// rows by 4 signed activation bytes of one token (broadcast), giving 16-bit pair sums. With
// 4-bit codes (0..15) and activations in [-127, 127] a pair sum is at most 2*15*127 = 3810,
// so the 8 k-steps of a 32-block add up in 16 bits (<= 30480) before one vpmaddwd widens
// them to int32 and one float step applies the scales: y[r] += v1[r] * (d * idot) + v2[r] * s
// (Q4_0: v1 = d, v2 = -8d; Q4_1: v1 = d, v2 = m; Q4_K per run: v1 = d sc, v2 = -dmin mn).
// Q5_0/Q5_1 (codes to 31) widen after every 4 k-steps instead. Q8_0, I8 and Q6_K (wider codes)
// and Q5_K (5-bit like Q5_0, not done yet) stay on the per-row tiles.
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
// Formats: pack(rows, run0, out) fills kRuns consecutive GemmBlocks from run0 (a K-quant
// super-block decodes its scales once).
template <int G, bool Asym>
struct Q4Pack {
  static constexpr int kRuns = 1;
  static constexpr bool kWide = false;
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2, kRunsPerBlock = G / 32;
  static const uint8_t* block(const uint8_t* row, int run) {
    return row + (size_t)(run / kRunsPerBlock) * kBlockBytes;
  }
  static void pack(const uint8_t* const* rows, int run, GemmBlock* blocks) {
    GemmBlock& out = blocks[0];
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

// Q5_0 (x = d(q-16)) / Q5_1 (x = dq + m), {f16 d; (f16 m;) u8 qh[4]; u8 qs[16]}: Q4 nibbles, and
// bit 4 of code c is bit c of the u32 qh. Codes reach 31: the micro-kernel widens every 4 k-steps.
template <bool Asym>
struct Q5Pack {
  static constexpr int kRuns = 1, kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + 4 + 16;
  static constexpr bool kWide = true;
  static void pack(const uint8_t* const* rows, int run, GemmBlock* blocks) {
    GemmBlock& out = blocks[0];
    const uint8_t* p[kRows];
    alignas(32) uint32_t qh[kRows];
    alignas(32) float v1[kRows], v2[kRows];
    for (int i = 0; i < kRows; ++i) {
      const uint8_t* b = rows[i] + (size_t)run * kBlockBytes;
      p[i] = b + kHdr + 4;
      std::memcpy(&qh[i], b + kHdr, 4);
      const float d = f16_at(b);
      v1[i] = d;
      v2[i] = Asym ? f16_at(b + 2) : -16.0f * d;
    }
    __m256i n[4];
    transpose_8x16(p, n);
    const __m256i low = _mm256_set1_epi8(0x0F), h = _mm256_load_si256(reinterpret_cast<const __m256i*>(qh));
    const __m256i byte0 = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                           0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i bit = _mm256_set1_epi32(0x08040201);  // byte b of a dword keeps bit b
    for (int j = 0; j < 8; ++j) {
      const __m256i nib = j < 4 ? _mm256_and_si256(n[j], low) : _mm256_and_si256(_mm256_srli_epi16(n[j - 4], 4), low);
      // code 4j + b of each row: bit 4j + b of its qh
      const __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_srli_epi32(h, 4 * j), byte0), bit);
      const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(spread, bit), _mm256_set1_epi8(0x10));
      out.w[j] = _mm256_or_si256(nib, fifth);
    }
    out.v1 = _mm256_load_ps(v1);
    out.v2 = _mm256_load_ps(v2);
  }
};

// Q4_K, 256-element super-blocks {f16 d, dmin; u8 scales[12]; u8 qs[128]}: run s is the low (s
// even) or high nibbles of qs[32(s/2) ..]; x = d sc_s q - dmin mn_s (4-bit codes, as Q4_1).
struct Q4KPack {
  static constexpr int kRuns = 8, kBlockBytes = 144;
  static constexpr bool kWide = false;
  static void pack(const uint8_t* const* rows, int run0, GemmBlock* out) {
    const size_t blk = (size_t)(run0 / 8) * kBlockBytes;
    alignas(32) float v1[8][kRows], v2[8][kRows];
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* b = rows[r] + blk;
      const float d = f16_at(b), dmin = f16_at(b + 2);
      uint8_t sc[8], mn[8];
      kquant_scales_mins(b + 4, sc, mn);
      for (int s = 0; s < 8; ++s) v1[s][r] = d * (float)sc[s], v2[s][r] = -dmin * (float)mn[s];
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {  // runs 2c (low nibbles) and 2c+1 (high) share 32 bytes
      const uint8_t* p[kRows];
      for (int i = 0; i < kRows; ++i) p[i] = rows[i] + blk + 16 + 32 * c;
      __m256i n[8];
      transpose_8x16(p, n);
      for (int i = 0; i < kRows; ++i) p[i] += 16;
      transpose_8x16(p, n + 4);
      for (int j = 0; j < 8; ++j) {
        out[2 * c].w[j] = _mm256_and_si256(n[j], low);
        out[2 * c + 1].w[j] = _mm256_and_si256(_mm256_srli_epi16(n[j], 4), low);
      }
    }
    for (int s = 0; s < 8; ++s) {
      out[s].v1 = _mm256_load_ps(v1[s]);
      out[s].v2 = _mm256_load_ps(v2[s]);
    }
  }
};

inline __m256i bcst4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// kWide (5-bit codes): the 16-bit sums are widened after every 4 k-steps (4 x 2 x 31 x 127 = 31496).
template <class Block, int RT, bool kWide>
void micro(const GemmBlock* wb, int nruns, const Block* x, float* y, size_t ldy, int valid) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const GemmBlock& W = wb[b];
    __m256i s1[RT], s2[RT], w1[RT], w2[RT];  // 16-bit sums; wide: int32 sums of the first 4 k-steps
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
        if constexpr (kWide) {
          if (j == 3) {
            w1[t] = _mm256_madd_epi16(s1[t], ones), s1[t] = _mm256_setzero_si256();
            if constexpr (kTwo) w2[t] = _mm256_madd_epi16(s2[t], ones), s2[t] = _mm256_setzero_si256();
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      __m256i i1 = _mm256_madd_epi16(s1[t], ones);
      if constexpr (kWide) i1 = _mm256_add_epi32(i1, w1[t]);
      __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(a.d));
      if constexpr (kTwo) {
        __m256i i2 = _mm256_madd_epi16(s2[t], ones);
        if constexpr (kWide) i2 = _mm256_add_epi32(i2, w2[t]);
        f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), _mm256_set1_ps(a.d2), f);
      }
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
    for (int b = 0; b < nruns; b += P::kRuns) P::pack(rows, b, wb + b);
    for (int t0 = 0; t0 < T; t0 += kTile) {
      const Block* x = xq + (size_t)t0 * nruns;
      float* yt = y + (size_t)t0 * ldy + g;
      switch (std::min(kTile, T - t0)) {
        case 1: micro<Block, 1, P::kWide>(wb, nruns, x, yt, ldy, valid); break;
        case 2: micro<Block, 2, P::kWide>(wb, nruns, x, yt, ldy, valid); break;
        case 3: micro<Block, 3, P::kWide>(wb, nruns, x, yt, ldy, valid); break;
        default: micro<Block, 4, P::kWide>(wb, nruns, x, yt, ldy, valid); break;
      }
    }
  }
}

// Runs the GEMM for the weight types it has; false (nothing done) for the others and for
// fewer than kGemmMinTokens tokens, which the caller's per-row tiles then handle.
template <class Block>
bool gemm_any(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  if (T < kGemmMinTokens) return false;
  switch (w.dtype) {
    case DType::Q4_0: gemm_impl<Q4Pack<32, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1: gemm_impl<Q4Pack<32, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G64: gemm_impl<Q4Pack<64, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G128: gemm_impl<Q4Pack<128, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G64: gemm_impl<Q4Pack<64, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G128: gemm_impl<Q4Pack<128, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_K: gemm_impl<Q4KPack>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_0: gemm_impl<Q5Pack<false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_1: gemm_impl<Q5Pack<true>>(w, xq, T, y, ldy, n0, n1); return true;
    default: return false;
  }
}

}  // namespace

bool gemm(const WeightView& w, const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1) {
  return gemm_any(w, xq, T, y, ldy, n0, n1);
}
bool gemm(const WeightView& w, const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1) {
  return gemm_any(w, xq, T, y, ldy, n0, n1);
}

}  // namespace plm::kernels::avx2
