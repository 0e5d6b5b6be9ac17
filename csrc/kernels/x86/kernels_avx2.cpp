// AVX2 + FMA + F16C kernels. Compiled with those flags; only reached through
// dispatch.cpp after CPUID confirms the features. Compiled again with AVX-VNNI (x86/avxvnni/):
// the same table under another name, whose GEMM and x16 kernels use vpdpbusd (dot_avx2.h); the
// per-row tiles below are the same in both.
//
// Quantized matmul: one ymm = one 32-element run. Integer dot products use
// vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd:
//   Q4 nibbles (0..15) are unsigned as stored; Q4_0's -8 is removed exactly in
//   16-bit by subtracting maddubs(8, a), precomputed per activation run.
//   Q8_0/I8 use |w| x sign(a, w), exact for every int8 w since |a| <= 127.
//   Q5_0/Q5_1 add the fifth bit from qh (byte shuffle + compare), bias 16 as Q4_0's 8.
// Activations are repacked per token tile (run + broadcast scales) and weight
// rows are processed in L2-sized chunks, as in the AVX-512 file. K-quants walk
// 256-element super-blocks: scales decoded once per super-block (see that section).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/prefetch.h"
#include "kernels/x86/gemm_avx2.h"
#include "kernels/x86/x16_avx2.h"

namespace plm::kernels {
namespace {

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline float f16_scalar(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline int hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}
inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- activations

// round-half-away-from-zero(v) as int32, bit-identical to std::round. Written
// without subtracting from v so that no FMA contraction can change it.
inline __m256i round_away_epi32(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 av = _mm256_andnot_ps(sign, v);
  const __m256 t = _mm256_round_ps(av, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 up = _mm256_cmp_ps(_mm256_add_ps(t, _mm256_set1_ps(0.5f)), av, _CMP_LE_OQ);
  __m256 r = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_set1_ps(1.0f)));
  r = _mm256_or_ps(r, _mm256_and_ps(v, sign));
  return _mm256_cvttps_epi32(r);
}

// One 32-block held in v[0..3] (BlockQ8A rule): writes d, s, qs; returns the
// clamped int32 codes in q[0..3].
// scale < 0: the block's own, max|v| / 127; else that scale (the second level of BlockQ8A2).
inline void quant_block(const __m256* v, float* d_out, float* s_out, int8_t* qs, __m256i* q, float scale = -1.0f) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  float d = scale;
  if (scale < 0.0f) {
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
    d = hmax(m) / 127.0f;
  }
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m256 vid = _mm256_set1_ps(id);
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_min_epi32(_mm256_max_epi32(round_away_epi32(_mm256_mul_ps(v[i], vid)), lo), hi);
  const int sum = hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
  // packs interleave 128-bit lanes; the final permute restores element order.
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), ordered);
  *d_out = d;
  *s_out = d * (float)sum;
}

void quantize_act_avx2(const float* x, BlockQ8A* out, int K) {
  for (int b = 0; b < K / 32; ++b) {
    __m256 v[4];
    __m256i q[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
    quant_block(v, &out[b].d, &out[b].s, out[b].qs, q);
  }
}

// Residual r = x - d*q with one rounding (vfnmadd, as std::fma in the reference).
void quantize_act2_avx2(const float* x, BlockQ8A2* out, int K) {
  for (int b = 0; b < K / 32; ++b) {
    BlockQ8A2& o = out[b];
    __m256 v[4], r[4];
    __m256i q[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 32 * b + 8 * i);
    quant_block(v, &o.d, &o.s, o.qs, q);
    const __m256 vd = _mm256_set1_ps(o.d);
    for (int i = 0; i < 4; ++i) r[i] = _mm256_fnmadd_ps(vd, _mm256_cvtepi32_ps(q[i]), v[i]);
    quant_block(r, &o.d2, &o.s2, o.qs2, q, o.d * kLevel2Scale);
  }
}

enum class Aux { Off8, Off16, None, SumDiv8 };

constexpr bool is_offset(Aux a) { return a == Aux::Off8 || a == Aux::Off16; }
inline __m256i offset_bytes(Aux a) { return _mm256_set1_epi8(a == Aux::Off16 ? 16 : 8); }

struct alignas(32) PackedRun {
  __m256i qs;   // 32 int8
  __m256 d;     // activation scale, broadcast
  __m256i aux;  // Off8: maddubs(8, qs) (s16 pairs); SumDiv8: float s/8 broadcast
};

template <Aux A>
void pack_token(const BlockQ8A* xa, int nruns, PackedRun* out) {
  for (int r = 0; r < nruns; ++r) {
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa[r].qs));
    out[r].qs = qs;
    out[r].d = _mm256_set1_ps(xa[r].d);
    if constexpr (is_offset(A)) out[r].aux = _mm256_maddubs_epi16(offset_bytes(A), qs);
    else if constexpr (A == Aux::SumDiv8) out[r].aux = _mm256_castps_si256(_mm256_set1_ps(xa[r].s * 0.125f));
    else out[r].aux = _mm256_setzero_si256();
  }
}

