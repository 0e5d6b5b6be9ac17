// Matmuls of the row-interleaved x16 types (common.h) with AVX2 + FMA + F16C: the scheme of
// x16_avx512.cpp on 8-lane registers. One ymm lane is one weight row, so a 16-row group is two
// halves of 8 rows: in each 64-byte unit of a record the first 32 bytes belong to rows 0-7 and
// the second to rows 8-15, and likewise the first 8 f16 of each header field. Without VNNI the
// integer dot products are vpmaddubsw (u8 x s8 -> saturating s16 pairs) + vpmaddwd by ones:
//   Q4 codes (0..15) are unsigned as stored: a pair is at most 2*15*127 = 3810, so a block's 8
//   k-steps add up in 16 bits (<= 30480) and are widened once per block, as in gemm_avx2.cpp.
//   Q5 codes (0..31: the nibble, plus 16 where the row's qh bit is set, see high_bit) make a
//   pair of at most 2*31*127 = 7874, so the 16-bit sums are widened after every 4 k-steps
//   (<= 31496), as gemm_avx2.cpp's kWide.
//   Q8_0/I8 codes are signed: the +128 bias of the VNNI kernel would overflow a 16-bit pair
//   (2*255*127), so they use |w| x sign(a, w) as kernels_avx2.cpp does, exact for every int8 w
//   including -128 (|-128| reads as the unsigned byte 128, a pair <= 2*128*127 = 32512), and
//   widen after every k-step.
// The group-64/128 Q4 types are walked as 32-runs too (as x16_avx512.cpp): each run of a record
// is 4 units shaped as a Q4_0_X16/Q4_1_X16 record's, with the record's header (the activations
// have a scale per 32, so the runs' sums cannot share one float step).
// Per 32-block and row, one float step then applies the scales:
//   Q4_0: y += d * (d_a * idot - 8 s_a)   (the -8 offset folded into one FMA)
//   Q4_1: y += d * (d_a * idot) + m * s_a
//   Q5_0: y += d * (d_a * idot - 16 s_a);  Q5_1: y += d * (d_a * idot) + m * s_a
//   Q8_0: y += d * (d_a * idot);  I8: y += d_a * idot, times the row scale at the end.
// Two-level activations add d2 * idot2 next to d_a * idot and use s + s2.
// With AVX-VNNI (the avxvnni build of this file, dot_avx2.h) each vpmaddubsw + add becomes one
// vpdpbusd into int32 sums, which need no widening, and Q8_0/I8 codes are biased to q + 128 as in
// the AVX-512 kernels (Q8_0: y += d * (d_a * idot - 128 s_a); I8 likewise without d).
//
// Decode (one token) reads each group's records in order, both halves at once: a group is one
// sequential stream, which is the point of the layout. With more tokens the group is read once
// per token tile (from L1/L2). The inner loops are ALU-bound, ~2 vector ops per vpmaddubsw plus
// the nibble unpack and the float step; unpacking a group's nibbles once into a scratch for all
// tiles was tried and gained only 3-5% at 64 tokens (lost below ~16), so it is not done for Q4.
// Q5 is different: adding the fifth bit costs 4 more ops per k-step and half (high_bit), more
// than the dot product itself for a 3-token tile, so from 2 tokens on a group is decoded once,
// in chunks of kChunk blocks that stay in L1 (unpack_group; the later chunks add into y), into
// 8-row records like gemm_avx2.cpp's: re-decoding per tile was 20-40% slower than that GEMM on
// the row-major Q5 types at 64 tokens. One token decodes in place, both halves in one pass.
#include "kernels/x86/x16_avx2.h"

