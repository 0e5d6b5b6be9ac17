// Matmuls of the row-interleaved x16 types (common.h) with AVX2 + FMA + F16C: the scheme of
// x16_avx512.cpp on 8-lane registers. One ymm lane is one weight row, so a 16-row group is two
// halves of 8 rows: in each 64-byte unit of a record the first 32 bytes belong to rows 0-7 and
// the second to rows 8-15, and likewise the first 8 f16 of each header field. Without VNNI the
// integer dot products are vpmaddubsw (u8 x s8 -> saturating s16 pairs) + vpmaddwd by ones:
//   Q4 codes (0..15) are unsigned as stored: a pair is at most 2*15*127 = 3810, so a block's 8
//   k-steps add up in 16 bits (<= 30480) and are widened once per block, as in gemm_avx2.cpp.
//   Q8_0/I8 codes are signed: the +128 bias of the VNNI kernel would overflow a 16-bit pair
//   (2*255*127), so they use |w| x sign(a, w) as kernels_avx2.cpp does, exact for every int8 w
//   including -128 (|-128| reads as the unsigned byte 128, a pair <= 2*128*127 = 32512), and
//   widen after every k-step.
// Per 32-block and row, one float step then applies the scales:
//   Q4_0: y += d * (d_a * idot - 8 s_a)   (the -8 offset folded into one FMA)
//   Q4_1: y += d * (d_a * idot) + m * s_a
//   Q8_0: y += d * (d_a * idot);  I8: y += d_a * idot, times the row scale at the end.
// Two-level activations add d2 * idot2 next to d_a * idot and use s + s2.
//
// Decode (one token) reads each group's records in order, both halves at once: a group is one
// sequential stream, which is the point of the layout. With more tokens the group is read once
// per token tile (from L1/L2). The inner loops are ALU-bound, ~2 vector ops per vpmaddubsw plus
// the nibble unpack and the float step; unpacking a group's nibbles once into a scratch for all
// tiles was tried and gained only 3-5% at 64 tokens (lost below ~16), so it is not done.
#include "kernels/x86/x16_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace plm::kernels::avx2 {
namespace {

template <DType T>
struct X16 {
  static constexpr bool kQ4 = T == DType::Q4_0_X16 || T == DType::Q4_1_X16;
  static constexpr int kFields = T == DType::Q4_1_X16 ? 2 : T == DType::I8_X16 ? 0 : 1;
  static constexpr int kRecord = 16 * kDTypeTraits[(int)T].block_bytes;
  static constexpr bool kRowScale = T == DType::I8_X16;
};

inline __m256i bcst4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline __m256 f16x8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load256(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// An empty asm that "changes" v: keeps the sum chains below in program order. Otherwise GCC
// reassociates them into trees of products computed ahead of their sums, which with 16 ymm
// registers spills sums and accumulators to the stack in the block loop (measured without it:
// 10-30% slower for Q4 and the two-level activations, 2-10% for Q8_0/I8).
template <class V>
inline void pin(V& v) {
  __asm__("" : "+x"(v));
}

// Lanes of a group to store: rows [lo, hi) of its 16.
struct Lanes {
  __m256i mask[2];
  bool full;
  Lanes(int lo, int hi) : full(lo == 0 && hi == kX16Rows) {
    for (int h = 0; h < 2; ++h) {
      const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * h));
      mask[h] = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(lo), idx),
                                    _mm256_cmpgt_epi32(_mm256_set1_epi32(hi), idx));
    }
  }
};