// Two-level activations: both int8 levels of a run, scales and bias terms.
struct alignas(32) PackedRun2 {
  __m256i qs, qs2;  // 32 int8 each
  __m256 d, d2;     // scales, broadcast
  __m256i aux;      // Off8: maddubs(8, qs); SumDiv8: float (s+s2)/8 broadcast
  __m256i aux2;     // Off8: maddubs(8, qs2)
};

template <class Block> struct PackOf;
template <> struct PackOf<BlockQ8A> { using type = PackedRun; };
template <> struct PackOf<BlockQ8A2> { using type = PackedRun2; };

template <Aux A>
void pack_token(const BlockQ8A2* xa, int nruns, PackedRun2* out) {
  for (int r = 0; r < nruns; ++r) {
    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa[r].qs));
    const __m256i qs2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa[r].qs2));
    out[r].qs = qs;
    out[r].qs2 = qs2;
    out[r].d = _mm256_set1_ps(xa[r].d);
    out[r].d2 = _mm256_set1_ps(xa[r].d2);
    if constexpr (is_offset(A)) {
      out[r].aux = _mm256_maddubs_epi16(offset_bytes(A), qs);
      out[r].aux2 = _mm256_maddubs_epi16(offset_bytes(A), qs2);
    } else if constexpr (A == Aux::SumDiv8) {
      out[r].aux = _mm256_castps_si256(_mm256_set1_ps((xa[r].s + xa[r].s2) * 0.125f));
      out[r].aux2 = _mm256_setzero_si256();
    } else {
      out[r].aux = out[r].aux2 = _mm256_setzero_si256();
    }
  }
}

// ---------------------------------------------------------------- weight formats

template <int G, bool Asym>
struct Q4Format {
  static constexpr int kHdr = Asym ? 4 : 2;
  static constexpr int kBlockBytes = kHdr + G / 2;
  static constexpr int kRunsPerBlock = G / 32;
  static constexpr Aux kAux = Asym ? Aux::SumDiv8 : Aux::Off8;
  static constexpr bool kHasScale = true, kHasMin = Asym;
  struct Prep { __m256i w; };
  static const uint8_t* block(const uint8_t* row, int r) { return row + (r / kRunsPerBlock) * kBlockBytes; }
  static Prep prep(const uint8_t* row, int r) {
    const __m128i v = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(block(row, r) + kHdr + 16 * (r % kRunsPerBlock)));
    return {_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F))};
  }
  // int32 lanes of sum w * qs (aux: the Off8 correction belonging to qs)
  static __m256i idot(const Prep& p, __m256i qs, __m256i aux) {
    __m256i s16 = _mm256_maddubs_epi16(p.w, qs);
    if constexpr (!Asym) s16 = _mm256_sub_epi16(s16, aux);
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
  }
  static __m256i idot(const Prep& p, const PackedRun& a) { return idot(p, a.qs, a.aux); }
  static float scale(const uint8_t* row, int r) { return f16_scalar(block(row, r)); }
  static float min(const uint8_t* row, int r) { return f16_scalar(block(row, r) + 2); }
};

// Q5_0 (x = d*(q-16), bias removed like Q4_0's) and Q5_1 (x = d*q + m).
template <bool Asym>
struct Q5Format {
  static constexpr int kHdr = Asym ? 4 : 2;
  static constexpr int kBlockBytes = kHdr + 4 + 16;
  static constexpr Aux kAux = Asym ? Aux::SumDiv8 : Aux::Off16;
  static constexpr bool kHasScale = true, kHasMin = Asym;
  struct Prep { __m256i w; };
  static Prep prep(const uint8_t* row, int r) {
    const uint8_t* b = row + r * kBlockBytes;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kHdr + 4));
    const __m256i lo = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
    uint32_t qh;
    std::memcpy(&qh, b + kHdr, 4);
    // byte j <- qh byte j/8, then test bit j%8
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                  0x0303030303030303LL));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return {_mm256_or_si256(lo, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))};
  }
  static __m256i idot(const Prep& p, __m256i qs, __m256i aux) {
    __m256i s16 = _mm256_maddubs_epi16(p.w, qs);
    if constexpr (!Asym) s16 = _mm256_sub_epi16(s16, aux);
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
  }
  static __m256i idot(const Prep& p, const PackedRun& a) { return idot(p, a.qs, a.aux); }
  static float scale(const uint8_t* row, int r) { return f16_scalar(row + r * kBlockBytes); }
  static float min(const uint8_t* row, int r) { return f16_scalar(row + r * kBlockBytes + 2); }
};

