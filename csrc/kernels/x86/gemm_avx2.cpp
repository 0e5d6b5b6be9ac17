// Prefill GEMM (AVX2, and AVX-VNNI: dot_avx2.h), see gemm_avx2.h and, for the idea, gemm_avx512.cpp.
//
// One ymm lane is one weight row: each k-step multiplies 4 unsigned code bytes of each of 8 rows
// by 4 signed activation bytes of one token (broadcast). Without VNNI that is vpmaddubsw into
// 16-bit pair sums, widened to int32 by vpmaddwd before they can overflow; with VNNI one vpdpbusd
// into int32. Then one float step per 32-block applies the scales:
//   y[r] += v1[r] * (d * idot) + v2[r] * s
// (Q4_0: v1 = d, v2 = -8d; Q4_1: v1 = d, v2 = m; Q4_K/Q5_K per run: v1 = d sc, v2 = -dmin mn;
// Q5_0: v2 = -16d; Q8_0 with VNNI: codes q + 128, v1 = d, v2 = -128d; I8 likewise with v1 = 1 and
// the row scale at the end.) How often the 16-bit sums are widened follows from the largest code
// (a pair is at most 2 * code * 127 and must stay below 32768):
//   4-bit codes (Q4_*):   2*15*127 = 3810 a pair, all 8 k-steps of a block (30480)
//   5-bit (Q5_*, Q5_K):   2*31*127 = 7874, every 4 k-steps (31496)
//   6-bit (Q6_K):         2*63*127 = 16002, every 2 k-steps (32004)
//   8-bit (Q8_0, I8):     no unsigned form fits (2*255*127): without VNNI the codes stay signed
//                         and each k-step is |w| x sign(a, w) widened at once (dp_signed).
// Q6_K has a scale per 16 elements: its k-steps 0-3 and 4-7 (the two halves of a run) have int32
// sums of their own, started at -32 times the half's activation code sum (half_bias), each times
// its own scale (v1: half 0, v2: half 1), as in gemm_avx512.cpp.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "kernels/x86/dot_avx2.h"
#include "kernels/x86/gemm_avx2.h"
#include "kernels/x86/tile_util.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace plm::kernels::PLM_AVX2_NS {
namespace {

constexpr int kRows = 8;  // weight rows per group: one per ymm lane

struct alignas(32) GemmBlock {
  __m256i w[8];  // k-step j: lane r holds the codes 4j..4j+3 of row r's 32-block
  __m256 v1, v2;
};
static_assert(sizeof(GemmBlock) == 320, "GemmBlock size");

struct alignas(32) SignedBlock {  // Q8_0 / I8 without VNNI: the signed codes and their magnitudes
  __m256i w[8], wabs[8];
  __m256 v1, v2;
};

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

// 8 rows x 32 bytes at p[i] + off -> w[0..8), lane r = bytes 4m..4m+3 of row r.
inline void transpose_8x32(const uint8_t* const* p, size_t off, __m256i* w) {
  const uint8_t* q[kRows];
  for (int i = 0; i < kRows; ++i) q[i] = p[i] + off;
  transpose_8x16(q, w);
  for (int i = 0; i < kRows; ++i) q[i] += 16;
  transpose_8x16(q, w + 4);
}

inline __m256i nibbles(__m256i v, int high) {
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
}
// Bits `shift`.. of each byte, `width` of them, moved to bit 4 (the high bits of a code).
inline __m256i high_bits(__m256i v, int shift, int width) {
  const __m256i m = _mm256_set1_epi8((char)((1 << width) - 1));
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(v, shift), m), 4);  // codes < 256: no carry
}

// Weight formats: pack(rows, run0, out) fills the kRuns GemmBlocks (Block) from 32-run run0 (a
// K-quant super-block decodes its scales once). kWiden: k-steps per 16-bit sum (see the top).
struct FormatDefaults {
  using Block = GemmBlock;
  static constexpr int kRuns = 1, kWiden = 8;
  static constexpr bool kSigned = false, kHalves = false, kRowScale = false;
};