#include "kernels/prefetch.h"
#include "kernels/x86/dot_avx2.h"
#include "kernels/x86/tile_util.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace plm::kernels::PLM_AVX2_NS {
namespace {

template <DType T>
using X16 = X16Layout<T>;  // tile_util.h

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

// Q5: adds bit 4 to the nibbles `nib` of one k-step. q: the 8 rows' qh (one per dword lane) for
// an odd unit c, or qh << 4 for an even one, so that the k-step's 4 qh bits are the high nibble
// of byte k of each dword (k = c/2 for codes 4c.., 2 + c/2 for codes 16 + 4c..). Byte b of each
// dword gets a copy of that byte and keeps bit 4 + b; min(., 16) turns a set bit into 16.
template <int k>
inline __m256i high_bit(__m256i nib, __m256i q) {
  const __m256i byte_k = _mm256_add_epi8(_mm256_set1_epi8(k),  // byte k of the byte's own dword
                                         _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                          0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
  const __m256i bits = _mm256_and_si256(_mm256_shuffle_epi8(q, byte_k), _mm256_set1_epi32((int)0x80402010));
  return _mm256_or_si256(nib, _mm256_min_epu8(bits, _mm256_set1_epi8(0x10)));
}

// The codes of unit c of half hh of a 32-run (Q4/Q5) whose 4 units start at `codes`: k-steps c
// (lo) and c + 4 (hi). Q5: qh, qh4 are the half's qh and qh << 4.
template <DType T>
inline void unit_codes(const uint8_t* codes, int c, int hh, __m256i qh, __m256i qh4, __m256i& lo, __m256i& hi) {
  using F = X16<T>;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i z = load256(codes + 64 * c + 32 * hh);
  lo = _mm256_and_si256(z, low4);
  hi = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
  if constexpr (F::kQ5) {
    const __m256i q = (c & 1) ? qh : qh4;
    if (c < 2) {
      lo = high_bit<0>(lo, q);
      hi = high_bit<2>(hi, q);
    } else {
      lo = high_bit<1>(lo, q);
      hi = high_bit<3>(hi, q);
    }
  }
}

// Q5 with several token tiles: a group's blocks decoded once, half h of block b as
// out[packed_at<NH>(nruns, b, h)]: NH == 1 (one half per pass) keeps each half's blocks
// together, NH == 2 each block's halves.
struct alignas(32) Packed {
  __m256i w[8];  // k-step j: the 5-bit codes 4j..4j+3 of the half's 8 rows
  __m256 v1, v2;  // d, m
};
template <int NH>
inline size_t packed_at(int nruns, int b, int h) {
  return NH == 1 ? (size_t)h * nruns + b : 2 * (size_t)b + h;
}
template <DType T, int NH>
void unpack_group(const uint8_t* group, int nruns, Packed* out) {
  using F = X16<T>;
  for (int b = 0; b < nruns; ++b) {
    const uint8_t* rec = group + (size_t)b * F::kRecord;
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      Packed& P = out[packed_at<NH>(nruns, b, h)];
      const __m256i qh = load256(rec + F::kQh + 32 * h), qh4 = _mm256_slli_epi32(qh, 4);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) unit_codes<T>(rec + F::kCodes, c, h, qh, qh4, P.w[c], P.w[c + 4]);
      P.v1 = f16x8(rec + 16 * h);
      if constexpr (F::kFields == 2) P.v2 = f16x8(rec + 32 + 16 * h);
    }
  }
}

// Two-level activations against the 8-bit types without VNNI: each element as one word
// 256 q + q2 (= x / d2, kernels.h), multiplied by the codes with vpmaddwd: 2 instructions a
// k-step for both levels where |w| x sign(a, w) takes 4 for each. Per 32-block the words are in
// the order micro reads them: for k-step c those of elements 4c, 4c+2, 4c+1, 4c+3.
template <DType T, class Block>
constexpr bool kWords = std::is_same_v<Block, BlockQ8A2> && !kVnni && !X16<T>::kQ4;