template <int Stride, int Hdr, bool Scaled>  // Q8_0: 34-byte blocks; I8: plain rows
struct Int8Format {
  static constexpr Aux kAux = Aux::None;
  static constexpr bool kHasScale = Scaled, kHasMin = false;
  struct Prep { __m256i w, wabs; };
  static Prep prep(const uint8_t* row, int r) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + Stride * r + Hdr));
    return {w, _mm256_abs_epi8(w)};
  }
  static __m256i idot(const Prep& p, __m256i qs, __m256i) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(p.wabs, _mm256_sign_epi8(qs, p.w)), _mm256_set1_epi16(1));
  }
  static __m256i idot(const Prep& p, const PackedRun& a) { return idot(p, a.qs, a.aux); }
  static float scale(const uint8_t* row, int r) { return f16_scalar(row + Stride * r); }
  static float min(const uint8_t*, int) { return 0.0f; }
};
using Q8Format = Int8Format<34, 2, true>;
using I8Format = Int8Format<32, 0, false>;

// ---------------------------------------------------------------- quantized matmul

// Decode tiles of 4 rows prefetch the tile kPrefetchTiles further on (kernels/prefetch.h).
constexpr int kPrefetchTiles = 2;  // 4-row tiles: 2 measured ~2-3% faster than 1

template <class F, int RN, int RT>
inline void qtile(const uint8_t* const* rows, const PackedRun* pk, int nruns, float* y, size_t ldy,
                  const float* row_scales, Prefetch pf = {}) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int r = 0; r < nruns; ++r) {
    pf.at(r);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const typename F::Prep w = F::prep(rows[n], r);
      __m256 dw = _mm256_setzero_ps(), mw = _mm256_setzero_ps();
      if constexpr (F::kHasScale) dw = _mm256_set1_ps(F::scale(rows[n], r));
      if constexpr (F::kHasMin) mw = _mm256_set1_ps(F::min(rows[n], r));
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedRun& a = pk[t * nruns + r];
        const __m256 idot = _mm256_cvtepi32_ps(F::idot(w, a));
        const __m256 sc = F::kHasScale ? _mm256_mul_ps(dw, a.d) : a.d;
        acc[n][t] = _mm256_fmadd_ps(idot, sc, acc[n][t]);
        if constexpr (F::kHasMin) acc[n][t] = _mm256_fmadd_ps(mw, _mm256_castsi256_ps(a.aux), acc[n][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = hsum(acc[n][t]);
      if (row_scales) v *= row_scales[n];
      y[t * ldy + n] = v;
    }
}

// Two-level activations: each decoded weight run feeds both integer dot products.
template <class F, int RN, int RT>
inline void qtile(const uint8_t* const* rows, const PackedRun2* pk, int nruns, float* y, size_t ldy,
                  const float* row_scales, Prefetch pf = {}) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int r = 0; r < nruns; ++r) {
    pf.at(r);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const typename F::Prep w = F::prep(rows[n], r);
      __m256 dw = _mm256_setzero_ps(), mw = _mm256_setzero_ps();
      if constexpr (F::kHasScale) dw = _mm256_set1_ps(F::scale(rows[n], r));
      if constexpr (F::kHasMin) mw = _mm256_set1_ps(F::min(rows[n], r));
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedRun2& a = pk[t * nruns + r];
        const __m256 i1 = _mm256_cvtepi32_ps(F::idot(w, a.qs, a.aux));
        const __m256 i2 = _mm256_cvtepi32_ps(F::idot(w, a.qs2, a.aux2));
        const __m256 v = _mm256_fmadd_ps(i1, a.d, _mm256_mul_ps(i2, a.d2));
        acc[n][t] = F::kHasScale ? _mm256_fmadd_ps(v, dw, acc[n][t]) : _mm256_add_ps(acc[n][t], v);
        if constexpr (F::kHasMin) acc[n][t] = _mm256_fmadd_ps(mw, _mm256_castsi256_ps(a.aux), acc[n][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = hsum(acc[n][t]);
      if (row_scales) v *= row_scales[n];
      y[t * ldy + n] = v;
    }
}

constexpr int kTokTile = 2;
constexpr size_t kChunkBytes = 256 * 1024;  // weight rows kept hot while all token tiles pass

inline int chunk_rows(const WeightView& w, int n0, int n1) {
  int chunk = (int)std::min<size_t>((size_t)(n1 - n0), std::max<size_t>(8, kChunkBytes / std::max<size_t>(w.row_stride, 1)));
  return std::max(4, chunk & ~3);
}

// Block = BlockQ8A (matmul) or BlockQ8A2 (matmul2); the tiles are picked by the packed type.
template <class F, class Block = BlockQ8A>
void matmul_quant(const WeightView& w, const float*, size_t, const Block* xq, int T, float* y, size_t ldy,
                  int n0, int n1) {
  if (!w.row_invariant && PLM_AVX2_NS::gemm(w, xq, T, y, ldy, n0, n1)) return;  // prefill
  using Packed = typename PackOf<Block>::type;
  const int nruns = (int)(w.cols / 32);
  thread_local std::vector<Packed> scratch;  // grows once to the largest K seen by this thread
  if (scratch.size() < (size_t)kTokTile * nruns) scratch.resize((size_t)kTokTile * nruns);
  Packed* pk = scratch.data();
  const bool i8 = w.dtype == DType::I8;
  const int chunk = chunk_rows(w, n0, n1);
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      const int rt = std::min(kTokTile, T - t0);
      for (int t = 0; t < rt; ++t) pack_token<F::kAux>(xq + (size_t)(t0 + t) * nruns, nruns, pk + t * nruns);
      float* yt = y + (size_t)t0 * ldy;
      int n = c0;
      for (; n + 4 <= c1; n += 4) {
        const uint8_t* rows[4];
        for (int i = 0; i < 4; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
        const float* rs = i8 ? w.row_scales + n : nullptr;
        // The first token tile streams the rows from memory, later ones find them in L2: it prefetches
        // as decode does (a step verifying drafted tokens runs here, not in the GEMM).
        if (rt == 2) qtile<F, 4, 2>(rows, pk, nruns, yt + n, ldy, rs,
                                    t0 == 0 ? decode_prefetch(rows[0], 4 * w.row_stride, nruns, kPrefetchTiles) : Prefetch{});
        else qtile<F, 4, 1>(rows, pk, nruns, yt + n, ldy, rs, decode_prefetch(rows[0], 4 * w.row_stride, nruns, kPrefetchTiles));
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        const float* rs = i8 ? w.row_scales + n : nullptr;
        if (rt == 2) qtile<F, 1, 2>(rows, pk, nruns, yt + n, ldy, rs);
        else qtile<F, 1, 1>(rows, pk, nruns, yt + n, ldy, rs);
      }
    }
  }
}

