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

#include "kernels/x86/tile_util.h"
#include "kernels/x86/vnni_avx512.h"

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

// Weight formats. codes(rows, run, w) fills the 8 k-steps of 32-run `run` of 16 rows with
// unsigned codes; coefs(row, run0, v1, v2) gives one row's coefficients (see the top of the
// file) for the kCoefRuns runs from run0 (a K-quant super-block decodes its scales once).
// kHalves (Q6_K): each 16 elements of a run have their own scale: v1 scales codes 0-15,
// v2 codes 16-31, and the -32 code bias is taken out in int32 from the activation sums of the
// halves (micro_halves).

// 16 rows x 32 bytes at p[i] -> w[m], lane r = bytes 4m..4m+3 of row r.
inline void transpose_16x32(const uint8_t* const* p, __m512i* w) {
  const uint8_t* hi[kRows];
  for (int i = 0; i < kRows; ++i) hi[i] = p[i] + 16;
  transpose_16x16(p, w);
  transpose_16x16(hi, w + 4);
}
inline const uint8_t* const* offset_rows(const uint8_t* const* rows, size_t off, const uint8_t** out) {
  for (int i = 0; i < kRows; ++i) out[i] = rows[i] + off;
  return out;
}
inline __m512i nibbles(__m512i v, int high) {
  return _mm512_and_si512(high ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0F));
}
// Bits `shift`.. of each byte, `width` of them, moved to bit 4 (the high bits of a code).
inline __m512i high_bits(__m512i v, int shift, int width) {
  const __m512i m = _mm512_set1_epi8((char)((1 << width) - 1));
  return _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(v, shift), m), 4);  // codes < 256: no carry
}

struct FormatDefaults {
  static constexpr int kCoefRuns = 1;
  static constexpr bool kRowScale = false, kHalves = false;
};

// Q4 with one scale per G elements (G = 32, 64, 128): every 32-run is 16 bytes of nibbles
// after the block header, low nibbles codes 0-15, high nibbles 16-31.
template <int G, bool Asym>
struct Q4Pack : FormatDefaults {
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2, kRunsPerBlock = G / 32;
  static const uint8_t* block(const uint8_t* row, int run) {
    return row + (size_t)(run / kRunsPerBlock) * kBlockBytes;
  }
  static void codes(const uint8_t* const* rows, int run, __m512i* w) {
    const uint8_t* p[kRows];
    for (int i = 0; i < kRows; ++i) p[i] = block(rows[i], run) + kHdr + 16 * (run % kRunsPerBlock);
    __m512i n[4];
    transpose_16x16(p, n);
    for (int j = 0; j < 4; ++j) {
      w[j] = nibbles(n[j], 0);
      w[j + 4] = nibbles(n[j], 1);
    }
  }
  static void coefs(const uint8_t* row, int run, float* v1, float* v2) {
    const uint8_t* b = block(row, run);
    const float d = f16_at(b);
    *v1 = d;
    *v2 = Asym ? f16_at(b + 2) : -8.0f * d;
  }
};

// Q5_0 (x = d(q-16)) / Q5_1 (x = dq + m): Q4 nibbles, bit 4 of code j is bit j of the u32 qh.
template <bool Asym>
struct Q5Pack : FormatDefaults {
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + 4 + 16;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) {
    const uint8_t* p[kRows];
    transpose_16x16(offset_rows(rows, (size_t)run * kBlockBytes + kHdr + 4, p), w);
    // qh of each row in every lane's dword: byte b of k-step j needs bit 4j+b (j < 4) or
    // 16+4j+b (j >= 4): shift the u32 right, then spread bits 0-3 to bytes 0-3.
    alignas(64) uint32_t qh[kRows];
    for (int i = 0; i < kRows; ++i) std::memcpy(&qh[i], rows[i] + (size_t)run * kBlockBytes + kHdr, 4);
    const __m512i h = _mm512_load_si512(qh);
    for (int j = 3; j >= 0; --j) {
      const __m512i n = w[j];
      for (int half = 0; half < 2; ++half) w[j + 4 * half] = with_high_bit(nibbles(n, half), h, 4 * j + 16 * half);
    }
  }
  static void coefs(const uint8_t* row, int run, float* v1, float* v2) {
    const uint8_t* b = row + (size_t)run * kBlockBytes;
    const float d = f16_at(b);
    *v1 = d;
    *v2 = Asym ? f16_at(b + 2) : -16.0f * d;
  }
};

template <int kBlockBytes, int kHdr>
inline void byte_codes(const uint8_t* const* rows, int run, __m512i* w) {
  const uint8_t* p[kRows];
  transpose_16x32(offset_rows(rows, (size_t)run * kBlockBytes + kHdr, p), w);
  const __m512i bias = _mm512_set1_epi8((char)0x80);
  for (int j = 0; j < 8; ++j) w[j] = _mm512_xor_si512(w[j], bias);  // q + 128
}

