// AVX-512 (F, BW, VL, DQ) + VNNI kernels. Compiled with AVX-512 flags; only
// reached through dispatch.cpp after CPUID confirms the features.
//
// Quantized matmul layout: K is walked in pairs of 32-element runs, so one zmm
// holds 64 int8 activations (two BlockQ8A) against 64 unsigned weight bytes.
// vpdpbusd needs u8 x s8, so signed weights are biased: Q4_0 nibbles are used as
// stored (0..15) and Q8_0/I8 bytes are xor 0x80 (w + 128); the bias times the
// activation sum is subtracted exactly by starting the int32 accumulator at
// -8*sum(a) / -128*sum(a). Q4_1's m*s term is added in float.
//
// Q5_0/Q5_1 are Q4 nibbles with a fifth bit OR-ed in from a 64-bit mask (bias 16 / m*s).
// K-quants (256-element super-blocks, see the K-quant section) decode their 6- or 8-bit
// sub-block scales once per super-block into one zmm of floats; the inner loop is
// unpack + vpdpbusd + one permute of the (weight scale x activation scale) vector.
//
// Activations are first repacked (per tile of tokens) into zmm-ready pairs with
// their scales broadcast, so the inner loop does only: decode weight, dpbusd,
// convert, scale, accumulate. Weight rows are processed in chunks that stay in
// L2 while every token tile passes over them (prefill is then compute-bound).
// GCC 12 flags its own _mm512_undefined_* / masked-intrinsic headers as uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/kv_prefetch.h"
#include "kernels/x86/gemm_avx512.h"
#include "kernels/x86/sparse_avx512.h"
#include "kernels/x86/x16_avx512.h"

namespace plm::kernels {
const KernelTable* avx512_kernel_table();
namespace {

inline __mmask16 tail_mask(int n) { return (__mmask16)((1u << n) - 1u); }  // n in [0, 16]

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ---------------------------------------------------------------- activations

// round-half-away-from-zero(v) as int32, bit-identical to std::round. Written
// without subtracting from v so that no FMA contraction can change it.
inline __m512i round_away_epi32(__m512 v) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512 av = _mm512_andnot_ps(sign, v);
  const __m512 t = _mm512_roundscale_ps(av, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_add_ps(t, _mm512_set1_ps(0.5f)), av, _CMP_LE_OQ);
  __m512 r = _mm512_mask_add_ps(t, up, t, _mm512_set1_ps(1.0f));
  r = _mm512_or_ps(r, _mm512_and_ps(v, sign));
  return _mm512_cvttps_epi32(r);
}

// One 32-block held in x0, x1 (BlockQ8A rule): writes d, s, qs; returns the
// clamped int32 codes in q0, q1.
// scale < 0: the block's own, max|x| / 127; else that scale (the second level of BlockQ8A2).
inline void quant_block(__m512 x0, __m512 x1, float* d_out, float* s_out, int8_t* qs, __m512i& q0, __m512i& q1,
                        float scale = -1.0f) {
  const __m512 sign = _mm512_set1_ps(-0.0f);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const float d = scale < 0.0f ? _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0),
                                                                    _mm512_andnot_ps(sign, x1))) / 127.0f
                               : scale;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m512 vid = _mm512_set1_ps(id);
  q0 = round_away_epi32(_mm512_mul_ps(x0, vid));
  q1 = round_away_epi32(_mm512_mul_ps(x1, vid));
  q0 = _mm512_min_epi32(_mm512_max_epi32(q0, lo), hi);
  q1 = _mm512_min_epi32(_mm512_max_epi32(q1, lo), hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qs), _mm512_cvtepi32_epi8(q0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(qs + 16), _mm512_cvtepi32_epi8(q1));
  const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
  *d_out = d;
  *s_out = d * (float)sum;
}

void quantize_act_avx512(const float* x, BlockQ8A* out, int K) {
  for (int b = 0; b < K / 32; ++b) {
    __m512i q0, q1;
    quant_block(_mm512_loadu_ps(x + 32 * b), _mm512_loadu_ps(x + 32 * b + 16), &out[b].d, &out[b].s, out[b].qs,
                q0, q1);
  }
}

// Residual r = x - d*q with one rounding (vfnmadd, as std::fma in the reference).
void quantize_act2_avx512(const float* x, BlockQ8A2* out, int K) {
  for (int b = 0; b < K / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    BlockQ8A2& o = out[b];
    __m512i q0, q1;
    quant_block(x0, x1, &o.d, &o.s, o.qs, q0, q1);
    const __m512 vd = _mm512_set1_ps(o.d);
    const __m512 r0 = _mm512_fnmadd_ps(vd, _mm512_cvtepi32_ps(q0), x0);
    const __m512 r1 = _mm512_fnmadd_ps(vd, _mm512_cvtepi32_ps(q1), x1);
    quant_block(r0, r1, &o.d2, &o.s2, o.qs2, q0, q1, o.d * kLevel2Scale);
  }
}

// How the weight bias is compensated (see the top of the file).
enum class Aux { Off8, Off16, Off128, SumDiv8 };

inline __m512i bias_bytes(Aux a) {
  return _mm512_set1_epi8(a == Aux::Off8 ? 8 : a == Aux::Off16 ? 16 : (char)0x80);
}

// Two activation runs ready for the inner loop. Lanes 0-7 belong to run 2p,
// lanes 8-15 to run 2p+1 (all zero when K/32 is odd and this is the last pair).
struct alignas(64) PackedPair {
  __m512i qs;   // 64 int8
  __m512 d;     // activation scale of each half, broadcast
  __m512i aux;  // Off*: int32 bias correction; SumDiv8: float s/8 of each half, broadcast
};

template <Aux A>
void pack_token(const BlockQ8A* xa, int nruns, PackedPair* out) {
  const int npairs = (nruns + 1) / 2;
  for (int p = 0; p < npairs; ++p) {
    const BlockQ8A& b0 = xa[2 * p];
    const bool has1 = 2 * p + 1 < nruns;
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0.qs));
    const __m256i q1 = has1 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa[2 * p + 1].qs))
                            : _mm256_setzero_si256();
    const __m512i qs = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    const float d1 = has1 ? xa[2 * p + 1].d : 0.0f, s1 = has1 ? xa[2 * p + 1].s : 0.0f;
    PackedPair& o = out[p];
    o.qs = qs;
    o.d = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(b0.d)), _mm256_set1_ps(d1), 1);
    if constexpr (A == Aux::SumDiv8) {
      o.aux = _mm512_castps_si512(_mm512_insertf32x8(
          _mm512_castps256_ps512(_mm256_set1_ps(b0.s * 0.125f)), _mm256_set1_ps(s1 * 0.125f), 1));
    } else {
      const __m512i bias = bias_bytes(A);
      o.aux = _mm512_sub_epi32(_mm512_setzero_si512(),
                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, qs));
    }
  }
}