// ---------------------------------------------------------------- K-quants
// Per super-block (256 elements = 8 activation runs) and row, the sub-block scales are decoded
// once into floats: Q4_K/Q5_K wsc = [d*sc_0..7] and wmn = [dmin*mn_0..7]; Q6_K [d*sc_0..15] in
// two ymm. Multiplied by the token's packed run scales they give `prod`, from which each run takes
// its lanes with one vpermps: Q4_K/Q5_K all 8 lanes from sub-block r; Q6_K lanes 0-3 (elements
// 0-15 of the run) from sub-block 2r, lanes 4-7 from 2r+1. The mins are one FMA per super-block:
// wmn * [-s_0..-s_7]. Q6_K's codes are 0..63: maddubs(32, a), precomputed, removes the offset.

struct alignas(32) PackedK {  // one token, one super-block
  __m256i qs[8];
  __m256 dv[2];     // Q4_K/Q5_K: [d_0..d_7], [-s_0..-s_7]; Q6_K: [d_0, d_0, .., d_3, d_3], [d_4, d_4, .., d_7, d_7]
  __m256i aux[8];   // Q6_K: maddubs(32, qs)
};
struct alignas(32) PackedK2 {
  __m256i qs[8], qs2[8];
  __m256 dv[2], dv2[2];  // dv as PackedK with -(s + s2); dv2 the same for d2 (mins: 0)
  __m256i aux[8], aux2[8];
};
template <class Block> struct PackKOf;
template <> struct PackKOf<BlockQ8A> { using type = PackedK; };
template <> struct PackKOf<BlockQ8A2> { using type = PackedK2; };

template <bool Q6>
inline void k_scales_vec(const float* v, const float* m, __m256* out) {
  if constexpr (Q6) {
    out[0] = _mm256_setr_ps(v[0], v[0], v[1], v[1], v[2], v[2], v[3], v[3]);
    out[1] = _mm256_setr_ps(v[4], v[4], v[5], v[5], v[6], v[6], v[7], v[7]);
  } else {
    out[0] = _mm256_loadu_ps(v);
    out[1] = _mm256_loadu_ps(m);
  }
}