// Q4 with one scale per G elements: every 32-run is 16 bytes of nibbles after the block header,
// low nibbles codes 0-15, high nibbles 16-31.
template <int G, bool Asym>
struct Q4Pack : FormatDefaults {
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
    for (int j = 0; j < 4; ++j) {
      out.w[j] = nibbles(n[j], 0);
      out.w[j + 4] = nibbles(n[j], 1);
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
// bit 4 of code c is bit c of the u32 qh.
template <bool Asym>
struct Q5Pack : FormatDefaults {
  static constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + 4 + 16, kWiden = 4;
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
    const __m256i h = _mm256_load_si256(reinterpret_cast<const __m256i*>(qh));
    const __m256i byte0 = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                           0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i bit = _mm256_set1_epi32(0x08040201);  // byte b of a dword keeps bit b
    for (int j = 0; j < 8; ++j) {
      const __m256i nib = j < 4 ? nibbles(n[j], 0) : nibbles(n[j - 4], 1);
      // code 4j + b of each row: bit 4j + b of its qh
      const __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_srli_epi32(h, 4 * j), byte0), bit);
      const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(spread, bit), _mm256_set1_epi8(0x10));
      out.w[j] = _mm256_or_si256(nib, fifth);
    }
    out.v1 = _mm256_load_ps(v1);
    out.v2 = _mm256_load_ps(v2);
  }
};

// Q4_K / Q5_K, 256-element super-blocks {f16 d, dmin; u8 scales[12]; (Q5: u8 qh[32];) u8 qs[128]}:
// run s is the low (s even) or high nibbles of qs[32(s/2) ..], plus (Q5_K) bit s of qh[0..31]
// as bit 4; x = d sc_s q - dmin mn_s.
template <bool Q5>
struct QKPack : FormatDefaults {
  static constexpr int kRuns = 8, kBlockBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16, kWiden = Q5 ? 4 : 8;
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
    __m256i h[8];
    if constexpr (Q5) transpose_8x32(rows, blk + 16, h);
    for (int c = 0; c < 4; ++c) {  // runs 2c (low nibbles) and 2c+1 (high) share 32 bytes
      __m256i n[8];
      transpose_8x32(rows, blk + kQs + 32 * c, n);
      for (int j = 0; j < 8; ++j) {
        out[2 * c].w[j] = nibbles(n[j], 0);
        out[2 * c + 1].w[j] = nibbles(n[j], 1);
        if constexpr (Q5) {
          out[2 * c].w[j] = _mm256_or_si256(out[2 * c].w[j], high_bits(h[j], 2 * c, 1));
          out[2 * c + 1].w[j] = _mm256_or_si256(out[2 * c + 1].w[j], high_bits(h[j], 2 * c + 1, 1));
        }
      }
    }
    for (int s = 0; s < 8; ++s) {
      out[s].v1 = _mm256_load_ps(v1[s]);
      out[s].v2 = _mm256_load_ps(v2[s]);
    }
  }
};

// Q6_K, {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}: run j (h = j/4, c = j%4) takes the
// nibbles (c/2) of ql[64h + 32(c%2) ..] and bits 2c, 2c+1 of qh[32h ..] as bits 4-5;
// x = d sc_e (q - 32) with one scale per 16 elements (v1: elements 0-15, v2: 16-31).
struct Q6KPack : FormatDefaults {
  static constexpr int kRuns = 8, kBlockBytes = 210, kWiden = 2;
  static constexpr bool kHalves = true;
  static void pack(const uint8_t* const* rows, int run0, GemmBlock* out) {
    const size_t blk = (size_t)(run0 / 8) * kBlockBytes;
    alignas(32) float v1[8][kRows], v2[8][kRows];
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* b = rows[r] + blk;
      const float d = f16_at(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int j = 0; j < 8; ++j) v1[j][r] = d * (float)sc[2 * j], v2[j][r] = d * (float)sc[2 * j + 1];
    }
    for (int h = 0; h < 2; ++h) {
      __m256i hb[8];
      transpose_8x32(rows, blk + 128 + 32 * h, hb);
      for (int half = 0; half < 2; ++half) {  // ql[64h + 32 half ..]: runs 4h + half (low), 4h + 2 + half (high)
        __m256i n[8];
        transpose_8x32(rows, blk + 64 * h + 32 * half, n);
        for (int hi = 0; hi < 2; ++hi) {
          const int c = half + 2 * hi;
          for (int k = 0; k < 8; ++k) out[4 * h + c].w[k] = _mm256_or_si256(nibbles(n[k], hi), high_bits(hb[k], 2 * c, 2));
        }
      }
    }
    for (int j = 0; j < 8; ++j) {
      out[j].v1 = _mm256_load_ps(v1[j]);
      out[j].v2 = _mm256_load_ps(v2[j]);
    }
  }
};