// Two-level activations: both int8 levels of two runs, scales and bias terms.
struct alignas(64) PackedPair2 {
  __m512i qs, qs2;  // 64 int8 each
  __m512 d, d2;     // scales of each half, broadcast
  __m512i aux;      // Off*: int32 bias correction of qs; SumDiv8: float (s+s2)/8 of each half, broadcast
  __m512i aux2;     // Off*: int32 bias correction of qs2; SumDiv8: unused
};

template <class Block> struct PackOf;
template <> struct PackOf<BlockQ8A> { using type = PackedPair; };
template <> struct PackOf<BlockQ8A2> { using type = PackedPair2; };

inline __m512 halves(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}
inline __m512i load_pair(const int8_t* a, const int8_t* b) {  // b may be nullptr: zeros
  const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  const __m256i q1 = b ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)) : _mm256_setzero_si256();
  return _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
}

template <Aux A>
void pack_token(const BlockQ8A2* xa, int nruns, PackedPair2* out) {
  const int npairs = (nruns + 1) / 2;
  for (int p = 0; p < npairs; ++p) {
    const BlockQ8A2& b0 = xa[2 * p];
    const BlockQ8A2* b1 = 2 * p + 1 < nruns ? &xa[2 * p + 1] : nullptr;
    PackedPair2& o = out[p];
    o.qs = load_pair(b0.qs, b1 ? b1->qs : nullptr);
    o.qs2 = load_pair(b0.qs2, b1 ? b1->qs2 : nullptr);
    o.d = halves(b0.d, b1 ? b1->d : 0.0f);
    o.d2 = halves(b0.d2, b1 ? b1->d2 : 0.0f);
    if constexpr (A == Aux::SumDiv8) {
      o.aux = _mm512_castps_si512(halves((b0.s + b0.s2) * 0.125f, b1 ? (b1->s + b1->s2) * 0.125f : 0.0f));
      o.aux2 = _mm512_setzero_si512();
    } else {
      const __m512i bias = bias_bytes(A);
      o.aux = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, o.qs));
      o.aux2 = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, o.qs2));
    }
  }
}

// ---------------------------------------------------------------- weight formats
// Each gives, for runs r0 and r1 of a row, 64 unsigned weight bytes laid out like
// PackedPair::qs, and (if it has them) the per-run scale / min broadcast per half.

// Lanes 0-7: the f16 at p0, lanes 8-15: the f16 at p1 (one convert and one permute).
inline __m512 f16_pair(const uint8_t* p0, const uint8_t* p1) {
  const __m128i h = _mm_insert_epi16(_mm_cvtsi32_si128(load_u16(p0)), load_u16(p1), 1);
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                               _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}
// The (d, m) f16 pairs at p0 and p1 at once: d = [d0 x 8, d1 x 8], m = [m0 x 8, m1 x 8].
inline void f16_pairs2(const uint8_t* p0, const uint8_t* p1, __m512& d, __m512& m) {
  uint32_t a, b;
  std::memcpy(&a, p0, 4);
  std::memcpy(&b, p1, 4);
  const __m512 v = _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, (int)b, (int)a)));  // d0 m0 d1 m1
  d = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2), v);
  m = _mm512_permutexvar_ps(_mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3), v);
}

template <int G, bool Asym>
struct Q4Format {
  static constexpr int kHdr = Asym ? 4 : 2;
  static constexpr int kBlockBytes = kHdr + G / 2;
  static constexpr int kRunsPerBlock = G / 32;
  static constexpr Aux kAux = Asym ? Aux::SumDiv8 : Aux::Off8;
  static constexpr bool kHasScale = true, kHasMin = Asym;
  static const uint8_t* block(const uint8_t* row, int r) { return row + (r / kRunsPerBlock) * kBlockBytes; }
  static const uint8_t* qs(const uint8_t* row, int r) {
    return block(row, r) + kHdr + 16 * (r % kRunsPerBlock);
  }
  static __m512i weights(const uint8_t* row, int r0, int r1) {
    // 128-bit lanes: [qs0, qs0, qs1, qs1] -> [qs0 & 15, qs0 >> 4, qs1 & 15, qs1 >> 4]
    __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs(row, r0))));
    z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs(row, r1))));
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                            0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0x0F));
  }
  static __m512 scale(const uint8_t* row, int r0, int r1) { return f16_pair(block(row, r0), block(row, r1)); }
  static void scale_min(const uint8_t* row, int r0, int r1, __m512& d, __m512& m) {
    f16_pairs2(block(row, r0), block(row, r1), d, m);
  }
};

// Q5_0 (x = d*(q-16)) and Q5_1 (x = d*q + m): Q4 nibbles plus bit j of the u32 qh as bit 4
// of element j, which is byte j of the run's 32-byte half: one masked OR.
template <bool Asym>
struct Q5Format {
  static constexpr int kHdr = Asym ? 4 : 2;
  static constexpr int kBlockBytes = kHdr + 4 + 16;
  static constexpr Aux kAux = Asym ? Aux::SumDiv8 : Aux::Off16;
  static constexpr bool kHasScale = true, kHasMin = Asym;
  static __m512i weights(const uint8_t* row, int r0, int r1) {
    const uint8_t* b0 = row + r0 * kBlockBytes;
    const uint8_t* b1 = row + r1 * kBlockBytes;
    __m512i z = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + kHdr + 4)));
    z = _mm512_mask_broadcast_i32x4(z, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + kHdr + 4)));
    const __m512i shifts = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                            0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    const __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0x0F));
    uint32_t h0, h1;
    std::memcpy(&h0, b0 + kHdr, 4);
    std::memcpy(&h1, b1 + kHdr, 4);
    const __mmask64 high = _cvtu64_mask64((uint64_t)h0 | (uint64_t)h1 << 32);
    return _mm512_mask_add_epi8(lo, high, lo, _mm512_set1_epi8(0x10));  // + 16 == | 16 on a nibble
  }
  static __m512 scale(const uint8_t* row, int r0, int r1) {
    return f16_pair(row + r0 * kBlockBytes, row + r1 * kBlockBytes);
  }
  static void scale_min(const uint8_t* row, int r0, int r1, __m512& d, __m512& m) {
    f16_pairs2(row + r0 * kBlockBytes, row + r1 * kBlockBytes, d, m);
  }
};

struct Q8Format {
  static constexpr Aux kAux = Aux::Off128;
  static constexpr bool kHasScale = true, kHasMin = false;
  static __m512i weights(const uint8_t* row, int r0, int r1) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 34 * r0 + 2));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 34 * r1 + 2));
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1), _mm512_set1_epi8((char)0x80));
  }
  static __m512 scale(const uint8_t* row, int r0, int r1) { return f16_pair(row + 34 * r0, row + 34 * r1); }
};

struct I8Format {  // the per-row scale is applied after the reduction
  static constexpr Aux kAux = Aux::Off128;
  static constexpr bool kHasScale = false, kHasMin = false;
  static __m512i weights(const uint8_t* row, int r0, int r1) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * r0));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * r1));
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1), _mm512_set1_epi8((char)0x80));
  }
  static __m512 scale(const uint8_t*, int, int) { return _mm512_set1_ps(1.0f); }
};