template <bool Q6>
void pack_token_k(const BlockQ8A* xa, int nsb, PackedK* out) {
  for (int b = 0; b < nsb; ++b) {
    const BlockQ8A* a = xa + 8 * b;
    PackedK& o = out[b];
    float d[8], ms[8];
    for (int r = 0; r < 8; ++r) {
      d[r] = a[r].d, ms[r] = -a[r].s;
      o.qs[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r].qs));
      if constexpr (Q6) o.aux[r] = _mm256_maddubs_epi16(_mm256_set1_epi8(32), o.qs[r]);
    }
    k_scales_vec<Q6>(d, ms, o.dv);
  }
}

template <bool Q6>
void pack_token_k(const BlockQ8A2* xa, int nsb, PackedK2* out) {
  for (int b = 0; b < nsb; ++b) {
    const BlockQ8A2* a = xa + 8 * b;
    PackedK2& o = out[b];
    float d[8], d2[8], ms[8], zero[8] = {};
    for (int r = 0; r < 8; ++r) {
      d[r] = a[r].d, d2[r] = a[r].d2, ms[r] = -(a[r].s + a[r].s2);
      o.qs[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r].qs));
      o.qs2[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r].qs2));
      if constexpr (Q6) {
        o.aux[r] = _mm256_maddubs_epi16(_mm256_set1_epi8(32), o.qs[r]);
        o.aux2[r] = _mm256_maddubs_epi16(_mm256_set1_epi8(32), o.qs2[r]);
      }
    }
    k_scales_vec<Q6>(d, ms, o.dv);
    k_scales_vec<Q6>(d2, zero, o.dv2);
  }
}

// Q4_K (Q5 = false) and Q5_K.
template <bool Q5>
struct QKFormat {
  static constexpr int kBlockBytes = Q5 ? 176 : 144;
  static constexpr bool kQ6 = false;
  static void scales(const uint8_t* blk, __m256* w) {  // w[0] = d*sc, w[1] = dmin*mn
    uint32_t u[3];
    std::memcpy(u, blk + 4, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, mn_lo = u[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
    const __m128i sc = _mm_setr_epi32((int)sc_lo, (int)sc_hi, 0, 0), mn = _mm_setr_epi32((int)mn_lo, (int)mn_hi, 0, 0);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)), _mm256_set1_ps(f16_scalar(blk)));
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)), _mm256_set1_ps(f16_scalar(blk + 2)));
  }
  static __m256 run_scale(const __m256* prod, int r) { return _mm256_permutevar8x32_ps(prod[0], _mm256_set1_epi32(r)); }
  static __m256i weights(const uint8_t* blk, int r) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + (Q5 ? 48 : 16) + 32 * (r / 2)));
    __m256i w = _mm256_and_si256(r % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
    if constexpr (Q5) {  // bit r of qh[j] -> bit 4 of byte j (16-bit shifts: the spill is masked off)
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
      const __m256i hb = r <= 4 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - r)) : _mm256_srl_epi16(qh, _mm_cvtsi32_si128(r - 4));
      w = _mm256_or_si256(w, _mm256_and_si256(hb, _mm256_set1_epi8(0x10)));
    }
    return w;
  }
  static __m256i idot(__m256i w, __m256i qs, __m256i) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w, qs), _mm256_set1_epi16(1));
  }
};

struct Q6KFormat {
  static constexpr int kBlockBytes = 210;
  static constexpr bool kQ6 = true;
  static void scales(const uint8_t* blk, __m256* w) {  // [d*sc_0..7], [d*sc_8..15]
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192));
    const __m256 d = _mm256_set1_ps(f16_scalar(blk + 208));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)), d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))), d);
  }
  static __m256 run_scale(const __m256* prod, int r) {  // lanes 0-3: sub-block 2r, 4-7: 2r+1
    const int s = (2 * r) % 8;
    return _mm256_permutevar8x32_ps(prod[r / 4], _mm256_setr_epi32(s, s, s, s, s + 1, s + 1, s + 1, s + 1));
  }
  // Run r = elements 32r..32r+31: h = r/4, low 4 bits from ql[64h + 32(r%2) + i] >> 4*((r%4)/2),
  // high 2 bits from qh[32h + i] >> 2*(r%4), moved to bits 4-5.
  static __m256i weights(const uint8_t* blk, int r) {
    const int h = r / 4, q = r % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * h + 32 * (r % 2)));
    const __m256i lo = _mm256_and_si256(q >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    const __m256i hb = q <= 2 ? _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - 2 * q)) : _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
  }
  static __m256i idot(__m256i w, __m256i qs, __m256i aux) {
    return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(w, qs), aux), _mm256_set1_epi16(1));
  }
};