// Q8_0 ({f16 d; i8 qs[32]}) and I8 (i8 codes, one scale per row applied after the sum). With VNNI
// the codes are biased to q + 128 (unsigned) and the bias comes out with the block sum s, as in
// gemm_avx512.cpp; without it they stay signed, with their magnitudes beside them.
template <int kBlockBytes, int kHdr, bool kI8>
struct Int8Pack : FormatDefaults {
  static constexpr bool kSigned = !kVnni, kRowScale = kI8;
  using Block = std::conditional_t<kSigned, SignedBlock, GemmBlock>;
  template <class B>  // Block (a template so that the branch for the other variant is discarded)
  static void pack(const uint8_t* const* rows, int run, B* blocks) {
    B& out = blocks[0];
    transpose_8x32(rows, (size_t)run * kBlockBytes + kHdr, out.w);
    for (int j = 0; j < 8; ++j) {
      if constexpr (std::is_same_v<B, SignedBlock>) out.wabs[j] = _mm256_abs_epi8(out.w[j]);
      else out.w[j] = _mm256_xor_si256(out.w[j], _mm256_set1_epi8((char)0x80));  // q + 128
    }
    alignas(32) float v1[kRows];
    for (int r = 0; r < kRows; ++r) v1[r] = kI8 ? 1.0f : f16_at(rows[r] + (size_t)run * kBlockBytes);
    out.v1 = _mm256_load_ps(v1);
    out.v2 = kSigned ? _mm256_setzero_ps() : _mm256_mul_ps(out.v1, _mm256_set1_ps(-128.0f));
  }
};
using Q8Pack = Int8Pack<34, 2, false>;
using I8Pack = Int8Pack<32, 0, true>;

// The int32 sums i1 (i2: the second activation level) of k-steps [J0, J1) of block b, for RT
// tokens, added to what they hold.
template <class P, int J0, int J1, class Block, int RT>
inline void k_steps(const typename P::Block& W, const Block* x, int nruns, int b, __m256i* i1, __m256i* i2) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  __m256i s1[RT], s2[RT];  // 16-bit sums (without VNNI)
#pragma GCC unroll 8
  for (int j = J0; j < J1; ++j) {
    const __m256i w = _mm256_load_si256(&W.w[j]);
    __m256i wabs;
    if constexpr (P::kSigned) wabs = _mm256_load_si256(&W.wabs[j]);
    constexpr int E = P::kWiden;
    const bool first = (j - J0) % E == 0, last = (j - J0) % E == E - 1 || j == J1 - 1;
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      const __m256i q1 = bcst4(a.qs + 4 * j);
      if constexpr (P::kSigned) {
        i1[t] = dp_signed(i1[t], wabs, w, q1);
        if constexpr (kTwo) i2[t] = dp_signed(i2[t], wabs, w, bcst4(a.qs2 + 4 * j));
      } else if constexpr (kVnni) {
        i1[t] = dp_add(i1[t], w, q1);
        if constexpr (kTwo) i2[t] = dp_add(i2[t], w, bcst4(a.qs2 + 4 * j));
      } else {
        s1[t] = first ? dp_first(w, q1) : dp_add(s1[t], w, q1);
        if (last) i1[t] = _mm256_add_epi32(i1[t], widen(s1[t]));
        if constexpr (kTwo) {
          const __m256i q2 = bcst4(a.qs2 + 4 * j);
          s2[t] = first ? dp_first(w, q2) : dp_add(s2[t], w, q2);
          if (last) i2[t] = _mm256_add_epi32(i2[t], widen(s2[t]));
        }
      }
    }
  }
}

// d * i1 (+ d2 * i2): the token's scaled dot products.
inline __m256 act_scaled(const BlockQ8A& a, __m256i i1, __m256i) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(a.d));
}
inline __m256 act_scaled(const BlockQ8A2& a, __m256i i1, __m256i i2) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(i2), _mm256_set1_ps(a.d2),
                         _mm256_mul_ps(_mm256_cvtepi32_ps(i1), _mm256_set1_ps(a.d)));
}