// RT tokens against NH halves (h0, and h0 + 1 if NH == 2) of one group of 16 rows. `group`: its
// first record; y: the group's first row for the first token.
template <DType T, class Block, int RT, int NH>
void micro(const uint8_t* group, int nruns, const Block* x, float* y, size_t ldy, int h0, const Lanes& lanes,
           const float* row_scales) {
  using F = X16<T>;
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[RT][NH];
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) acc[t][h] = _mm256_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    const uint8_t* rec = group + (size_t)b * F::kRecord;
    const uint8_t* codes = rec + 32 * F::kFields;
    __m256i s1[RT][NH], s2[RT][NH];  // Q4: 16-bit sums over the block; Q8_0/I8: int32
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        s1[t][h] = _mm256_setzero_si256();
        if constexpr (kTwo) s2[t][h] = _mm256_setzero_si256();
      }
    if constexpr (F::kQ4) {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {  // k-steps c (low nibbles) and c + 4 (high) of unit c
        __m256i lo[NH], hi[NH];
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          const __m256i z = load256(codes + 64 * c + 32 * (h0 + h));
          lo[h] = _mm256_and_si256(z, low4);
          hi[h] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
        }
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const Block& a = x[(size_t)t * nruns + b];
          const __m256i al = bcst4(a.qs + 4 * c), ah = bcst4(a.qs + 16 + 4 * c);
#pragma GCC unroll 2
          for (int h = 0; h < NH; ++h) {
            s1[t][h] = _mm256_add_epi16(s1[t][h], _mm256_maddubs_epi16(lo[h], al));
            pin(s1[t][h]);
            s1[t][h] = _mm256_add_epi16(s1[t][h], _mm256_maddubs_epi16(hi[h], ah));
            pin(s1[t][h]);
          }
          if constexpr (kTwo) {
            const __m256i bl = bcst4(a.qs2 + 4 * c), bh = bcst4(a.qs2 + 16 + 4 * c);
#pragma GCC unroll 2
            for (int h = 0; h < NH; ++h) {
              s2[t][h] = _mm256_add_epi16(s2[t][h], _mm256_maddubs_epi16(lo[h], bl));
              pin(s2[t][h]);
              s2[t][h] = _mm256_add_epi16(s2[t][h], _mm256_maddubs_epi16(hi[h], bh));
              pin(s2[t][h]);
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          s1[t][h] = _mm256_madd_epi16(s1[t][h], ones);
          if constexpr (kTwo) s2[t][h] = _mm256_madd_epi16(s2[t][h], ones);
        }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        __m256i wv[NH], wa[NH];
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          wv[h] = load256(codes + 64 * c + 32 * (h0 + h));
          wa[h] = _mm256_abs_epi8(wv[h]);
        }
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const Block& a = x[(size_t)t * nruns + b];
          const __m256i av = bcst4(a.qs + 4 * c);
#pragma GCC unroll 2
          for (int h = 0; h < NH; ++h) {
            s1[t][h] = _mm256_add_epi32(
                s1[t][h], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[h], _mm256_sign_epi8(av, wv[h])), ones));
            pin(s1[t][h]);
          }
          if constexpr (kTwo) {
            const __m256i bv = bcst4(a.qs2 + 4 * c);
#pragma GCC unroll 2
            for (int h = 0; h < NH; ++h) {
              s2[t][h] = _mm256_add_epi32(
                  s2[t][h], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[h], _mm256_sign_epi8(bv, wv[h])), ones));
              pin(s2[t][h]);
            }
          }
        }
      }
    }
    // The float step. v1 = d (Q4_0/Q4_1/Q8_0), v2 = m (Q4_1).
    __m256 v1[NH], v2[NH];
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) {
      if constexpr (F::kFields >= 1) v1[h] = f16x8(rec + 16 * (h0 + h));
      if constexpr (F::kFields == 2) v2[h] = f16x8(rec + 32 + 16 * (h0 + h));
    }
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[(size_t)t * nruns + b];
      const __m256 d = _mm256_set1_ps(a.d);
      float s = a.s;
      if constexpr (kTwo) s += a.s2;
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        const __m256 i1 = _mm256_cvtepi32_ps(s1[t][h]);
        __m256 f;
        if constexpr (T == DType::Q4_0_X16) f = _mm256_fmadd_ps(i1, d, _mm256_set1_ps(-8.0f * s));
        else f = _mm256_mul_ps(i1, d);
        if constexpr (kTwo) f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2[t][h]), _mm256_set1_ps(a.d2), f);
        if constexpr (F::kFields >= 1) acc[t][h] = _mm256_fmadd_ps(f, v1[h], acc[t][h]);
        else acc[t][h] = _mm256_add_ps(acc[t][h], f);
        if constexpr (F::kFields == 2) acc[t][h] = _mm256_fmadd_ps(v2[h], _mm256_set1_ps(s), acc[t][h]);
      }
    }
  }