template <class KF, int RN, int RT>
inline void ktile(const uint8_t* const* rows, const PackedK* pk, int nsb, float* y, size_t ldy, Prefetch pf = {}) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int b = 0; b < nsb; ++b) {
    pf.at(b);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const uint8_t* blk = rows[n] + (size_t)b * KF::kBlockBytes;
      __m256 wsc[2], prod[RT][2];
      KF::scales(blk, wsc);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedK& a = pk[t * nsb + b];
        prod[t][0] = _mm256_mul_ps(wsc[0], a.dv[0]);
        if constexpr (KF::kQ6) prod[t][1] = _mm256_mul_ps(wsc[1], a.dv[1]);
        else acc[n][t] = _mm256_fmadd_ps(wsc[1], a.dv[1], acc[n][t]);  // mins
      }
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const __m256i w = KF::weights(blk, r);
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const PackedK& a = pk[t * nsb + b];
          const __m256 idot = _mm256_cvtepi32_ps(KF::idot(w, a.qs[r], a.aux[r]));
          acc[n][t] = _mm256_fmadd_ps(idot, KF::run_scale(prod[t], r), acc[n][t]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) y[t * ldy + n] = hsum(acc[n][t]);
}

template <class KF, int RN, int RT>
inline void ktile(const uint8_t* const* rows, const PackedK2* pk, int nsb, float* y, size_t ldy, Prefetch pf = {}) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int b = 0; b < nsb; ++b) {
    pf.at(b);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const uint8_t* blk = rows[n] + (size_t)b * KF::kBlockBytes;
      __m256 wsc[2], prod[RT][2], prod2[RT][2];
      KF::scales(blk, wsc);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedK2& a = pk[t * nsb + b];
        prod[t][0] = _mm256_mul_ps(wsc[0], a.dv[0]);
        prod2[t][0] = _mm256_mul_ps(wsc[0], a.dv2[0]);
        if constexpr (KF::kQ6) {
          prod[t][1] = _mm256_mul_ps(wsc[1], a.dv[1]);
          prod2[t][1] = _mm256_mul_ps(wsc[1], a.dv2[1]);
        } else {
          acc[n][t] = _mm256_fmadd_ps(wsc[1], a.dv[1], acc[n][t]);  // mins
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) {
        const __m256i w = KF::weights(blk, r);
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const PackedK2& a = pk[t * nsb + b];
          const __m256 i1 = _mm256_cvtepi32_ps(KF::idot(w, a.qs[r], a.aux[r]));
          const __m256 i2 = _mm256_cvtepi32_ps(KF::idot(w, a.qs2[r], a.aux2[r]));
          acc[n][t] = _mm256_fmadd_ps(i1, KF::run_scale(prod[t], r), acc[n][t]);
          acc[n][t] = _mm256_fmadd_ps(i2, KF::run_scale(prod2[t], r), acc[n][t]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) y[t * ldy + n] = hsum(acc[n][t]);
}

template <class KF, class Block = BlockQ8A>
void matmul_kquant(const WeightView& w, const float*, size_t, const Block* xq, int T, float* y, size_t ldy,
                   int n0, int n1) {
  if (!w.row_invariant && PLM_AVX2_NS::gemm(w, xq, T, y, ldy, n0, n1)) return;  // prefill
  using Packed = typename PackKOf<Block>::type;
  const int nruns = (int)(w.cols / 32), nsb = (int)(w.cols / 256);
  thread_local std::vector<Packed> scratch;  // grows once to the largest K seen by this thread
  if (scratch.size() < (size_t)kTokTile * nsb) scratch.resize((size_t)kTokTile * nsb);
  Packed* pk = scratch.data();
  const int chunk = chunk_rows(w, n0, n1);
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      const int rt = std::min(kTokTile, T - t0);
      for (int t = 0; t < rt; ++t) pack_token_k<KF::kQ6>(xq + (size_t)(t0 + t) * nruns, nsb, pk + t * nsb);
      float* yt = y + (size_t)t0 * ldy;
      int n = c0;
      for (; n + 4 <= c1; n += 4) {
        const uint8_t* rows[4];
        for (int i = 0; i < 4; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
        if (rt == 2) ktile<KF, 4, 2>(rows, pk, nsb, yt + n, ldy,  // first tile prefetched, as qtile's
                                     t0 == 0 ? decode_prefetch(rows[0], 4 * w.row_stride, nsb, kPrefetchTiles) : Prefetch{});
        else ktile<KF, 4, 1>(rows, pk, nsb, yt + n, ldy, decode_prefetch(rows[0], 4 * w.row_stride, nsb, kPrefetchTiles));
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        if (rt == 2) ktile<KF, 1, 2>(rows, pk, nsb, yt + n, ldy);
        else ktile<KF, 1, 1>(rows, pk, nsb, yt + n, ldy);
      }
    }
  }
}