// ---------------------------------------------------------------- quantized matmul

constexpr int kTokTile = 4;
constexpr size_t kChunkBytes = 256 * 1024;  // weight rows kept hot while all token tiles pass

// Decode (one token) streams every weight byte once from memory, in tiles of 8 rows that are
// short runs (a few hundred bytes each) the hardware prefetcher barely trains on. Each
// iteration of a decode tile's K loop therefore prefetches its share of the bytes of the
// tile kPrefetchTiles further on (contiguous when rows are), so that the loads of the
// next tiles are in flight while this one computes. Prefetches never fault, so running
// past the end of the weights is harmless.
constexpr int kPrefetchTiles = 1;  // 2 and 4 measured the same
struct Prefetch {
  const uint8_t* p = nullptr;  // start of the bytes to fetch in this tile; nullptr: none
  size_t step = 0;             // bytes per K iteration, a multiple of 64
  inline void at(int i) const {
    if (!p) return;
    const uint8_t* a = p + (size_t)i * step;
    for (size_t o = 0; o < step; o += 64) _mm_prefetch(reinterpret_cast<const char*>(a + o), _MM_HINT_T0);
  }
};
// The prefetch for the decode tile whose first row starts at `tile`, `tile_bytes` long, over `iters` K iterations.
inline Prefetch decode_prefetch(const uint8_t* tile, size_t tile_bytes, int iters) {
  Prefetch pf;
  pf.p = tile + kPrefetchTiles * tile_bytes;
  pf.step = ((tile_bytes + (size_t)iters - 1) / (size_t)iters + 63) & ~(size_t)63;
  return pf;
}

// RN weight rows x RT tokens; pk holds RT tokens of npairs packed pairs each.
template <class F, int RN, int RT>
inline void qtile(const uint8_t* const* rows, const PackedPair* pk, int npairs, int nruns, float* y,
                  size_t ldy, const float* row_scales, Prefetch pf = {}) {
  __m512 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_setzero_ps();
  for (int p = 0; p < npairs; ++p) {
    pf.at(p);
    const int r0 = 2 * p, r1 = 2 * p + 1 < nruns ? 2 * p + 1 : 2 * p;  // odd tail: reread r0, times 0
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const __m512i w = F::weights(rows[n], r0, r1);
      __m512 dw = _mm512_undefined_ps(), mw = _mm512_undefined_ps();
      if constexpr (F::kHasMin) F::scale_min(rows[n], r0, r1, dw, mw);
      else if constexpr (F::kHasScale) dw = F::scale(rows[n], r0, r1);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedPair& a = pk[t * npairs + p];
        const __m512i init = F::kAux == Aux::SumDiv8 ? _mm512_setzero_si512() : a.aux;
        const __m512 idot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, w, a.qs));
        const __m512 sc = F::kHasScale ? _mm512_mul_ps(dw, a.d) : a.d;
        acc[n][t] = _mm512_fmadd_ps(idot, sc, acc[n][t]);
        if constexpr (F::kHasMin) acc[n][t] = _mm512_fmadd_ps(mw, _mm512_castsi512_ps(a.aux), acc[n][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = _mm512_reduce_add_ps(acc[n][t]);
      if (row_scales) v *= row_scales[n];
      y[t * ldy + n] = v;
    }
}

// Two-level activations: each decoded weight vector feeds two vpdpbusd.
template <class F, int RN, int RT>
inline void qtile(const uint8_t* const* rows, const PackedPair2* pk, int npairs, int nruns, float* y,
                  size_t ldy, const float* row_scales, Prefetch pf = {}) {
  __m512 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_setzero_ps();
  for (int p = 0; p < npairs; ++p) {
    pf.at(p);
    const int r0 = 2 * p, r1 = 2 * p + 1 < nruns ? 2 * p + 1 : 2 * p;  // odd tail: reread r0, times 0
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const __m512i w = F::weights(rows[n], r0, r1);
      __m512 dw = _mm512_undefined_ps(), mw = _mm512_undefined_ps();
      if constexpr (F::kHasMin) F::scale_min(rows[n], r0, r1, dw, mw);
      else if constexpr (F::kHasScale) dw = F::scale(rows[n], r0, r1);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        const PackedPair2& a = pk[t * npairs + p];
        constexpr bool kSum = F::kAux == Aux::SumDiv8;
        const __m512i init1 = kSum ? _mm512_setzero_si512() : a.aux;
        const __m512i init2 = kSum ? _mm512_setzero_si512() : a.aux2;
        const __m512 i1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init1, w, a.qs));
        const __m512 i2 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init2, w, a.qs2));
        const __m512 v = _mm512_fmadd_ps(i1, a.d, _mm512_mul_ps(i2, a.d2));
        acc[n][t] = F::kHasScale ? _mm512_fmadd_ps(v, dw, acc[n][t]) : _mm512_add_ps(acc[n][t], v);
        if constexpr (F::kHasMin) acc[n][t] = _mm512_fmadd_ps(mw, _mm512_castsi512_ps(a.aux), acc[n][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float v = _mm512_reduce_add_ps(acc[n][t]);
      if (row_scales) v *= row_scales[n];
      y[t * ldy + n] = v;
    }
}

template <class F, int RN, class P>
inline void qtile_rt(int rt, const uint8_t* const* rows, const P* pk, int npairs, int nruns, float* y,
                     size_t ldy, const float* row_scales, Prefetch pf = {}) {
  switch (rt) {
    case 1: qtile<F, RN, 1>(rows, pk, npairs, nruns, y, ldy, row_scales, pf); break;
    case 2: qtile<F, RN, 2>(rows, pk, npairs, nruns, y, ldy, row_scales, pf); break;
    case 3: qtile<F, RN, 3>(rows, pk, npairs, nruns, y, ldy, row_scales, pf); break;
    default: qtile<F, RN, 4>(rows, pk, npairs, nruns, y, ldy, row_scales, pf); break;
  }
}