[[maybe_unused]] void act_words(const BlockQ8A2* xq, size_t nblocks, int16_t* out) {
  for (size_t i = 0; i < nblocks; ++i) {
    for (int half = 0; half < 2; ++half) {
      const __m256i q = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[i].qs + 16 * half)));
      const __m256i q2 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[i].qs2 + 16 * half)));
      __m256i v = _mm256_add_epi16(_mm256_slli_epi16(q, 8), q2);  // |256 q + q2| <= 32639
      v = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(v, _MM_SHUFFLE(3, 1, 2, 0)), _MM_SHUFFLE(3, 1, 2, 0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * i + 16 * half), v);
    }
  }
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
// first record; nruns: its 32-runs (records times kRuns; the G64/G128 types read the header of
// run b's record); x: the first token's blocks, xs blocks a token; y: the group's first row for the
// first token. kPacked: the codes and scales come from `packed` (unpack_group), and with `add`
// the sums are added to y (a later chunk of the blocks).
template <DType T, class Block, int RT, int NH, bool kPacked = false>
void micro(const uint8_t* group, int nruns, const Block* x, size_t xs, float* y, size_t ldy, int h0,
           const Lanes& lanes, const float* row_scales, const Packed* packed = nullptr, bool add = false,
           PrefetchL2 pf = {}, const int16_t* a16 = nullptr) {
  using F = X16<T>;
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  constexpr bool k16 = kWords<T, Block>;  // a16: the activations as 16-bit words (act_words)
  __m256 acc[RT][NH];
#pragma GCC unroll 8
  for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) acc[t][h] = _mm256_setzero_ps();
  for (int b = 0; b < nruns; ++b) {
    pf.at(b);
    const uint8_t* rec = group + (size_t)(b / F::kRuns) * F::kRecord;
    const uint8_t* codes = rec + F::kCodes + 256 * (b % F::kRuns);
    // Q4: 16-bit sums over the block; Q5: over 4 k-steps, w1/w2 the int32 sums of the first 4;
    // Q8_0/I8: int32
    __m256i s1[RT][NH], s2[RT][NH], w1[RT][NH], w2[RT][NH];
    if constexpr (!F::kQ5) {
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          s1[t][h] = _mm256_setzero_si256();
          if constexpr (kTwo && !k16) s2[t][h] = _mm256_setzero_si256();
        }
    }
    if constexpr (F::kQ4) {
      __m256i qh[NH], qh4[NH];  // Q5: the rows' qh, and qh << 4 (see high_bit)
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        if constexpr (F::kQ5 && !kPacked) {
          qh[h] = load256(rec + F::kQh + 32 * (h0 + h));
          qh4[h] = _mm256_slli_epi32(qh[h], 4);
        } else {
          qh[h] = qh4[h] = _mm256_setzero_si256();
        }
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {  // k-steps c (low nibbles) and c + 4 (high) of unit c
        // Q5: the first k-step of a 16-bit sum (with VNNI one int32 sum runs over the block)
        const bool start = F::kQ5 && (c == 0 || (c == 2 && !kVnni));
        __m256i lo[NH], hi[NH];
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          if constexpr (kPacked) {
            const Packed& P = packed[packed_at<NH>(nruns, b, h0 + h)];
            lo[h] = _mm256_load_si256(&P.w[c]);
            hi[h] = _mm256_load_si256(&P.w[c + 4]);
          } else {
            unit_codes<T>(codes, c, h0 + h, qh[h], qh4[h], lo[h], hi[h]);
          }
        }
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const Block& a = x[t * xs + b];
          const __m256i al = bcst4(a.qs + 4 * c), ah = bcst4(a.qs + 16 + 4 * c);
#pragma GCC unroll 2
          for (int h = 0; h < NH; ++h) {
            s1[t][h] = start ? dp_first(lo[h], al) : dp_add(s1[t][h], lo[h], al);
            pin(s1[t][h]);
            s1[t][h] = dp_add(s1[t][h], hi[h], ah);
            pin(s1[t][h]);
          }
          if constexpr (kTwo) {
            const __m256i bl = bcst4(a.qs2 + 4 * c), bh = bcst4(a.qs2 + 16 + 4 * c);
#pragma GCC unroll 2
            for (int h = 0; h < NH; ++h) {
              s2[t][h] = start ? dp_first(lo[h], bl) : dp_add(s2[t][h], lo[h], bl);
              pin(s2[t][h]);
              s2[t][h] = dp_add(s2[t][h], hi[h], bh);
              pin(s2[t][h]);
            }
          }
          if constexpr (F::kQ5 && !kVnni) {  // 4 k-steps done (units 0 and 1): widen
            if (c == 1) {
#pragma GCC unroll 2
              for (int h = 0; h < NH; ++h) {
                w1[t][h] = widen(s1[t][h]);
                if constexpr (kTwo) w2[t][h] = widen(s2[t][h]);
              }
            }
          }
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < RT; ++t)
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          s1[t][h] = widen(s1[t][h]);
          if constexpr (kTwo) s2[t][h] = widen(s2[t][h]);
          if constexpr (F::kQ5 && !kVnni) {
            s1[t][h] = _mm256_add_epi32(s1[t][h], w1[t][h]);
            if constexpr (kTwo) s2[t][h] = _mm256_add_epi32(s2[t][h], w2[t][h]);
          }
        }
    } else if constexpr (k16) {
      // 2 x vpmaddwd a k-step: the rows' even codes (bytes 0, 2 of each dword, sign-extended to
      // 16 bits) times the words of elements 4c, 4c+2, then the odd ones times 4c+1, 4c+3.
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        __m256i we[NH], wo[NH];
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          const __m256i v = load256(codes + 64 * c + 32 * (h0 + h));
          we[h] = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
          wo[h] = _mm256_srai_epi16(v, 8);
        }
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const int16_t* a = a16 + ((size_t)t * xs + b) * 32 + 4 * c;
          const __m256i ae = bcst4(a), ao = bcst4(a + 2);
