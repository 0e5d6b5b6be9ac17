// AVX2 + FMA + F16C kernels. Compiled with those flags; only reached through
// dispatch.cpp after CPUID confirms the features.
//
// Quantized matmul: one ymm = one 32-element run. Integer dot products use
// vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd:
//   Q4 nibbles (0..15) are unsigned as stored; Q4_0's -8 is removed exactly in
//   16-bit by subtracting maddubs(8, a), precomputed per activation run.
//   Q8_0/I8 use |w| x sign(a, w), exact for every int8 w since |a| <= 127.
// Activations are repacked per token tile (run + broadcast scales) and weight
// rows are processed in L2-sized chunks, as in the AVX-512 file.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/kernels.h"

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
inline void quant_block(const __m256* v, float* d_out, float* s_out, int8_t* qs, __m256i* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
  const float amax = hmax(m);
  const float d = amax / 127.0f;
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
    quant_block(r, &o.d2, &o.s2, o.qs2, q);
  }
}

enum class Aux { Off8, None, SumDiv8 };

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
    if constexpr (A == Aux::Off8) out[r].aux = _mm256_maddubs_epi16(_mm256_set1_epi8(8), qs);
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
    if constexpr (A == Aux::Off8) {
      out[r].aux = _mm256_maddubs_epi16(_mm256_set1_epi8(8), qs);
      out[r].aux2 = _mm256_maddubs_epi16(_mm256_set1_epi8(8), qs2);
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

template <class F, int RN, int RT>
inline void qtile(const uint8_t* const* rows, const PackedRun* pk, int nruns, float* y, size_t ldy,
                  const float* row_scales) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int r = 0; r < nruns; ++r) {
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
                  const float* row_scales) {
  __m256 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_setzero_ps();
  for (int r = 0; r < nruns; ++r) {
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
        if (rt == 2) qtile<F, 4, 2>(rows, pk, nruns, yt + n, ldy, rs);
        else qtile<F, 4, 1>(rows, pk, nruns, yt + n, ldy, rs);
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

// ---------------------------------------------------------------- f32 / f16 matmul

template <bool Half>
inline __m256 load_w(const uint8_t* row, int k) {
  if constexpr (Half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  else return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
template <bool Half>
inline float load_w1(const uint8_t* row, int k) {
  if constexpr (Half) return f16_scalar(row + 2 * k);
  else return reinterpret_cast<const float*>(row)[k];
}

template <bool Half, int RN, int RT>
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
      const __m256 wv = load_w<Half>(rows[n], k);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) acc[n][t] = _mm256_fmadd_ps(wv, xv[t], acc[n][t]);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = hsum(acc[n][t]);
      for (int kk = k; kk < K; ++kk) v += load_w1<Half>(rows[n], kk) * x[t * ldx + kk];
      y[t * ldy + n] = v;
    }
}

template <bool Half>
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
        if (rt == 2) ftile<Half, 4, 2>(rows, xt, ldx, K, yt + n, ldy);
        else ftile<Half, 4, 1>(rows, xt, ldx, K, yt + n, ldy);
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        if (rt == 2) ftile<Half, 1, 2>(rows, xt, ldx, K, yt + n, ldy);
        else ftile<Half, 1, 1>(rows, xt, ldx, K, yt + n, ldy);
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

const KernelTable* avx2_kernel_table() {
  static const KernelTable table = {
      "avx2",
      {
          matmul_float<false>,                   // F32
          matmul_float<true>,                    // F16
          matmul_quant<Q8Format>,                // Q8_0
          matmul_quant<Q4Format<32, false>>,     // Q4_0
          matmul_quant<Q4Format<32, true>>,      // Q4_1
          matmul_quant<Q4Format<64, false>>,     // Q4_0_G64
          matmul_quant<Q4Format<128, false>>,    // Q4_0_G128
          matmul_quant<Q4Format<64, true>>,      // Q4_1_G64
          matmul_quant<Q4Format<128, true>>,     // Q4_1_G128
          matmul_quant<I8Format>,                // I8
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
          matmul2_float<matmul_float<false>>,               // F32
          matmul2_float<matmul_float<true>>,                // F16
          matmul_quant<Q8Format, BlockQ8A2>,                // Q8_0
          matmul_quant<Q4Format<32, false>, BlockQ8A2>,     // Q4_0
          matmul_quant<Q4Format<32, true>, BlockQ8A2>,      // Q4_1
          matmul_quant<Q4Format<64, false>, BlockQ8A2>,     // Q4_0_G64
          matmul_quant<Q4Format<128, false>, BlockQ8A2>,    // Q4_0_G128
          matmul_quant<Q4Format<64, true>, BlockQ8A2>,      // Q4_1_G64
          matmul_quant<Q4Format<128, true>, BlockQ8A2>,     // Q4_1_G128
          matmul_quant<I8Format, BlockQ8A2>,                // I8
      },
      quantize_act2_avx2,
  };
  return &table;
}

}  // namespace plm::kernels