// Block = BlockQ8A (matmul) or BlockQ8A2 (matmul2); the tiles are picked by the packed type.
template <class F, class Block = BlockQ8A>
void matmul_quant(const WeightView& w, const float*, size_t, const Block* xq, int T, float* y, size_t ldy,
                  int n0, int n1) {
  if (!w.row_invariant && avx512::gemm(w, xq, T, y, ldy, n0, n1)) return;  // prefill
  using Packed = typename PackOf<Block>::type;
  const int nruns = (int)(w.cols / 32), npairs = (nruns + 1) / 2;
  // Grows once to the largest K seen by this thread; later calls do not allocate.
  thread_local std::vector<Packed> scratch;
  if (scratch.size() < (size_t)kTokTile * npairs) scratch.resize((size_t)kTokTile * npairs);
  Packed* pk = scratch.data();
  const bool i8 = w.dtype == DType::I8;
  int chunk = (int)std::min<size_t>((size_t)(n1 - n0), std::max<size_t>(8, kChunkBytes / std::max<size_t>(w.row_stride, 1)));
  chunk = std::max(4, chunk & ~3);
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      const int rt = std::min(kTokTile, T - t0);
      for (int t = 0; t < rt; ++t) pack_token<F::kAux>(xq + (size_t)(t0 + t) * nruns, nruns, pk + t * npairs);
      float* yt = y + (size_t)t0 * ldy;
      int n = c0;
      if (rt == 1) {  // decode: more rows per tile to amortise the activation loads
        for (; n + 8 <= c1; n += 8) {
          const uint8_t* rows[8];
          for (int i = 0; i < 8; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
          qtile<F, 8, 1>(rows, pk, npairs, nruns, yt + n, ldy, i8 ? w.row_scales + n : nullptr,
                         decode_prefetch(rows[0], 8 * w.row_stride, npairs));
        }
      }
      for (; n + 4 <= c1; n += 4) {
        const uint8_t* rows[4];
        for (int i = 0; i < 4; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
        // The first token tile streams the rows from memory (later ones find them in L2): prefetched
        // as decode's are (a step verifying a few drafted tokens runs here, not in the GEMM).
        qtile_rt<F, 4>(rt, rows, pk, npairs, nruns, yt + n, ldy, i8 ? w.row_scales + n : nullptr,
                       t0 == 0 ? decode_prefetch(rows[0], 4 * w.row_stride, npairs) : Prefetch{});
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        qtile_rt<F, 1>(rt, rows, pk, npairs, nruns, yt + n, ldy, i8 ? w.row_scales + n : nullptr);
      }
    }
  }
}

// ---------------------------------------------------------------- K-quants
// A 256-element super-block of a row meets 8 activation blocks = 4 zmm pairs. Per super-block
// and row the sub-block scales are decoded once into one zmm `wsc` of floats:
//   Q4_K/Q5_K: [d*sc_0 .. d*sc_7, dmin*mn_0 .. dmin*mn_7]      (8 sub-blocks of 32)
//   Q6_K:      [d*sc_0 .. d*sc_15]                              (16 sub-blocks of 16)
// and multiplied by the token's packed activation vector `dv` (below) into `prod`. Pair c then
// needs, per int32 lane of its vpdpbusd result, the prod entry of the lane's sub-block: one
// vpermps with a constant index (Q4_K/Q5_K: lanes 0-7 sub-block 2c, 8-15 sub-block 2c+1; Q6_K:
// a lane sums 4 bytes, so lane l of pair c belongs to sub-block 4c + l/4). The K-quant mins
// need each activation block's sum s: dv's upper half holds -s, so prod's upper half is
// -dmin*mn*s, added once per super-block with a masked add. Q6_K's codes are 0..63 (q - 32):
// the accumulator starts at -32 * (sum of the lane's 4 activations), exact in int32.

struct alignas(64) PackedK {  // one token, one super-block
  __m512i qs[4];   // the 8 activation runs as 4 pairs
  __m512 dv;       // Q4_K/Q5_K: [d_0..d_7, -s_0..-s_7]; Q6_K: [d_0, d_0, d_1, d_1, .., d_7, d_7]
  __m512i aux[4];  // Q6_K: per lane -32 * sum of its 4 activations
};
struct alignas(64) PackedK2 {  // two-level activations
  __m512i qs[4], qs2[4];
  __m512 dv, dv2;  // dv as PackedK with -(s + s2) for the mins; dv2: the d2 of each run (mins: 0)
  __m512i aux[4], aux2[4];
};
template <class Block> struct PackKOf;
template <> struct PackKOf<BlockQ8A> { using type = PackedK; };
template <> struct PackKOf<BlockQ8A2> { using type = PackedK2; };

inline __m512i neg_bias_sum(__m512i qs, char bias) {
  return _mm512_sub_epi32(_mm512_setzero_si512(),
                          _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(bias), qs));
}

// dv from 8 per-run values v and (Q4_K/Q5_K) 8 mins terms m.
template <bool Q6>
inline __m512 k_scales_vec(const float* v, const float* m) {
  alignas(64) float t[16];
  for (int r = 0; r < 8; ++r) {
    if constexpr (Q6) t[2 * r] = t[2 * r + 1] = v[r];
    else t[r] = v[r], t[8 + r] = m[r];
  }
  return _mm512_load_ps(t);
}

template <bool Q6>
void pack_token_k(const BlockQ8A* xa, int nsb, PackedK* out) {
  for (int b = 0; b < nsb; ++b) {
    const BlockQ8A* a = xa + 8 * b;
    PackedK& o = out[b];
    float d[8], ms[8];
    for (int r = 0; r < 8; ++r) d[r] = a[r].d, ms[r] = -a[r].s;
    for (int c = 0; c < 4; ++c) {
      o.qs[c] = load_pair(a[2 * c].qs, a[2 * c + 1].qs);
      if constexpr (Q6) o.aux[c] = neg_bias_sum(o.qs[c], 32);
    }
    o.dv = k_scales_vec<Q6>(d, ms);
  }
}

template <bool Q6>
void pack_token_k(const BlockQ8A2* xa, int nsb, PackedK2* out) {
  for (int b = 0; b < nsb; ++b) {
    const BlockQ8A2* a = xa + 8 * b;
    PackedK2& o = out[b];
    float d[8], d2[8], ms[8], zero[8] = {};
    for (int r = 0; r < 8; ++r) d[r] = a[r].d, d2[r] = a[r].d2, ms[r] = -(a[r].s + a[r].s2);
    for (int c = 0; c < 4; ++c) {
      o.qs[c] = load_pair(a[2 * c].qs, a[2 * c + 1].qs);
      o.qs2[c] = load_pair(a[2 * c].qs2, a[2 * c + 1].qs2);
      if constexpr (Q6) {
        o.aux[c] = neg_bias_sum(o.qs[c], 32);
        o.aux2[c] = neg_bias_sum(o.qs2[c], 32);
      }
    }
    o.dv = k_scales_vec<Q6>(d, ms);
    o.dv2 = k_scales_vec<Q6>(d2, zero);
  }
}

// Q4_K (Q5 = false) and Q5_K.
template <bool Q5>
struct QKFormat {
  static constexpr int kBlockBytes = Q5 ? 176 : 144;
  static constexpr bool kQ6 = false;
  static __m512 scales(const uint8_t* blk) {  // [d*sc_0..7, dmin*mn_0..7]
    uint32_t u[3];
    std::memcpy(u, blk + 4, 12);
    const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, mn_lo = u[1] & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
    const __m128i b = _mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)mn_lo, (int)mn_hi);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), f16_pair(blk, blk + 2));
  }
  static __m512i index(int c) {  // lanes 0-7: sub-block 2c, lanes 8-15: 2c+1
    return _mm512_inserti64x4(_mm512_set1_epi32(2 * c), _mm256_set1_epi32(2 * c + 1), 1);
  }
  static __m512i weights(const uint8_t* blk, int c) {
    const uint8_t* qs = blk + (Q5 ? 48 : 16);
    const __m512i z = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c)));
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512i w = _mm512_and_si512(_mm512_srlv_epi16(z, shifts), _mm512_set1_epi8(0x0F));
    if constexpr (Q5) {  // bit s of qh[j]: bit 4 of element j of sub-block s
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
      const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * c))),
                                             _mm256_set1_epi8((char)(1 << (2 * c + 1))), 1);
      w = _mm512_mask_add_epi8(w, _mm512_test_epi8_mask(qh, bit), w, _mm512_set1_epi8(0x10));
    }
    return w;
  }
};

