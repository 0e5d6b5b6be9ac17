// Matmuls of the row-interleaved x16 types (common.h) with AVX-512 VNNI: one zmm lane per
// weight row, so a vpdpbusd multiplies 4 code bytes of each of 16 rows by 4 activation bytes
// broadcast from one token, and a 32-block costs 8 of them per token before one float step.
// This is the prefill GEMM's scheme (gemm_avx512.cpp) without its per-call repack: the
// converter already stored the codes so, and a group of 16 rows is one sequential stream,
// which is what lets decode (one token) run at the memory bandwidth: the row-major tiles read
// 8 rows as 8 short streams that the hardware prefetchers serve poorly (measured on this
// machine, one thread: ~12 GB/s for 8 interleaved streams against ~25 GB/s for one).
//
// Per 32-block and row (see gemm_avx512.cpp for the bias terms):
//   y[r] += v1[r] * (d * idot) + v2[r] * s        (two-level activations: + d2 * idot2, s2)
//   Q4_0: v1 = d, v2 = -8d;  Q4_1: v1 = d, v2 = m;  Q8_0: v1 = d, v2 = -128d (codes + 128);
//   Q5_0: v1 = d, v2 = -16d;  Q5_1: v1 = d, v2 = m (5-bit codes: nibble + 16 * bit of qh);
//   I8: v1 = 1, v2 = -128 (codes + 128), and the row scale at the end.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "kernels/x86/x16_avx512.h"

#include "kernels/prefetch.h"
#include "kernels/x86/tile_util.h"
#include "kernels/x86/vnni_avx512.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace plm::kernels::avx512 {
namespace {

constexpr int kTile = 8;  // tokens per pass over a group's blocks

inline __m512 f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// A record's layout (tile_util.h), and coefs: the per-row coefficients v1 (of d * idot) and v2
// (of the activation sum) from the header.
template <DType T>
struct X16 : X16Layout<T> {
  using L = X16Layout<T>;
  static void coefs(const uint8_t* rec, __m512& v1, __m512& v2) {
    if constexpr (T == DType::I8_X16) {
      v1 = _mm512_set1_ps(1.0f);
      v2 = _mm512_set1_ps(-128.0f);
    } else {
      v1 = f16x16(rec);
      if constexpr (L::kAsym) v2 = f16x16(rec + 32);
      else v2 = _mm512_mul_ps(v1, _mm512_set1_ps(L::kQ4_0 ? -8.0f : L::kQ5 ? -16.0f : -128.0f));
    }
  }
};

inline float act_sum(const BlockQ8A& a) { return a.s; }
inline float act_sum(const BlockQ8A2& a) { return a.s + a.s2; }

// One k-step: codes w against bytes 4j..4j+3 of every token, into chain set `s`.
template <class Block, int RT>
inline void step(__m512i w, const Block* x, int nruns, int b, int j, __m512i* s1, __m512i* s2) {
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) {
    const Block& a = x[(size_t)t * nruns + b];
    s1[t] = _mm512_dpbusd_epi32(s1[t], w, bcst4(a.qs + 4 * j));
    if constexpr (std::is_same_v<Block, BlockQ8A2>) s2[t] = _mm512_dpbusd_epi32(s2[t], w, bcst4(a.qs2 + 4 * j));
  }
}