#pragma GCC unroll 2
          for (int h = 0; h < NH; ++h) {
            s1[t][h] = _mm256_add_epi32(s1[t][h], _mm256_madd_epi16(we[h], ae));
            pin(s1[t][h]);
            s1[t][h] = _mm256_add_epi32(s1[t][h], _mm256_madd_epi16(wo[h], ao));
            pin(s1[t][h]);
          }
        }
      }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        __m256i wv[NH], wa[NH];
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h) {
          wv[h] = load256(codes + 64 * c + 32 * (h0 + h));
          if constexpr (kVnni) wv[h] = _mm256_xor_si256(wv[h], _mm256_set1_epi8((char)0x80));  // q + 128
          else wa[h] = _mm256_abs_epi8(wv[h]);
        }
#pragma GCC unroll 8
        for (int t = 0; t < RT; ++t) {
          const Block& a = x[t * xs + b];
          const __m256i av = bcst4(a.qs + 4 * c);
#pragma GCC unroll 2
          for (int h = 0; h < NH; ++h) {
            s1[t][h] = kVnni ? dp_add(s1[t][h], wv[h], av) : dp_signed(s1[t][h], wa[h], wv[h], av);
            pin(s1[t][h]);
          }
          if constexpr (kTwo) {
            const __m256i bv = bcst4(a.qs2 + 4 * c);
#pragma GCC unroll 2
            for (int h = 0; h < NH; ++h) {
              s2[t][h] = kVnni ? dp_add(s2[t][h], wv[h], bv) : dp_signed(s2[t][h], wa[h], wv[h], bv);
              pin(s2[t][h]);
            }
          }
        }
      }
    }
    // The float step. v1 = d (all but I8), v2 = m (Q4_1/Q5_1).
    __m256 v1[NH], v2[NH];
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) {
      if constexpr (kPacked) {
        const Packed& P = packed[packed_at<NH>(nruns, b, h0 + h)];
        v1[h] = P.v1;
        if constexpr (F::kFields == 2) v2[h] = P.v2;
      } else {
        if constexpr (F::kFields >= 1) v1[h] = f16x8(rec + 16 * (h0 + h));
        if constexpr (F::kFields == 2) v2[h] = f16x8(rec + 32 + 16 * (h0 + h));
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < RT; ++t) {
      const Block& a = x[t * xs + b];
      const __m256 d = _mm256_set1_ps(a.d);
      float s = a.s;
      if constexpr (kTwo) s += a.s2;
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        const __m256 i1 = _mm256_cvtepi32_ps(s1[t][h]);
        __m256 f;
        if constexpr (k16) f = _mm256_mul_ps(i1, _mm256_set1_ps(x[t * xs + b].d2));  // sum w (256 q + q2)
        else if constexpr (F::kQ4_0) f = _mm256_fmadd_ps(i1, d, _mm256_set1_ps(-8.0f * s));
        else if constexpr (T == DType::Q5_0_X16) f = _mm256_fmadd_ps(i1, d, _mm256_set1_ps(-16.0f * s));
        else if constexpr (kVnni && !F::kQ4) f = _mm256_fmadd_ps(i1, d, _mm256_set1_ps(-128.0f * s));  // q + 128
        else f = _mm256_mul_ps(i1, d);
        if constexpr (kTwo && !k16) f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2[t][h]), _mm256_set1_ps(a.d2), f);
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
      __m256 v = F::kRowScale ? _mm256_mul_ps(acc[t][h], rs) : acc[t][h];
      if (lanes.full) {
        if (kPacked && add) v = _mm256_add_ps(v, _mm256_loadu_ps(yt));
        _mm256_storeu_ps(yt, v);
      } else {
        if (kPacked && add) v = _mm256_add_ps(v, _mm256_maskload_ps(yt, lanes.mask[hh]));
        _mm256_maskstore_ps(yt, lanes.mask[hh], v);
      }
    }
  }
}

// Token tiles (RT tokens x NH halves per pass over a group), picked by measurement within the
// 16 ymm registers. Q4: both halves share each activation broadcast; Q8_0/I8 keep |w| and w of
// the k-step live as well, and do best on one half with more tokens. Q5 (decoded codes, int32
// sums of the first 4 k-steps live too) measured best with Q4's tiles: 3 x 2 ahead of 2 x 2,
// 4 x 1 and 5 x 1 by ~4-8% at 64 tokens; two-level, 2 x 2 ahead of 4 x 1 and 3 x 1 by ~5-10%.
template <DType T, class Block>
struct Tiles {
  static constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  static constexpr bool kPack = X16<T>::kQ5;  // decode the group once (unpack_group)
  static constexpr int kRT = X16<T>::kQ4 ? (kTwo ? 2 : 3) : 4;
  static constexpr int kNH = X16<T>::kQ4 ? 2 : 1;
};