struct Q6KFormat {
  static constexpr int kBlockBytes = 210;
  static constexpr bool kQ6 = true;
  static __m512 scales(const uint8_t* blk) {  // [d*sc_0..15]
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(_cvtsh_ss(load_u16(blk + 208))));
  }
  static __m512i index(int c) {  // lane l: sub-block 4c + l/4
    return _mm512_add_epi32(_mm512_set1_epi32(4 * c),
                            _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0));
  }
  // Pair c = elements 64c..64c+63: low 4 bits from ql[64h..64h+63] (h = c/2) shifted by 4*(c%2),
  // high 2 bits from qh[32h..32h+31] shifted by 4*(c%2) (lower half) / 4*(c%2)+2 (upper half).
  static __m512i weights(const uint8_t* blk, int c) {
    const int h = c / 2, k = c % 2;
    const __m512i ql = _mm512_loadu_si512(blk + 64 * h);
    const __m512i lo = _mm512_and_si512(k ? _mm512_srli_epi16(ql, 4) : ql, _mm512_set1_epi8(0x0F));
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h)));
    // move the wanted 2 bits to bits 4-5 of each byte (cross-byte spill is masked off)
    const __m512i hi = k ? _mm512_srlv_epi16(qh, _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1))
                         : _mm512_sllv_epi16(qh, _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1));
    return _mm512_or_si512(lo, _mm512_and_si512(hi, _mm512_set1_epi8(0x30)));
  }
};

template <class KF, int RN, int RT>
inline void ktile(const uint8_t* const* rows, const PackedK* pk, int nsb, float* y, size_t ldy, Prefetch pf = {}) {
  __m512 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_setzero_ps();
  for (int b = 0; b < nsb; ++b) {
    pf.at(b);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const uint8_t* blk = rows[n] + (size_t)b * KF::kBlockBytes;
      const __m512 wsc = KF::scales(blk);
      __m512 prod[RT];
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        prod[t] = _mm512_mul_ps(wsc, pk[t * nsb + b].dv);
        if constexpr (!KF::kQ6) acc[n][t] = _mm512_mask_add_ps(acc[n][t], 0xFF00, acc[n][t], prod[t]);  // mins
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i w = KF::weights(blk, c);
        const __m512i idx = KF::index(c);
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const PackedK& a = pk[t * nsb + b];
          const __m512i init = KF::kQ6 ? a.aux[c] : _mm512_setzero_si512();
          const __m512 idot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, w, a.qs[c]));
          acc[n][t] = _mm512_fmadd_ps(idot, _mm512_permutexvar_ps(idx, prod[t]), acc[n][t]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) y[t * ldy + n] = _mm512_reduce_add_ps(acc[n][t]);
}

template <class KF, int RN, int RT>
inline void ktile(const uint8_t* const* rows, const PackedK2* pk, int nsb, float* y, size_t ldy, Prefetch pf = {}) {
  __m512 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_setzero_ps();
  for (int b = 0; b < nsb; ++b) {
    pf.at(b);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const uint8_t* blk = rows[n] + (size_t)b * KF::kBlockBytes;
      const __m512 wsc = KF::scales(blk);
      __m512 prod[RT], prod2[RT];
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) {
        prod[t] = _mm512_mul_ps(wsc, pk[t * nsb + b].dv);
        prod2[t] = _mm512_mul_ps(wsc, pk[t * nsb + b].dv2);
        if constexpr (!KF::kQ6) acc[n][t] = _mm512_mask_add_ps(acc[n][t], 0xFF00, acc[n][t], prod[t]);  // mins
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i w = KF::weights(blk, c);
        const __m512i idx = KF::index(c);
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const PackedK2& a = pk[t * nsb + b];
          const __m512i init = KF::kQ6 ? a.aux[c] : _mm512_setzero_si512();
          const __m512i init2 = KF::kQ6 ? a.aux2[c] : _mm512_setzero_si512();
          const __m512 i1 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init, w, a.qs[c]));
          const __m512 i2 = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(init2, w, a.qs2[c]));
          acc[n][t] = _mm512_fmadd_ps(i1, _mm512_permutexvar_ps(idx, prod[t]), acc[n][t]);
          acc[n][t] = _mm512_fmadd_ps(i2, _mm512_permutexvar_ps(idx, prod2[t]), acc[n][t]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) y[t * ldy + n] = _mm512_reduce_add_ps(acc[n][t]);
}

template <class KF, int RN, class P>
inline void ktile_rt(int rt, const uint8_t* const* rows, const P* pk, int nsb, float* y, size_t ldy,
                     Prefetch pf = {}) {
  switch (rt) {
    case 1: ktile<KF, RN, 1>(rows, pk, nsb, y, ldy, pf); break;
    case 2: ktile<KF, RN, 2>(rows, pk, nsb, y, ldy, pf); break;
    case 3: ktile<KF, RN, 3>(rows, pk, nsb, y, ldy, pf); break;
    default: ktile<KF, RN, 4>(rows, pk, nsb, y, ldy, pf); break;
  }
}

// Same tiling as matmul_quant: L2-sized row chunks, token tiles of kTokTile, 8 rows for decode.
template <class KF, class Block = BlockQ8A>
void matmul_kquant(const WeightView& w, const float*, size_t, const Block* xq, int T, float* y, size_t ldy,
                   int n0, int n1) {
  if (!w.row_invariant && avx512::gemm(w, xq, T, y, ldy, n0, n1)) return;  // prefill
  using Packed = typename PackKOf<Block>::type;
  const int nruns = (int)(w.cols / 32), nsb = (int)(w.cols / 256);
  thread_local std::vector<Packed> scratch;  // grows once to the largest K seen by this thread
  if (scratch.size() < (size_t)kTokTile * nsb) scratch.resize((size_t)kTokTile * nsb);
  Packed* pk = scratch.data();
  int chunk = (int)std::min<size_t>((size_t)(n1 - n0), std::max<size_t>(8, kChunkBytes / std::max<size_t>(w.row_stride, 1)));
  chunk = std::max(4, chunk & ~3);
  for (int c0 = n0; c0 < n1; c0 += chunk) {
    const int c1 = std::min(n1, c0 + chunk);
    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      const int rt = std::min(kTokTile, T - t0);
      for (int t = 0; t < rt; ++t) pack_token_k<KF::kQ6>(xq + (size_t)(t0 + t) * nruns, nsb, pk + t * nsb);
      float* yt = y + (size_t)t0 * ldy;
      int n = c0;
      if (rt == 1) {
        for (; n + 8 <= c1; n += 8) {
          const uint8_t* rows[8];
          for (int i = 0; i < 8; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
          ktile<KF, 8, 1>(rows, pk, nsb, yt + n, ldy, decode_prefetch(rows[0], 8 * w.row_stride, nsb));
        }
      }
      for (; n + 4 <= c1; n += 4) {
        const uint8_t* rows[4];
        for (int i = 0; i < 4; ++i) rows[i] = w.data + (size_t)(n + i) * w.row_stride;
        ktile_rt<KF, 4>(rt, rows, pk, nsb, yt + n, ldy,
                        t0 == 0 ? decode_prefetch(rows[0], 4 * w.row_stride, nsb) : Prefetch{});  // as qtile_rt
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        ktile_rt<KF, 1>(rt, rows, pk, nsb, yt + n, ldy);
      }
    }
  }
}