// RT tokens against one group of 16 rows (`group`: its first record). With few tokens the
// k-steps alternate between two chains of integer sums (A, B) so that consecutive vpdpbusd do
// not wait on each other; with more, the tokens give that independence.
template <DType T, class Block, int RT>
void micro(const uint8_t* group, int nruns, const Block* x, float* y, size_t ldy, __mmask16 mask,
           const float* row_scales, PrefetchL2 pf = {}) {
  using F = X16<T>;
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  constexpr bool kSplit = RT <= 2;
  const __m512i low4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8((char)0x80);
  __m512 acc[RT];
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) acc[t] = _mm512_setzero_ps();
  for (int b = 0; b < nruns; ++b) {  // 32-runs; a group-64/128 record holds 2/4, sharing its header
    pf.at(b);
    const uint8_t* rec = group + (size_t)(b / F::kRuns) * F::kRecord;
    const uint8_t* codes = rec + F::kCodes + 256 * (b % F::kRuns);
    constexpr int NB = kSplit ? RT : 1;
    __m512i a1[RT], a2[RT], b1[NB], b2[NB];  // chains A and B, first and second level
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) a1[t] = a2[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int t = 0; t < NB; ++t) b1[t] = b2[t] = _mm512_setzero_si512();
    // The second code vector of each pair goes to chain B when there is one.
    auto second = [&](__m512i w, int j) {
      if constexpr (kSplit) step<Block, RT>(w, x, nruns, b, j, b1, b2);
      else step<Block, RT>(w, x, nruns, b, j, a1, a2);
    };
    if constexpr (F::kQ4) {
      const __m512i qh = F::kQ5 ? _mm512_loadu_si512(rec + F::kQh) : _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i z = _mm512_loadu_si512(codes + 64 * c);
        __m512i lo = _mm512_and_si512(z, low4), hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), low4);
        if constexpr (F::kQ5) {
          lo = with_high_bit(lo, qh, 4 * c);
          hi = with_high_bit(hi, qh, 16 + 4 * c);
        }
        step<Block, RT>(lo, x, nruns, b, c, a1, a2);
        second(hi, c + 4);
      }
    } else {
#pragma GCC unroll 4
      for (int c = 0; c < 8; c += 2) {
        step<Block, RT>(_mm512_xor_si512(_mm512_loadu_si512(codes + 64 * c), bias), x, nruns, b, c, a1, a2);
        second(_mm512_xor_si512(_mm512_loadu_si512(codes + 64 * (c + 1)), bias), c + 1);
      }
    }
    __m512 v1, v2;
    F::coefs(rec, v1, v2);
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      __m512i s1 = a1[t], s2 = a2[t];
      if constexpr (kSplit) {
        s1 = _mm512_add_epi32(s1, b1[t < NB ? t : 0]);
        if constexpr (kTwo) s2 = _mm512_add_epi32(s2, b2[t < NB ? t : 0]);
      }
      acc[t] = _mm512_fmadd_ps(act_scaled(a, s1, s2), v1, acc[t]);
      acc[t] = _mm512_fmadd_ps(v2, _mm512_set1_ps(act_sum(a)), acc[t]);
    }
  }
  const __m512 rs = row_scales ? _mm512_maskz_loadu_ps(mask, row_scales) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t) _mm512_mask_storeu_ps(y + (size_t)t * ldy, mask, _mm512_mul_ps(acc[t], rs));
}

// Columns [n0, n1): every group they touch is computed whole (x16 tensors have rows % 16 == 0)
// and only the lanes in range are stored.
template <DType T, class Block>
void matmul_impl(const WeightView& w, const Block* xq, int T_, float* y, size_t ldy, int n0, int n1) {
  using F = X16<T>;
  const int nruns = (int)(w.cols / 32);
  const size_t group_bytes = (size_t)(nruns / F::kRuns) * F::kRecord;
  // vpdpbusd per weight byte, in units of one token, one level, 8-bit codes.
  const int work = T_ * (std::is_same_v<Block, BlockQ8A2> ? 2 : 1) * (F::kQ4 ? 2 : 1);
  const bool prefetch_next = work >= 8;
  for (int g0 = n0 - n0 % kX16Rows; g0 < n1; g0 += kX16Rows) {
    const int lo = std::max(n0, g0) - g0, hi = std::min(n1, g0 + kX16Rows) - g0;
    const __mmask16 mask = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
    const uint8_t* group = w.data + (size_t)(g0 / kX16Rows) * group_bytes;
    const float* rs = F::kRowScale ? w.row_scales + g0 : nullptr;
    // Enough arithmetic per weight byte makes a group's compute long enough for its loads to stall
    // it: the first pass over a group then prefetches the next one, into L2 (into L1, perf put 12 %
    // of this function's samples on the prefetch instructions, waiting for miss buffers). With
    // less, hardware prefetch alone keeps up and the extra requests only slow it (Q8_0, one
    // thread, 151936 x 896: 2 tokens 5.3 ms without, 7.0 ms with; 8 tokens 11.8 ms without, 7.5
    // with).
    const PrefetchL2 pf = prefetch_next && g0 + kX16Rows < n1 ? decode_prefetch<2>(group, group_bytes, nruns, 1) : PrefetchL2{};
    for (int t0 = 0; t0 < T_; t0 += kTile) {
      with_tile<kTile>(std::min(kTile, T_ - t0), [&](auto rt) {
        micro<T, Block, decltype(rt)::value>(group, nruns, xq + (size_t)t0 * nruns, y + (size_t)t0 * ldy + g0,
                                             ldy, mask, rs, t0 == 0 ? pf : PrefetchL2{});
      });
    }
  }
}

}  // namespace

void matmul_x16(const WeightView& w, const float*, size_t, const BlockQ8A* xq, int T, float* y, size_t ldy,
                int n0, int n1) {
  x16_dispatch(w.dtype, [&](auto t) { matmul_impl<decltype(t)::value>(w, xq, T, y, ldy, n0, n1); });
}
void matmul2_x16(const WeightView& w, const float*, size_t, const BlockQ8A2* xq, int T, float* y, size_t ldy,
                 int n0, int n1) {
  x16_dispatch(w.dtype, [&](auto t) { matmul_impl<decltype(t)::value>(w, xq, T, y, ldy, n0, n1); });
}

}  // namespace plm::kernels::avx512