// RT tokens (rows of x, nruns blocks each) against one packed group of 8 weight rows. bias: Q6_K's
// half_bias for these tokens.
template <class P, class Block, int RT>
void micro(const typename P::Block* wb, int nruns, const Block* x, const int32_t* bias, float* y, size_t ldy,
           int valid, const float* row_scales) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  __m256 acc[RT];
  for (int t = 0; t < RT; ++t) acc[t] = _mm256_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const auto& W = wb[b];
    __m256i i1[RT], i2[RT];
    if constexpr (P::kHalves) {
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const int32_t* bt = bias + (((size_t)t * nruns + b) * (kTwo ? 2 : 1)) * 2 + half;
          i1[t] = _mm256_set1_epi32(bt[0]);
          i2[t] = kTwo ? _mm256_set1_epi32(bt[2]) : _mm256_setzero_si256();
        }
        if (half) k_steps<P, 4, 8, Block, RT>(W, x, nruns, b, i1, i2);
        else k_steps<P, 0, 4, Block, RT>(W, x, nruns, b, i1, i2);
        const __m256 v = half ? W.v2 : W.v1;
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) acc[t] = _mm256_fmadd_ps(act_scaled(x[(size_t)t * nruns + b], i1[t], i2[t]), v, acc[t]);
      }
    } else {
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) i1[t] = i2[t] = _mm256_setzero_si256();  // i2: second level only
      k_steps<P, 0, 8, Block, RT>(W, x, nruns, b, i1, i2);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const Block& a = x[(size_t)t * nruns + b];
        acc[t] = _mm256_fmadd_ps(act_scaled(a, i1[t], i2[t]), W.v1, acc[t]);
        if constexpr (!P::kSigned) {
          acc[t] = _mm256_fmadd_ps(W.v2, _mm256_set1_ps(a.s), acc[t]);
          if constexpr (kTwo) acc[t] = _mm256_fmadd_ps(W.v2, _mm256_set1_ps(a.s2), acc[t]);
        }
      }
    }
  }
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256 rs = row_scales ? _mm256_maskload_ps(row_scales, mask) : _mm256_set1_ps(1.0f);
  for (int t = 0; t < RT; ++t) _mm256_maskstore_ps(y + (size_t)t * ldy, mask, _mm256_mul_ps(acc[t], rs));
}

// Tokens per micro-kernel pass: as many as 16 ymm registers hold. Sums of their own per k-step
// group (16-bit beside int32, both levels) leave room for fewer.
template <class P, class Block>
constexpr int tile() {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  if constexpr (kVnni) return kTwo ? 4 : 6;       // int32 sums and accumulators: 2-3 a token
  else if constexpr (P::kSigned || P::kWiden == 8) return 4;
  else return kTwo ? 2 : 4;                       // 16-bit and int32 sums of both levels: 5 a token
}

template <class P, class Block>
void gemm_impl(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  constexpr int kTile = tile<P, Block>();
  using WB = typename P::Block;
  const int nruns = (int)(w.cols / 32);
  // Grow once to the largest K (and T, for Q6_K) this thread sees; later calls do not allocate.
  thread_local std::vector<WB> scratch;
  if (scratch.size() < (size_t)nruns) scratch.resize((size_t)nruns);
  WB* wb = scratch.data();
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
    for (int b = 0; b < nruns; b += P::kRuns) P::pack(rows, b, wb + b);
    const float* rs = P::kRowScale ? w.row_scales + g : nullptr;
    for (int t0 = 0; t0 < T; t0 += kTile) {
      const Block* x = xq + (size_t)t0 * nruns;
      const int32_t* bt = P::kHalves ? bias + (size_t)t0 * nruns * (kTwo ? 4 : 2) : nullptr;
      float* yt = y + (size_t)t0 * ldy + g;
      with_tile<kTile>(std::min(kTile, T - t0), [&](auto rt) {
        micro<P, Block, decltype(rt)::value>(wb, nruns, x, bt, yt, ldy, valid, rs);
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
    case DType::I8: gemm_impl<I8Pack>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0: gemm_impl<Q4Pack<32, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1: gemm_impl<Q4Pack<32, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G64: gemm_impl<Q4Pack<64, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_0_G128: gemm_impl<Q4Pack<128, false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G64: gemm_impl<Q4Pack<64, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_1_G128: gemm_impl<Q4Pack<128, true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q4_K: gemm_impl<QKPack<false>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q5_K: gemm_impl<QKPack<true>>(w, xq, T, y, ldy, n0, n1); return true;
    case DType::Q6_K: gemm_impl<Q6KPack>(w, xq, T, y, ldy, n0, n1); return true;
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

}  // namespace plm::kernels::PLM_AVX2_NS