#pragma GCC unroll 2
  for (int h = 0; h < NH; ++h) {
    const int hh = h0 + h;
    const __m256 rs = F::kRowScale ? _mm256_loadu_ps(row_scales + 8 * hh) : _mm256_set1_ps(1.0f);
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      float* yt = y + (size_t)t * ldy + 8 * hh;
      const __m256 v = F::kRowScale ? _mm256_mul_ps(acc[t][h], rs) : acc[t][h];
      if (lanes.full) _mm256_storeu_ps(yt, v);
      else _mm256_maskstore_ps(yt, lanes.mask[hh], v);
    }
  }
}

// Token tiles (RT tokens x NH halves per pass over a group), picked by measurement within the
// 16 ymm registers. Q4: both halves share each activation broadcast; Q8_0/I8 keep |w| and w of
// the k-step live as well, and do best on one half with more tokens.
template <DType T, class Block>
struct Tiles {
  static constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  static constexpr int kRT = X16<T>::kQ4 ? (kTwo ? 2 : 3) : 4;
  static constexpr int kNH = X16<T>::kQ4 ? 2 : 1;
};

template <int N, class Fn>
inline void with_tile(int rt, Fn&& f) {  // f(integral_constant<rt>) for 1 <= rt <= N
  if constexpr (N > 1) {
    if (rt < N) {
      with_tile<N - 1>(rt, f);
      return;
    }
  }
  f(std::integral_constant<int, N>{});
}

// Columns [n0, n1): every group they touch is computed whole (x16 tensors have rows % 16 == 0)
// and only the lanes in range are stored.
template <DType T, class Block>
void matmul_impl(const WeightView& w, const Block* xq, int T_, float* y, size_t ldy, int n0, int n1) {
  using F = X16<T>;
  constexpr int kRT = Tiles<T, Block>::kRT, kNH = Tiles<T, Block>::kNH;
  const int nruns = (int)(w.cols / 32);
  const size_t group_bytes = (size_t)nruns * F::kRecord;
  for (int g0 = n0 - n0 % kX16Rows; g0 < n1; g0 += kX16Rows) {
    const Lanes lanes(std::max(n0, g0) - g0, std::min(n1, g0 + kX16Rows) - g0);
    const uint8_t* group = w.data + (size_t)(g0 / kX16Rows) * group_bytes;
    const float* rs = F::kRowScale ? w.row_scales + g0 : nullptr;
    if (T_ == 1) {  // decode: one pass, both halves, the group's bytes in order
      micro<T, Block, 1, 2>(group, nruns, xq, y + g0, ldy, 0, lanes, rs);
      continue;
    }
    for (int t0 = 0; t0 < T_; t0 += kRT) {
      with_tile<kRT>(std::min(kRT, T_ - t0), [&](auto rt) {
        for (int h0 = 0; h0 < 2; h0 += kNH)
          micro<T, Block, decltype(rt)::value, kNH>(group, nruns, xq + (size_t)t0 * nruns, y + (size_t)t0 * ldy + g0,
                                                     ldy, h0, lanes, rs);
      });
    }
  }
}

template <class Block>
void matmul_any(const WeightView& w, const Block* xq, int T, float* y, size_t ldy, int n0, int n1) {
  switch (w.dtype) {
    case DType::Q8_0_X16: matmul_impl<DType::Q8_0_X16>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_0_X16: matmul_impl<DType::Q4_0_X16>(w, xq, T, y, ldy, n0, n1); break;
    case DType::Q4_1_X16: matmul_impl<DType::Q4_1_X16>(w, xq, T, y, ldy, n0, n1); break;
    case DType::I8_X16: matmul_impl<DType::I8_X16>(w, xq, T, y, ldy, n0, n1); break;
    default: throw UnsupportedError("matmul_x16: not an x16 type");
  }
}

}  // namespace

void matmul_x16(const WeightView& w, const float*, size_t, const BlockQ8A* xq, int T, float* y, size_t ldy,
                int n0, int n1) {
  matmul_any(w, xq, T, y, ldy, n0, n1);
}
void matmul2_x16(const WeightView& w, const float*, size_t, const BlockQ8A2* xq, int T, float* y, size_t ldy,
                 int n0, int n1) {
  matmul_any(w, xq, T, y, ldy, n0, n1);
}

}  // namespace plm::kernels::avx2