struct Q8Pack : FormatDefaults {  // block 32: {f16 d; i8 qs[32]}
  static void codes(const uint8_t* const* rows, int run, __m512i* w) { byte_codes<34, 2>(rows, run, w); }
  static void coefs(const uint8_t* row, int run, float* v1, float* v2) {
    const float d = f16_at(row + (size_t)run * 34);
    *v1 = d;
    *v2 = -128.0f * d;
  }
};

struct I8Pack : FormatDefaults {  // i8 codes, one scale per row applied after the sum
  static constexpr bool kRowScale = true;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) { byte_codes<32, 0>(rows, run, w); }
  static void coefs(const uint8_t*, int, float* v1, float* v2) {
    *v1 = 1.0f;
    *v2 = -128.0f;
  }
};

// Q4_K / Q5_K, 256-element super-blocks {f16 d, dmin; u8 scales[12]; (Q5: u8 qh[32];) u8 qs[128]}:
// run s of a super-block is the low (s even) or high nibbles of qs[32(s/2) ..], plus (Q5_K) bit
// s of qh[0..31] as bit 4; x = d sc_s q - dmin mn_s.
template <bool Q5>
struct QKPack : FormatDefaults {
  static constexpr int kBlockBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16;
  static constexpr int kCoefRuns = 8;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) {
    const size_t blk = (size_t)(run / 8) * kBlockBytes;
    const int s = run % 8;
    const uint8_t* p[kRows];
    transpose_16x32(offset_rows(rows, blk + kQs + 32 * (s / 2), p), w);
    for (int j = 0; j < 8; ++j) w[j] = nibbles(w[j], s & 1);
    if constexpr (Q5) {
      __m512i h[8];
      transpose_16x32(offset_rows(rows, blk + 16, p), h);
      for (int j = 0; j < 8; ++j) w[j] = _mm512_or_si512(w[j], high_bits(h[j], s, 1));
    }
  }
  static void coefs(const uint8_t* row, int run0, float* v1, float* v2) {
    const uint8_t* b = row + (size_t)(run0 / 8) * kBlockBytes;
    const float d = f16_at(b), dmin = f16_at(b + 2);
    uint8_t sc[8], mn[8];
    kquant_scales_mins(b + 4, sc, mn);
    for (int s = 0; s < 8; ++s) {
      v1[s] = d * (float)sc[s];
      v2[s] = -dmin * (float)mn[s];
    }
  }
};

// Q6_K, {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: run j (h = j/4, c = j%4) takes the
// nibbles (c/2) of ql[64h + 32(c%2) ..] and bits 2c, 2c+1 of qh[32h ..] as bits 4-5;
// x = d sc_e (q - 32) with one scale per 16 elements.
struct Q6KPack : FormatDefaults {
  static constexpr int kBlockBytes = 210, kCoefRuns = 8;
  static constexpr bool kHalves = true;
  static void codes(const uint8_t* const* rows, int run, __m512i* w) {
    const size_t blk = (size_t)(run / 8) * kBlockBytes;
    const int j = run % 8, h = j / 4, c = j % 4;
    const uint8_t* p[kRows];
    transpose_16x32(offset_rows(rows, blk + 64 * h + 32 * (c % 2), p), w);
    __m512i hb[8];
    transpose_16x32(offset_rows(rows, blk + 128 + 32 * h, p), hb);
    for (int k = 0; k < 8; ++k) w[k] = _mm512_or_si512(nibbles(w[k], c / 2), high_bits(hb[k], 2 * c, 2));
  }
  static void coefs(const uint8_t* row, int run0, float* v1, float* v2) {
    const uint8_t* b = row + (size_t)(run0 / 8) * kBlockBytes;
    const float d = f16_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int j = 0; j < 8; ++j) {
      v1[j] = d * (float)sc[2 * j];
      v2[j] = d * (float)sc[2 * j + 1];
    }
  }
};

template <class P>
void pack_group(const uint8_t* const* rows, int nruns, GemmBlock* out) {
  constexpr int R = P::kCoefRuns;
  alignas(64) float v1[R][kRows], v2[R][kRows];
  float c1[R], c2[R];
  for (int b0 = 0; b0 < nruns; b0 += R) {
    for (int r = 0; r < kRows; ++r) {
      P::coefs(rows[r], b0, c1, c2);
      for (int i = 0; i < R; ++i) v1[i][r] = c1[i], v2[i][r] = c2[i];
    }
    for (int i = 0; i < R; ++i) {
      P::codes(rows, b0 + i, out[b0 + i].w);
      out[b0 + i].v1 = _mm512_load_ps(v1[i]);
      out[b0 + i].v2 = _mm512_load_ps(v2[i]);
    }
  }
}