// ---------------------------------------------------------------- f32 / f16 / bf16 matmul

enum class WKind { F32, F16, BF16 };

inline __m512 bf16_to_ps(__m256i h) {  // bf16 is the high half of an f32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <WKind W>
inline __m512 load_w(const uint8_t* row, int k) {
  if constexpr (W == WKind::F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  else if constexpr (W == WKind::BF16) return bf16_to_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * k)));
  else return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + k);
}
template <WKind W>
inline __m512 load_w_masked(const uint8_t* row, int k, __mmask16 m) {
  if constexpr (W == WKind::F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * k));
  else if constexpr (W == WKind::BF16) return bf16_to_ps(_mm256_maskz_loadu_epi16(m, row + 2 * k));
  else return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + k);
}

// Lane j of each 128-bit lane of the result: the sum over that 128-bit lane of a, b, c, d for
// j = 0, 1, 2, 3 (two unpacks and a shuffle per pair: 9 instructions for 4 vectors).
inline __m512 sum4_lanes(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
}

// The 16 horizontal sums of 4 groups of 4 vectors in one vector: 128-bit lane g holds the sums
// of group g's vectors in order. 45 instructions, against 16 reduce_add_ps of about 8 each: a
// decode step's attention scores (4 key rows x 4 query heads of head_dim 64 per tile) spent
// more on reductions than on products. Its sums run in another order than reduce_add_ps.
inline __m512 sum4x4(__m512 a0, __m512 b0, __m512 c0, __m512 d0, __m512 a1, __m512 b1, __m512 c1, __m512 d1,
                     __m512 a2, __m512 b2, __m512 c2, __m512 d2, __m512 a3, __m512 b3, __m512 c3, __m512 d3) {
  const __m512 v0 = sum4_lanes(a0, b0, c0, d0), v1 = sum4_lanes(a1, b1, c1, d1);
  const __m512 v2 = sum4_lanes(a2, b2, c2, d2), v3 = sum4_lanes(a3, b3, c3, d3);
  // Sum the four 128-bit lanes of each v_g into lane g.
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xDD));
}

// y[t * ldy + n] = the sum of acc[n][t], for 4 rows and RT tokens, by sum4x4 (128-bit lane t of
// its result is token t's 4 sums). Only the float tiles use it: their 4-row tiles fall where n0
// and n1 put them, whatever the token count, so a row's sum order is the same in a step of one
// token and in a verifying step of several (the K-quant tiles of one token are 8 rows high and
// keep reduce_add_ps, as their 4-row tiles of several tokens must).
template <int RT>
inline void store_sums4(const __m512 (*acc)[RT], float* y, size_t ldy) {
  static_assert(RT >= 1 && RT <= 4, "tiles of 1 to 4 tokens");
  const __m512 z = _mm512_setzero_ps();
  auto col = [&](int n, int t) { return t < RT ? acc[n][t < RT ? t : 0] : z; };
  const __m512 r = sum4x4(col(0, 0), col(1, 0), col(2, 0), col(3, 0), col(0, 1), col(1, 1), col(2, 1), col(3, 1),
                          col(0, 2), col(1, 2), col(2, 2), col(3, 2), col(0, 3), col(1, 3), col(2, 3), col(3, 3));
  _mm_storeu_ps(y, _mm512_castps512_ps128(r));
  if constexpr (RT > 1) _mm_storeu_ps(y + ldy, _mm512_extractf32x4_ps(r, 1));
  if constexpr (RT > 2) _mm_storeu_ps(y + 2 * ldy, _mm512_extractf32x4_ps(r, 2));
  if constexpr (RT > 3) _mm_storeu_ps(y + 3 * ldy, _mm512_extractf32x4_ps(r, 3));
}

template <WKind W, int RN, int RT>
inline void ftile(const uint8_t* const* rows, const float* x, size_t ldx, int K, float* y, size_t ldy) {
  __m512 acc[RN][RT];
#pragma GCC unroll 8
  for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[RT];
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) xv[t] = _mm512_loadu_ps(x + t * ldx + k);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const __m512 wv = load_w<W>(rows[n], k);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_fmadd_ps(wv, xv[t], acc[n][t]);
    }
  }
  if (k < K) {
    const __mmask16 m = tail_mask(K - k);
    __m512 xv[RT];
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x + t * ldx + k);
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n) {
      const __m512 wv = load_w_masked<W>(rows[n], k, m);
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) acc[n][t] = _mm512_fmadd_ps(wv, xv[t], acc[n][t]);
    }
  }
  if constexpr (RN == 4) {
    store_sums4<RT>(acc, y, ldy);
  } else {
#pragma GCC unroll 8
    for (int n = 0; n < RN; ++n)
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t) y[t * ldy + n] = _mm512_reduce_add_ps(acc[n][t]);
  }
}

template <WKind W, int RN>
inline void ftile_rt(int rt, const uint8_t* const* rows, const float* x, size_t ldx, int K, float* y, size_t ldy) {
  switch (rt) {
    case 1: ftile<W, RN, 1>(rows, x, ldx, K, y, ldy); break;
    case 2: ftile<W, RN, 2>(rows, x, ldx, K, y, ldy); break;
    case 3: ftile<W, RN, 3>(rows, x, ldx, K, y, ldy); break;
    default: ftile<W, RN, 4>(rows, x, ldx, K, y, ldy); break;
  }
}

template <WKind W>
void matmul_float(const WeightView& w, const float* x, size_t ldx, const BlockQ8A*, int T, float* y, size_t ldy,
                  int n0, int n1) {
  const int K = (int)w.cols;
  int chunk = (int)std::min<size_t>((size_t)(n1 - n0), std::max<size_t>(8, kChunkBytes / std::max<size_t>(w.row_stride, 1)));
  chunk = std::max(4, chunk & ~3);
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
        if (t0 == 0 && w.kv_rows)  // attention's keys (kv_prefetch.h)
          for (int i = 0; i < 4; ++i) prefetch_kv_row(w.data, w.row_stride, n + i, n1, 0, w.row_stride);
        ftile_rt<W, 4>(rt, rows, xt, ldx, K, yt + n, ldy);
      }
      for (; n < c1; ++n) {
        const uint8_t* rows[1] = {w.data + (size_t)n * w.row_stride};
        ftile_rt<W, 1>(rt, rows, xt, ldx, K, yt + n, ldy);
      }
    }
  }
}