// ---------------------------------------------------------------- f32 / f16 / bf16 matmul

enum class WKind { F32, F16, BF16 };

template <WKind W>
inline __m256 load_w(const uint8_t* row, int k) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k));
  if constexpr (W == WKind::F16) return _mm256_cvtph_ps(h);
  else if constexpr (W == WKind::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
template <WKind W>
inline float load_w1(const uint8_t* row, int k) {
  if constexpr (W == WKind::F16) return f16_scalar(row + 2 * k);
  else if constexpr (W == WKind::BF16) return bf16_to_fp32(load_u16(row + 2 * k));
  else return reinterpret_cast<const float*>(row)[k];
}

template <WKind W, int RN, int RT>
inline void ftile(const uint8_t* const* rows, const float* x, size_t ldx, int K, float* y, size_t ldy) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  int k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[RT];
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) xv[t] = _mm256_loadu_ps(x + t * ldx + k);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const __m256 wv = load_w<W>(rows[n], k);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_fmadd_ps(wv, xv[t], acc[n][t]);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = hsum(acc[n][t]);
      for (int kk = k; kk < K; ++kk) v += load_w1<W>(rows[n], kk) * x[t * ldx + kk];
      y[t * ldy + n] = v;
    }
}

template <WKind W>
void matmul_float(const WeightView& w, const float* x, size_t ldx, const BlockQ8A*, int T, float* y, size_t ldy,
                  int n0, int n1) {
  const int K = (int)w.cols;
  const int chunk = chunk_rows(w, n0, n1);
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      const int rt = std::min(kTokTile, T - t0);
      const float* xt = x + (size_t)t0 * ldx;
      float* yt = y + (size_t)t0 * ldy;
      int n = c0;
      for (; n + 4 <= c1; n += 4) {
        const uint8_t* rows[4];
        for (int i = 0; i < 4; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
        if (rt == 2) ftile<W, 4, 2>(rows, xt, ldx, K, yt + n, ldy);
        else ftile<W, 4, 1>(rows, xt, ldx, K, yt + n, ldy);
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        if (rt == 2) ftile<W, 1, 2>(rows, xt, ldx, K, yt + n, ldy);
        else ftile<W, 1, 1>(rows, xt, ldx, K, yt + n, ldy);
      }
    }
  }
}

// ---------------------------------------------------------------- elementwise

float dot_avx2(const float* a, const float* b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float v = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) v += a[i] * b[i];
  return v;
}

void axpy_avx2(float a, const float* x, float* y, int n) {
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

void scale_avx2(float a, float* y, int n) {
  const __m256 va = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(va, _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] *= a;
}

void add_avx2(const float* a, const float* b, float* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

void rms_norm_avx2(const float* x, const float* w, float* y, int n, float eps) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  double ss = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) ss += (double)x[i] * x[i];
  const float r = (float)(1.0 / std::sqrt(ss / n + eps));
  const __m256 vr = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) y[i] = x[i] * r * w[i];
}

// exp(x) for x clamped to [-87, 88] (enough for silu: outside, 1+exp(-g) is 1 or
// the quotient is < 1e-36): n = round(x / ln2), two-constant Cody-Waite reduction,
// degree-6 Taylor polynomial (rel. error ~1.2e-7), 2^n built in the exponent bits.
inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void to_f16_avx2(const float* x, fp16_t* y, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}

// P.V over f16 rows: each 8-value piece of a row is converted once for all G weight rows.
void weighted_sum_f16_avx2(const float* w, size_t ldw, int G, const fp16_t* rows, size_t ldr, int n,
                           float* out, size_t ldo, int dh) {
  for (int p = 0; p < n; ++p) {
    const fp16_t* r = rows + (size_t)p * ldr;
    int i = 0;
    for (; i + 8 <= dh; i += 8) {
      const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + i)));
      for (int g = 0; g < G; ++g) {
        float* o = out + g * ldo + i;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(w[g * ldw + p]), x, _mm256_loadu_ps(o)));
      }
    }
    for (; i < dh; ++i) {
      const float x = fp16_to_fp32(r[i]);
      for (int g = 0; g < G; ++g) out[g * ldo + i] += w[g * ldw + p] * x;
    }
  }
}

float max_avx2(const float* s, int n) {
  float m = -std::numeric_limits<float>::infinity();
  int i = 0;
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(s);
    for (i = 8; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, mv);
    for (float v : lanes) m = std::max(m, v);
  }
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}

