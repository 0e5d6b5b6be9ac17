// Prefill GEMM (AVX-512 VNNI), see gemm_avx512.h.
//
// Why a second quantized matmul: the tiles in kernels_avx512.cpp give each vpdpbusd the 64
// products of one (row, token) pair, so every vpdpbusd is followed by a convert, a scale
// multiply and an FMA, and that float work, not the integer dot product, bounds prefill.
// Here one zmm lane is one weight row: a vpdpbusd multiplies 4 bytes of each of 16 rows by
// 4 activation bytes of one token broadcast from memory, so a 32-block takes 8 vpdpbusd in
// int32 per (16 rows, token) before one float step (convert, multiply, two FMAs).
//
// That needs the weights transposed. Each group of 16 rows is repacked, one 32-block at a
// time, into GemmBlocks in a per-thread scratch (unsigned codes as 8 k-steps x 16 rows x 4
// bytes, and two per-row coefficient vectors); then every token passes over the group. The
// repack costs a few dozen instructions per block, against 8 vpdpbusd per block and token.
//
// vpdpbusd multiplies unsigned bytes (the weights, biased) by signed bytes (the activation
// codes exactly as quantize_act made them). The bias times the activation block is taken out
// in float with the block sum s = d * sum(q) that the activation block carries:
//   y[r] += v1[r] * (d * idot) + v2[r] * s
//   Q4_0 (x = d(q-8), q = 0..15):       v1 = d, v2 = -8d
//   Q4_1 (x = dq + m):                  v1 = d, v2 = m
//   Q8_0 (u = q + 128, x = d(u-128)):   v1 = d, v2 = -128d
//   I8   (u = q + 128, x = s_r(u-128)): v1 = 1, v2 = -128, and y[r] *= s_r at the end.
// Two-level activations (BlockQ8A2) add d2 * idot2 and v2 * s2 the same way.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "kernels/x86/gemm_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace plm::kernels::avx512 {
namespace {

constexpr int kRows = 16;  // weight rows per group: one per zmm lane
constexpr int kTile = 8;   // tokens per micro-kernel pass

struct alignas(64) GemmBlock {
  __m512i w[8];  // k-step j: lane r holds the biased codes 4j..4j+3 of row r's 32-block
  __m512 v1;     // per row: coefficient of d * idot
  __m512 v2;     // per row: coefficient of the activation block sum s
};
static_assert(sizeof(GemmBlock) == 640, "GemmBlock size");

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 16 rows x 16 bytes -> out[m], lane r = bytes 4m..4m+3 of row r.
inline void transpose_16x16(const uint8_t* const* p, __m512i out[4]) {
  __m512i z[4];  // z[a]: rows 4a..4a+3, one per 128-bit lane; dword 4i+m = dword m of row 4a+i
  for (int a = 0; a < 4; ++a) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * a])));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * a + 1])), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * a + 2])), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[4 * a + 3])), 3);
    z[a] = v;
  }
  // For 8 rows (two z): lanes 0-7 take dword m of each row, lanes 8-15 dword m+1.
  const __m512i even = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(2));
  const __m512i a01 = _mm512_permutex2var_epi32(z[0], even, z[1]);  // rows 0-7: dwords 0 | 1
  const __m512i b01 = _mm512_permutex2var_epi32(z[0], odd, z[1]);   // rows 0-7: dwords 2 | 3
  const __m512i a23 = _mm512_permutex2var_epi32(z[2], even, z[3]);  // rows 8-15
  const __m512i b23 = _mm512_permutex2var_epi32(z[2], odd, z[3]);
  out[0] = _mm512_shuffle_i64x2(a01, a23, _MM_SHUFFLE(1, 0, 1, 0));
  out[1] = _mm512_shuffle_i64x2(a01, a23, _MM_SHUFFLE(3, 2, 3, 2));
  out[2] = _mm512_shuffle_i64x2(b01, b23, _MM_SHUFFLE(1, 0, 1, 0));
  out[3] = _mm512_shuffle_i64x2(b01, b23, _MM_SHUFFLE(3, 2, 3, 2));
}

// Weight formats: codes(rows, run, w) fills the 8 k-steps of 32-block `run` of 16 rows,
// coefs(row, run, v1, v2) gives that row's two coefficients (see the top of the file).

// Q4 with one scale per G elements (G = 32, 64, 128): every 32-run is 16 bytes of nibbles
// after the block header, low nibbles codes 0-15, high nibbles 16-31.
template <int G, bool Asym>
struct Q4Pack {
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2, kRunsPerBlock = G / 32;
  static constexpr bool kRowScale = false;
  static const uint8_t* block(const uint8_t* row, int run) {
    return row + (size_t)(run / kRunsPerBlock) * kBlockBytes;
  }
  static void codes(const uint8_t* const* rows, int run, __m512i* w) {
    const uint8_t* p[kRows];
    for (int i = 0; i < kRows; ++i) p[i] = block(rows[i], run) + kHdr + 16 * (run % kRunsPerBlock);
    __m512i n[4];
    transpose_16x16(p, n);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 4; ++j) {
      w[j] = _mm512_and_si512(n[j], low);
      w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(n[j], 4), low);
    }
  }
  static void coefs(const uint8_t* row, int run, float& v1, float& v2) {
    const uint8_t* b = block(row, run);
    const float d = f16_at(b);
    v1 = d;
    v2 = Asym ? f16_at(b + 2) : -8.0f * d;
  }
};