// ---------------------------------------------------------------- elementwise

float dot_avx512(const float* a, const float* b, int n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

void axpy_avx512(float a, const float* x, float* y, int n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

inline __m512 load_row(const float* r, __mmask16 m) { return _mm512_maskz_loadu_ps(m, r); }
inline __m512 load_row(const fp16_t* r, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, r)); }

// P.V: up to 6 weight rows x 64 outputs in 24 accumulators; each 64-value slice of a row is loaded
// (and converted) once per block of weight rows. load(p, i0, m, x) puts values i0.. of row p into
// x[0..3] (16 each, lanes off in m zero).
template <class Load>
__attribute__((always_inline)) inline void weighted_sum_blocked(const float* w, size_t ldw, int G, int n, float* out, size_t ldo, int dh,
                                 Load&& load) {
  constexpr int kG = 6, kV = 4;  // weight rows, zmm per row slice
  for (int i0 = 0; i0 < dh; i0 += 16 * kV) {
    __mmask16 m[kV];
    for (int v = 0; v < kV; ++v) m[v] = tail_mask(std::clamp(dh - i0 - 16 * v, 0, 16));
    for (int g0 = 0; g0 < G; g0 += kG) {
      const int ng = std::min(kG, G - g0);
      __m512 acc[kG][kV];
#pragma GCC unroll 6
      for (int g = 0; g < kG; ++g)
#pragma GCC unroll 4
        for (int v = 0; v < kV; ++v)
          acc[g][v] = g < ng ? _mm512_maskz_loadu_ps(m[v], out + (g0 + g) * ldo + i0 + 16 * v) : _mm512_setzero_ps();
      for (int p = 0; p < n; ++p) {
        __m512 x[kV];
        load(p, i0, m, x);
#pragma GCC unroll 6
        for (int g = 0; g < kG; ++g) {
          if (g < ng) {
            const __m512 a = _mm512_set1_ps(w[(g0 + g) * ldw + p]);
#pragma GCC unroll 4
            for (int v = 0; v < kV; ++v) acc[g][v] = _mm512_fmadd_ps(a, x[v], acc[g][v]);
          }
        }
      }
#pragma GCC unroll 6
      for (int g = 0; g < kG; ++g)
#pragma GCC unroll 4
        for (int v = 0; v < kV; ++v)
          if (g < ng) _mm512_mask_storeu_ps(out + (g0 + g) * ldo + i0 + 16 * v, m[v], acc[g][v]);
    }
  }
}

// P.V over f32 rows, or f16 rows of the KV cache.
template <class Row>
void weighted_sum_avx512(const float* w, size_t ldw, int G, const Row* rows, size_t ldr, int n, float* out,
                         size_t ldo, int dh) {
  weighted_sum_blocked(w, ldw, G, n, out, ldo, dh, [&](int p, int i0, const __mmask16* m, __m512* x)
                                                         __attribute__((always_inline)) {
    const Row* r = rows + (size_t)p * ldr + i0;
    prefetch_kv_row(rows, sizeof(Row) * ldr, p, n, sizeof(Row) * i0, sizeof(Row) * std::min(64, dh - i0));
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) x[v] = load_row(r + 16 * v, m[v]);
  });
}

// The Q8_0 KV cache: the 16 values at q of a block whose scale is d, as floats d * q.
inline __m512 q8_0_load16(const uint8_t* q, __m512 d, __mmask16 m) {
  return _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q))));
}
inline float q8_0_scale(const uint8_t* block) {
  uint16_t h;
  std::memcpy(&h, block, 2);
  return _cvtsh_ss(h);
}

constexpr int kQ8MaxDh = 256;  // head_dim the stack tiles below hold; larger goes to the reference

// Scores of G float queries against Q8_0 key rows: rows are decoded 4 at a time into a float tile
// (once for all G), then 4 dot products per query run from L1 and one 4-way reduction stores them.
void scores_q8_0_avx512(const uint8_t* rows, size_t ldr, const float* q, size_t ldq, int G, float* s, size_t lds,
                        int p0, int p1, int dh) {
  if (dh > kQ8MaxDh || dh % 16) return ref_kernels().scores_q8_0(rows, ldr, q, ldq, G, s, lds, p0, p1, dh);
  alignas(64) float tile[4][kQ8MaxDh];
  for (int p = p0; p < p1; p += 4) {
    const int np = std::min(4, p1 - p);
    for (int r = 0; r < 4; ++r) prefetch_kv_row(rows, ldr, p + r, p1, 0, ldr);
    for (int r = 0; r < 4; ++r) {
      const uint8_t* row = rows + (size_t)(p + std::min(r, np - 1)) * ldr;  // a short tile repeats its last row
      for (int b = 0; b < dh / 32; ++b, row += 34) {
        const __m512 d = _mm512_set1_ps(q8_0_scale(row));
        _mm512_store_ps(tile[r] + b * 32, q8_0_load16(row + 2, d, 0xffff));
        _mm512_store_ps(tile[r] + b * 32 + 16, q8_0_load16(row + 18, d, 0xffff));
      }
    }
    for (int g = 0; g < G; ++g) {
      const float* qg = q + (size_t)g * ldq;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int i = 0; i < dh; i += 16) {
        const __m512 qv = _mm512_loadu_ps(qg + i);
        a0 = _mm512_fmadd_ps(_mm512_load_ps(tile[0] + i), qv, a0);
        a1 = _mm512_fmadd_ps(_mm512_load_ps(tile[1] + i), qv, a1);
        a2 = _mm512_fmadd_ps(_mm512_load_ps(tile[2] + i), qv, a2);
        a3 = _mm512_fmadd_ps(_mm512_load_ps(tile[3] + i), qv, a3);
      }
      auto half = [](__m512 v) {
        return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      };
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
      alignas(16) float out[4];
      _mm_store_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
      for (int r = 0; r < np; ++r) s[(size_t)g * lds + p + r] = out[r];
    }
  }
}

// P.V over Q8_0 rows, blocked as weighted_sum_avx512: a 64-value slice is two blocks.
void weighted_sum_q8_0_avx512(const float* w, size_t ldw, int G, const uint8_t* rows, size_t ldr, int n,
                              float* out, size_t ldo, int dh) {
  weighted_sum_blocked(w, ldw, G, n, out, ldo, dh, [&](int p, int i0, const __mmask16* m, __m512* x)
                                                         __attribute__((always_inline)) {
    const uint8_t* b0 = rows + (size_t)p * ldr + (size_t)(i0 / 32) * 34;
    prefetch_kv_row(rows, ldr, p, n, (size_t)(i0 / 32) * 34, 34 * (size_t)std::min(2, (dh - i0) / 32));
    const __m512 d0 = _mm512_set1_ps(q8_0_scale(b0));
    // (the slice's second block exists only if dh goes on past it: its loads are masked off otherwise)
    const __m512 d1 = dh - i0 > 32 ? _mm512_set1_ps(q8_0_scale(b0 + 34)) : _mm512_setzero_ps();
    x[0] = q8_0_load16(b0 + 2, d0, m[0]);
    x[1] = q8_0_load16(b0 + 18, d0, m[1]);
    x[2] = q8_0_load16(b0 + 36, d1, m[2]);
    x[3] = q8_0_load16(b0 + 52, d1, m[3]);
  });
}