// exp_avx2 clamps at -87: exponents below give ~1.6e-38 instead of a smaller number or 0,
// a difference no softmax sum can see.
float exp_sum_avx2(float* s, int n, float m, float scale) {
  const __m256 mv = _mm256_set1_ps(m), sv = _mm256_set1_ps(scale);
  __m256 sum = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_avx2(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), mv), sv));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = 0.f;
  for (float v : lanes) total += v;
  for (; i < n; ++i) {
    s[i] = std::exp((s[i] - m) * scale);
    total += s[i];
  }
  return total;
}

void silu_mul_avx2(const float* g, const float* u, float* y, int n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

}  // namespace

const KernelTable* PLM_AVX2_TABLE() {
  static const KernelTable table = {
      PLM_AVX2_NAME,
      {
          matmul_float<WKind::F32>,              // F32
          matmul_float<WKind::F16>,              // F16
          matmul_quant<Q8Format>,                // Q8_0
          matmul_quant<Q4Format<32, false>>,     // Q4_0
          matmul_quant<Q4Format<32, true>>,      // Q4_1
          matmul_quant<Q4Format<64, false>>,     // Q4_0_G64
          matmul_quant<Q4Format<128, false>>,    // Q4_0_G128
          matmul_quant<Q4Format<64, true>>,      // Q4_1_G64
          matmul_quant<Q4Format<128, true>>,     // Q4_1_G128
          matmul_quant<I8Format>,                // I8
          matmul_quant<Q5Format<false>>,         // Q5_0
          matmul_quant<Q5Format<true>>,          // Q5_1
          matmul_kquant<QKFormat<false>>,        // Q4_K
          matmul_kquant<QKFormat<true>>,         // Q5_K
          matmul_kquant<Q6KFormat>,              // Q6_K
          matmul_float<WKind::BF16>,             // BF16
          PLM_AVX2_NS::matmul_x16,               // Q8_0_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_0_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_1_X16
          PLM_AVX2_NS::matmul_x16,               // I8_X16
          PLM_AVX2_NS::matmul_x16,               // Q5_0_X16
          PLM_AVX2_NS::matmul_x16,               // Q5_1_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_0_G64_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_0_G128_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_1_G64_X16
          PLM_AVX2_NS::matmul_x16,               // Q4_1_G128_X16
      },
      quantize_act_avx2,
      ref_kernels().dequant_row,
      dot_avx2,
      axpy_avx2,
      scale_avx2,
      rms_norm_avx2,
      silu_mul_avx2,
      add_avx2,
      {
          matmul2_float<matmul_float<WKind::F32>>,          // F32
          matmul2_float<matmul_float<WKind::F16>>,          // F16
          matmul_quant<Q8Format, BlockQ8A2>,                // Q8_0
          matmul_quant<Q4Format<32, false>, BlockQ8A2>,     // Q4_0
          matmul_quant<Q4Format<32, true>, BlockQ8A2>,      // Q4_1
          matmul_quant<Q4Format<64, false>, BlockQ8A2>,     // Q4_0_G64
          matmul_quant<Q4Format<128, false>, BlockQ8A2>,    // Q4_0_G128
          matmul_quant<Q4Format<64, true>, BlockQ8A2>,      // Q4_1_G64
          matmul_quant<Q4Format<128, true>, BlockQ8A2>,     // Q4_1_G128
          matmul_quant<I8Format, BlockQ8A2>,                // I8
          matmul_quant<Q5Format<false>, BlockQ8A2>,         // Q5_0
          matmul_quant<Q5Format<true>, BlockQ8A2>,          // Q5_1
          matmul_kquant<QKFormat<false>, BlockQ8A2>,        // Q4_K
          matmul_kquant<QKFormat<true>, BlockQ8A2>,         // Q5_K
          matmul_kquant<Q6KFormat, BlockQ8A2>,              // Q6_K
          matmul2_float<matmul_float<WKind::BF16>>,         // BF16
          PLM_AVX2_NS::matmul2_x16,                         // Q8_0_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_0_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_1_X16
          PLM_AVX2_NS::matmul2_x16,                         // I8_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q5_0_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q5_1_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_0_G64_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_0_G128_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_1_G64_X16
          PLM_AVX2_NS::matmul2_x16,                         // Q4_1_G128_X16
      },
      quantize_act2_avx2,
      weighted_sum_by_axpy<axpy_avx2>,
      max_avx2,
      exp_sum_avx2,
      to_f16_avx2,
      weighted_sum_f16_avx2,
  };
  return &table;
}

}  // namespace plm::kernels