constexpr int kPackMin = 2;  // tokens from which Q5 decodes a group once
constexpr int kChunk = 32;   // most blocks decoded at once (2 x 320 bytes each, L1-resident)

// Columns [n0, n1): every group they touch is computed whole (x16 tensors have rows % 16 == 0)
// and only the lanes in range are stored.
template <DType T, class Block>
void matmul_impl(const WeightView& w, const Block* xq, int T_, float* y, size_t ldy, int n0, int n1) {
  using F = X16<T>;
  constexpr int kRT = Tiles<T, Block>::kRT, kNH = Tiles<T, Block>::kNH;
  const int nruns = (int)(w.cols / 32);  // 32-runs per row
  const size_t group_bytes = (size_t)(nruns / F::kRuns) * F::kRecord;
  const int16_t* a16 = nullptr;
  if constexpr (kWords<T, Block>) {
    thread_local ScratchBytes words;  // grows once to the largest T * K, as the scratch below (kernels.h)
    int16_t* const out = reinterpret_cast<int16_t*>(words.get((size_t)T_ * nruns * 32 * sizeof(int16_t)));
    act_words(xq, (size_t)T_ * nruns, out);
    a16 = out;
  }
  Packed* packed = nullptr;
  if constexpr (Tiles<T, Block>::kPack) {
    // Grows once to the largest K this thread sees; later calls do not allocate.
    thread_local std::vector<Packed> scratch;
    if (T_ >= kPackMin && scratch.size() < 2 * (size_t)kChunk) scratch.resize(2 * (size_t)kChunk);
    packed = scratch.data();
  }
  for (int g0 = n0 - n0 % kX16Rows; g0 < n1; g0 += kX16Rows) {
    const Lanes lanes(std::max(n0, g0) - g0, std::min(n1, g0 + kX16Rows) - g0);
    const uint8_t* group = w.data + (size_t)(g0 / kX16Rows) * group_bytes;
    const float* rs = F::kRowScale ? w.row_scales + g0 : nullptr;
    if (T_ == 1) {  // decode: one pass, both halves, the group's bytes in order
      micro<T, Block, 1, 2>(group, nruns, xq, nruns, y + g0, ldy, 0, lanes, rs, nullptr, false, {}, a16);
      continue;
    }
    if constexpr (Tiles<T, Block>::kPack) {
      if (T_ >= kPackMin) {  // in chunks of blocks whose decoded codes stay in L1
        const int nchunks = (nruns + kChunk - 1) / kChunk, chunk = (nruns + nchunks - 1) / nchunks;
        for (int b0 = 0; b0 < nruns; b0 += chunk) {
          const int nb = std::min(chunk, nruns - b0);
          const uint8_t* part = group + (size_t)b0 * F::kRecord;
          unpack_group<T, kNH>(part, nb, packed);
          for (int t0 = 0; t0 < T_; t0 += kRT) {
            with_tile<kRT>(std::min(kRT, T_ - t0), [&](auto rt) {
              for (int h0 = 0; h0 < 2; h0 += kNH)
                micro<T, Block, decltype(rt)::value, kNH, true>(part, nb, xq + (size_t)t0 * nruns + b0, nruns,
                                                                 y + (size_t)t0 * ldy + g0, ldy, h0, lanes, rs, packed,
                                                                 b0 > 0);
            });
          }
        }
        continue;
      }
    }
    // Several tokens make a group's arithmetic long enough for its loads to stall it: the first
    // pass over a group prefetches the next one (as x16_avx512.cpp).
    const PrefetchL2 pf = g0 + kX16Rows < n1 ? decode_prefetch<2>(group, group_bytes, nruns, 1) : PrefetchL2{};
    for (int t0 = 0; t0 < T_; t0 += kRT) {
      with_tile<kRT>(std::min(kRT, T_ - t0), [&](auto rt) {
        for (int h0 = 0; h0 < 2; h0 += kNH)
          micro<T, Block, decltype(rt)::value, kNH>(group, nruns, xq + (size_t)t0 * nruns, nruns,
                                                     y + (size_t)t0 * ldy + g0, ldy, h0, lanes, rs, nullptr, false,
                                                     t0 == 0 && h0 == 0 ? pf : PrefetchL2{},
                                                     a16 ? a16 + (size_t)t0 * nruns * 32 : nullptr);
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

}  // namespace plm::kernels::PLM_AVX2_NS