void to_f16_avx512(const float* x, fp16_t* y, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    const __m256i h = _mm512_cvtps_ph(_mm512_maskz_loadu_ps(m, x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(y + i, m, h);
  }
}

void scale_avx512(float a, float* y, int n) {
  const __m512 va = _mm512_set1_ps(a);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, y + i)));
  }
}

void add_avx512(const float* a, const float* b, float* y, int n) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    _mm512_mask_storeu_ps(y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i)));
  }
}

void rms_norm_avx512(const float* x, const float* w, float* y, int n, float eps) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    s0 = _mm512_fmadd_ps(a, a, s0);
    s1 = _mm512_fmadd_ps(b, b, s1);
  }
  for (; i < n; i += 16) {
    const __m512 a = _mm512_maskz_loadu_ps(tail_mask(std::min(16, n - i)), x + i);
    s0 = _mm512_fmadd_ps(a, a, s0);
  }
  const double ss = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  const __m512 r = _mm512_set1_ps((float)(1.0 / std::sqrt(ss / n + eps)));
  for (i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    _mm512_mask_storeu_ps(y + i, m,
                          _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), r), _mm512_maskz_loadu_ps(m, w + i)));
  }
}

// exp(x): n = round(x / ln2), r = x - n ln2 (two-constant Cody-Waite), degree-6
// Taylor polynomial on |r| <= ln2/2 (rel. error ~1.2e-7), then 2^n by vscalefps,
// which also gives the correct overflow to inf and underflow to 0.
inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

float max_avx512(const float* s, int n) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min(16, n - i));
    m = _mm512_mask_max_ps(m, k, m, _mm512_maskz_loadu_ps(k, s + i));
  }
  return _mm512_reduce_max_ps(m);
}

float exp_sum_avx512(float* s, int n, float m, float scale) {
  const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(scale);
  __m512 sum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min(16, n - i));
    const __m512 e = exp_avx512(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), mv), sv));
    _mm512_mask_storeu_ps(s + i, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

void silu_mul_avx512(const float* g, const float* u, float* y, int n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(std::min(16, n - i));
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

// The 2:4-sparse types: the VBMI kernels where the CPU has VBMI, else dense rows (a Program expands the
// weights at load then, so this fallback serves direct kernel calls). Kept in this file, built
// without VBMI, so that no VBMI instruction is reachable on a CPU without it.
template <class Act>
void matmul_sparse24(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y, size_t ldy,
                     int n0, int n1) {
  if (avx512::sparse24_kernel() == kSparse24Faster)
    avx512::matmul_sparse24_vbmi<Act>(w, xq, T, y, ldy, n0, n1);
  else
    matmul_sparse_expand<Act, avx512_kernel_table>(w, x, ldx, xq, T, y, ldy, n0, n1);
}

// I8_BITMASK: the VBMI2 kernel for one token (and verifying steps) where the CPU has VBMI2; prefill
// expands 16 rows at a time (vpexpandb) into dense I8 rows for the I8 kernel. Without VBMI2 a
// Program expands the weights at load; direct calls go through matmul_sparse_expand.
template <class Act>
void matmul_bitmask(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y, size_t ldy,
                    int n0, int n1) {
  if (avx512::bitmask_kernel() == kSparse24None) {
    matmul_sparse_expand<Act, avx512_kernel_table>(w, x, ldx, xq, T, y, ldy, n0, n1);
    return;
  }
  if (T == 1 || w.row_invariant) {
    avx512::matmul_bitmask_vbmi2<Act>(w, xq, T, y, ldy, n0, n1);
    return;
  }
  const KernelTable& kt = *avx512_kernel_table();
  const auto kernel = [&] {
    if constexpr (std::is_same_v<Act, BlockQ8A2>) return kt.matmul2[(int)DType::I8];
    else return kt.matmul[(int)DType::I8];
  }();
  thread_local ScratchBytes scratch;
  uint8_t* const rows = scratch.get(16 * (size_t)w.cols);
  for (int n = n0; n < n1; n += 16) {
    const int m = std::min(n1 - n, 16);
    avx512::bitmask_rows_vbmi2(w, n, m, rows);
    const WeightView dense{DType::I8, m, w.cols, rows, (size_t)w.cols, w.row_scales + n};
    kernel(dense, x, ldx, xq, T, y + n, ldy, 0, m);
  }
}

}  // namespace

const KernelTable* avx512_kernel_table() {
  static const KernelTable table = {
      "avx512",
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
          avx512::matmul_x16,                    // Q8_0_X16
          avx512::matmul_x16,                    // Q4_0_X16
          avx512::matmul_x16,                    // Q4_1_X16
          avx512::matmul_x16,                    // I8_X16
          avx512::matmul_x16,                    // Q5_0_X16
          avx512::matmul_x16,                    // Q5_1_X16
          avx512::matmul_x16,                    // Q4_0_G64_X16
          avx512::matmul_x16,                    // Q4_0_G128_X16
          avx512::matmul_x16,                    // Q4_1_G64_X16
          avx512::matmul_x16,                    // Q4_1_G128_X16
          matmul_sparse24<BlockQ8A>,             // Q4_0_24_X16
          matmul_sparse24<BlockQ8A>,             // I8_24_X16
          matmul_bitmask<BlockQ8A>,  // I8_BITMASK
      },
      quantize_act_avx512,
      ref_kernels().dequant_row,
      dot_avx512,
      axpy_avx512,
      scale_avx512,
      rms_norm_avx512,
      silu_mul_avx512,
      add_avx512,
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
          avx512::matmul2_x16,                              // Q8_0_X16
          avx512::matmul2_x16,                              // Q4_0_X16
          avx512::matmul2_x16,                              // Q4_1_X16
          avx512::matmul2_x16,                              // I8_X16
          avx512::matmul2_x16,                              // Q5_0_X16
          avx512::matmul2_x16,                              // Q5_1_X16
          avx512::matmul2_x16,                              // Q4_0_G64_X16
          avx512::matmul2_x16,                              // Q4_0_G128_X16
          avx512::matmul2_x16,                              // Q4_1_G64_X16
          avx512::matmul2_x16,                              // Q4_1_G128_X16
          matmul_sparse24<BlockQ8A2>,                       // Q4_0_24_X16
          matmul_sparse24<BlockQ8A2>,                       // I8_24_X16
          matmul_bitmask<BlockQ8A2>,  // I8_BITMASK
      },
      quantize_act2_avx512,
      weighted_sum_avx512<float>,
      max_avx512,
      exp_sum_avx512,
      to_f16_avx512,
      weighted_sum_avx512<fp16_t>,
      scores_q8_0_avx512,
      weighted_sum_q8_0_avx512,
      avx512::sparse24_kernel,
      avx512::bitmask_kernel,
  };
  return &table;
}

}  // namespace plm::kernels