// s1 (s2: the second activation level) += k-steps [J0, J1) of block b, for RT tokens.
template <int J0, int J1, class Block, int RT>
inline void k_steps(const GemmBlock& W, const Block* x, int nruns, int b, __m512i* s1, __m512i* s2) {
#pragma GCC unroll 8
  for (int j = J0; j < J1; ++j) {
    const __m512i w = _mm512_load_si512(&W.w[j]);
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      s1[t] = _mm512_dpbusd_epi32(s1[t], w, bcst4(a.qs + 4 * j));
      if constexpr (std::is_same_v<Block, BlockQ8A2>) s2[t] = _mm512_dpbusd_epi32(s2[t], w, bcst4(a.qs2 + 4 * j));
    }
  }
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
    for (int t = 0; t < RT; ++t) s1[t] = s2[t] = _mm512_setzero_si512();  // s2: second level only
    k_steps<0, 8, Block, RT>(W, x, nruns, b, s1, s2);
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      acc[t] = _mm512_fmadd_ps(act_scaled(a, s1[t], s2[t]), W.v1, acc[t]);
      acc[t] = _mm512_fmadd_ps(W.v2, _mm512_set1_ps(a.s), acc[t]);
      if constexpr (kTwo) acc[t] = _mm512_fmadd_ps(W.v2, _mm512_set1_ps(a.s2), acc[t]);
    }
  }
  const __m512 rs = row_scales ? _mm512_maskz_loadu_ps(mask, row_scales) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) _mm512_mask_storeu_ps(y + (size_t)t * ldy, mask, _mm512_mul_ps(acc[t], rs));
}

// Q6_K: as micro, with the two 16-element halves of a run in separate int32 sums that start at
// -32 times the half's activation code sum (bias[], one int32 per token, run, level and half),
// each scaled by its own v (v1: codes 0-15, v2: codes 16-31).
template <class Block, int RT>
void micro_halves(const GemmBlock* wb, int nruns, const Block* x, const int32_t* bias, float* y, size_t ldy,
                  __mmask16 mask) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  constexpr int L = kTwo ? 2 : 1;
  __m512 acc[RT];
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const GemmBlock& W = wb[b];
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m512i s1[RT], s2[RT];
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const int32_t* bt = bias + (((size_t)t * nruns + b) * L) * 2 + half;
        s1[t] = _mm512_set1_epi32(bt[0]);
        s2[t] = kTwo ? _mm512_set1_epi32(bt[2]) : _mm512_setzero_si512();
      }
      if (half) k_steps<4, 8, Block, RT>(W, x, nruns, b, s1, s2);
      else k_steps<0, 4, Block, RT>(W, x, nruns, b, s1, s2);
      const __m512 v = half ? W.v2 : W.v1;
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) acc[t] = _mm512_fmadd_ps(act_scaled(x[(size_t)t * nruns + b], s1[t], s2[t]), v, acc[t]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) _mm512_mask_storeu_ps(y + (size_t)t * ldy, mask, acc[t]);
}

template <class P, class Block>
void gemm_impl(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  const int nruns = (int)(w.cols / 32);
  // Grows once to the largest K this thread sees; later calls do not allocate.
  thread_local std::vector<GemmBlock> scratch;
  if (scratch.size() < (size_t)nruns) scratch.resize((size_t)nruns);
  GemmBlock* wb = scratch.data();
  thread_local ScratchBytes bias_scratch;  // not a std::vector<int32_t>: kernels.h ScratchBytes
  const int32_t* bias = nullptr;
  if constexpr (P::kHalves) {
    const size_t n = (size_t)T * nruns * (kTwo ? 4 : 2);
    int32_t* const out = reinterpret_cast<int32_t*>(bias_scratch.get(n * sizeof(int32_t)));
    half_bias(xq, T, nruns, out);
    bias = out;
  }
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
      with_tile<kTile>(std::min(kTile, T - t0), [&](auto rt) {
        if constexpr (P::kHalves)
          micro_halves<Block, decltype(rt)::value>(wb, nruns, x, bias + (size_t)t0 * nruns * (kTwo ? 4 : 2), yt, ldy, mask);
        else
          micro<Block, decltype(rt)::value>(wb, nruns, x, yt, ldy, mask, rs);
      });
    }
  }
}

// Runs the GEMM for the weight types it has; false (nothing done) for the others and for
// fewer than kGemmMinTokens tokens, which the caller's per-row tiles then handle.
template <class Block>
bool gemm_any(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  if (T < kGemmMinTokens) return false;
  switch (w.dtype) {
    case DType::Q8_0: gemm_impl<Q8Pack>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0: gemm_impl<Q4Pack<32, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1: gemm_impl<Q4Pack<32, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G64: gemm_impl<Q4Pack<64, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G128: gemm_impl<Q4Pack<128, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G64: gemm_impl<Q4Pack<64, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G128: gemm_impl<Q4Pack<128, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::I8: gemm_impl<I8Pack>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_0: gemm_impl<Q5Pack<false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_1: gemm_impl<Q5Pack<true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_K: gemm_impl<QKPack<false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_K: gemm_impl<QKPack<true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q6_K: gemm_impl<Q6KPack>(w, xq, T, y, ldy, n0, n1); return true;
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

}  // namespace plm::kernels::avx512