template <int kBlockBytes, int kHdr>
inline void byte_codes(const uint8_t* const* rows, int run, __m512i* w) {
  const uint8_t* p[kRows];
  for (int i = 0; i < kRows; ++i) p[i] = rows[i] + (size_t)run * kBlockBytes + kHdr;
  transpose_16x16(p, w);
  for (int i = 0; i < kRows; ++i) p[i] += 16;
  transpose_16x16(p, w + 4);
  const __m512i bias = _mm512_set1_epi8((char)0x80);
  for (int j = 0; j < 8; ++j) w[j] = _mm512_xor_si512(w[j], bias);  // q + 128
}

struct Q8Pack {  // block 32: {f16 d; i8 qs[32]}
  static constexpr bool kRowScale = false;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) { byte_codes<34, 2>(rows, run, w); }
  static void coefs(const uint8_t* row, int run, float& v1, float& v2) {
    const float d = f16_at(row + (size_t)run * 34);
    v1 = d;
    v2 = -128.0f * d;
  }
};

struct I8Pack {  // i8 codes, one scale per row applied after the sum
  static constexpr bool kRowScale = true;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) { byte_codes<32, 0>(rows, run, w); }
  static void coefs(const uint8_t*, int, float& v1, float& v2) {
    v1 = 1.0f;
    v2 = -128.0f;
  }
};

template <class P>
void pack_group(const uint8_t* const* rows, int nruns, GemmBlock* out) {
  alignas(64) float v1[kRows], v2[kRows];
  for (int b = 0; b < nruns; ++b) {
    P::codes(rows, b, out[b].w);
    for (int r = 0; r < kRows; ++r) P::coefs(rows[r], b, v1[r], v2[r]);
    out[b].v1 = _mm512_load_ps(v1);
    out[b].v2 = _mm512_load_ps(v2);
  }
}

inline __m512i bcst4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// RT tokens (rows of x, nruns blocks each) against one packed group of 16 weight rows.
template <class Block, int RT>
void micro(const GemmBlock* wb, int nruns, const Block* x, float* y, size_t ldy, __mmask16 mask,
           const float* row_scales) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  __m512 acc[RT];
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const GemmBlock& W = wb[b];
    __m512i s1[RT], s2[RT];
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      s1[t] = _mm512_setzero_si512();
      if constexpr (kTwo) s2[t] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const __m512i w = _mm512_load_si512(&W.w[j]);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const Block& a = x[(size_t)t * nruns + b];
        s1[t] = _mm512_dpbusd_epi32(s1[t], w, bcst4(a.qs + 4 * j));
        if constexpr (kTwo) s2[t] = _mm512_dpbusd_epi32(s2[t], w, bcst4(a.qs2 + 4 * j));
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_set1_ps(a.d));
      if constexpr (kTwo) f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2[t]), _mm512_set1_ps(a.d2), f);
      acc[t] = _mm512_fmadd_ps(f, W.v1, acc[t]);
      acc[t] = _mm512_fmadd_ps(W.v2, _mm512_set1_ps(a.s), acc[t]);
      if constexpr (kTwo) acc[t] = _mm512_fmadd_ps(W.v2, _mm512_set1_ps(a.s2), acc[t]);
    }
  }
  const __m512 rs = row_scales ? _mm512_maskz_loadu_ps(mask, row_scales) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) _mm512_mask_storeu_ps(y + (size_t)t * ldy, mask, _mm512_mul_ps(acc[t], rs));
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
    pack_group<P>(rows, nruns, wb);
    const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
    const float* rs = P::kRowScale ? w.row_scales + g : nullptr;
    for (int t0 = 0; t0 < T; t0 += kTile) {
      const Block* x = xq + (size_t)t0 * nruns;
      float* yt = y + (size_t)t0 * ldy + g;
      switch (std::min(kTile, T - t0)) {
        case 1: micro<Block, 1>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 2: micro<Block, 2>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 3: micro<Block, 3>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 4: micro<Block, 4>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 5: micro<Block, 5>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 6: micro<Block, 6>(wb, nruns, x, yt, ldy, mask, rs); break;
        case 7: micro<Block, 7>(wb, nruns, x, yt, ldy, mask, rs); break;
        default: micro<Block, 8>(wb, nruns, x, yt, ldy, mask, rs); break;
      }
    }
  }
}

template <class Block>
void gemm_any(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  switch (w.dtype) {
    case DType::Q8_0: gemm_impl<Q8Pack>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0: gemm_impl<Q4Pack<32, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1: gemm_impl<Q4Pack<32, true>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0_G64: gemm_impl<Q4Pack<64, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0_G128: gemm_impl<Q4Pack<128, false>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1_G64: gemm_impl<Q4Pack<64, true>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1_G128: gemm_impl<Q4Pack<128, true>>(w, xq, T, y, ldy, n0, n1); break;
    case DType::I8: gemm_impl<I8Pack>(w, xq, T, y, ldy, n0, n1); break;
    default: break;  // gemm_supports() is false
  }
}

}  // namespace

bool gemm_supports(DType t) {
  switch (t) {
    case DType::Q8_0: case DType::Q4_0: case DType::Q4_1: case DType::Q4_0_G64: case DType::Q4_0_G128:
    case DType::Q4_1_G64: case DType::Q4_1_G128: case DType::I8:
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

}  // namespace plm::kernels::avx512
