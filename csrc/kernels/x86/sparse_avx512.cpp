// The 2:4-sparse types (layouts in common.h) for AVX-512 VNNI + VBMI.
//
// Q4_0_24_X16, one token (decode, and each row of a verifying step): per record of 16 rows x 64
// columns, each 64-byte unit of codes holds 4 kept values of each row (a dword per row). The
// columns they sit at come from the pattern codes: vpmultishiftqb pulls each value's 3-bit code out
// of its row's 12 bits, vpermb looks up the column in the group (kSparse24Pairs), and vpermb
// gathers the token's activation at that column for every byte. vpdpbusd then sums code x
// activation per row, and ones x activation gives the sum of the kept activations for the codes'
// -8. Decode reads 3.0 bits per weight where dense Q4_0 reads 4.5. A short prefill runs tiles of 4
// tokens per group of 16 rows, each unit's columns decoded once for the tile; a longer one expands
// each group of rows into dense Q4_0_X16 records (vpermi2b places each kept value at its column)
// and runs the dense GEMM on them, which does more per cycle than the tiles though it multiplies
// the zeros.
//
// I8_24_X16 decodes the same way with signed values (4.75 bits per weight where dense I8 reads 8)
// and expands into dense I8_X16 records for any prefill. A CPU without VBMI never enters this
// file: the table's entry (kernels_avx512.cpp) sends it to matmul_sparse_expand instead.
#include <immintrin.h>

// GCC 12 sees the undefined pass-through operand of the vpermb / vpmultishiftqb intrinsics as
// "maybe uninitialized": a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <type_traits>

#include "kernels/x86/sparse_avx512.h"
#include "kernels/x86/x16_avx512.h"


namespace plm::kernels::avx512 {
namespace {

struct Consts {
  __m512i spread, ctrl_lo, ctrl_hi, pick, lut, base_lo[4], base_hi[4];
  // expand_record's: 4 x the code of pattern slot s of each byte's row (plus two bits below it),
  // (code, column) -> the byte of the row's unit holding the value kept there (0x40: none) for even
  // and odd slots, and each byte's row offset
  __m512i ctrl_slot[4], kept[2], row_base;
};

Consts make_consts() {
  alignas(64) uint8_t spread[64], cl[64], ch[64], pick[64], lut[64], bl[4][64], bh[4][64], cs[4][64], kept[2][64],
      rb[64];
  for (int n = 0; n < 64; ++n) {
    // bits 12 r + 3 s - 2 ..: the code shifted left by 2 (slot 0 of row 0 wraps round the qword)
    for (int s = 0; s < 4; ++s) cs[s][n] = (uint8_t)((12 * ((n % 8) / 4) + 3 * s + 62) % 64);
    rb[n] = (uint8_t)(n & ~3);
    const int c = (n / 4) % 8, col = n % 4;  // kept: index (c << 2) | col
    for (int par = 0; par < 2; ++par)
      kept[par][n] = (uint8_t)(kSparse24Pairs[c][0] == col ? 2 * par : kSparse24Pairs[c][1] == col ? 2 * par + 1 : 0x40);
    const int q = n / 8, t = n % 8;
    spread[n] = (uint8_t)(t < 3 ? 3 * q + t : 0);  // qword q <- the 24 bits of rows 2q, 2q + 1
    const int r = (n % 8) / 4, j = n % 4;          // byte n: row 2q + r, its value j of the unit
    cl[n] = (uint8_t)(12 * r + 3 * (j / 2));       // groups 2u, 2u + 1
    ch[n] = (uint8_t)(12 * r + 3 * (2 + j / 2));   // groups 8 + 2u, 9 + 2u
    pick[n] = (uint8_t)(8 * (j % 2));              // a group's first or second kept column
    for (int u = 0; u < 4; ++u) {
      bl[u][n] = (uint8_t)(8 * u + 4 * (j / 2));
      bh[u][n] = (uint8_t)(32 + 8 * u + 4 * (j / 2));
    }
    lut[n] = 0;
  }
  for (int c = 0; c < 8; ++c) {
    lut[c] = (uint8_t)kSparse24Pairs[c][0];
    lut[8 + c] = (uint8_t)kSparse24Pairs[c][1];
  }
  Consts k;
  k.spread = _mm512_load_si512(spread);
  k.ctrl_lo = _mm512_load_si512(cl);
  k.ctrl_hi = _mm512_load_si512(ch);
  k.pick = _mm512_load_si512(pick);
  k.lut = _mm512_load_si512(lut);
  for (int u = 0; u < 4; ++u) {
    k.base_lo[u] = _mm512_load_si512(bl[u]);
    k.base_hi[u] = _mm512_load_si512(bh[u]);
    k.ctrl_slot[u] = _mm512_load_si512(cs[u]);
  }
  for (int par = 0; par < 2; ++par) k.kept[par] = _mm512_load_si512(kept[par]);
  k.row_base = _mm512_load_si512(rb);
  return k;
}

// Records prefetched ahead in decode: the hardware prefetchers alone left one thread at 27 GB/s on a
// cold [4864 x 896] matrix, 24 records (9 KB) ahead at 36 (bench/kernels/sparse24_proto.cpp,
// Zen 5: 2, 4, 8, 16, 24, 32, 48 tried). Bounded to the tensor: integer addresses, compared first.
constexpr uintptr_t kPrefetchAhead = 24 * kSparse24Record;
// I8_24_X16: 8 records (4.9 KB); one thread, cold [4864 x 896], two-level activations: 4 records
// 29.8 GB/s, 8 31.6-33.4, 12 30.4, 16 32.3, 32 31.5 (Zen 5).
constexpr uintptr_t kPrefetchAheadI8 = 8 * kSparse24I8Record;
// Tokens per prefill tile. Measured on the Qwen shape's pp256 (Zen 5): 3 tokens 1,030 tok/s, 4
// 1,100-1,190, 6 450 and 8 650 (their sums spill out of the 32 registers).
constexpr int kTile = 4;
// Tokens from which prefill expands each group of rows into dense Q4_0_X16 and runs the dense GEMM
// instead of the tiles (one thread, [4864 x 896], Zen 5; time of the dense Q4_0_X16 kernel over
// the sparse one): tiles 0.83x at 8, 16 and 32 tokens; expanded 0.66x at 8, 0.77x at 16, 0.90x
// at 32, 0.96x at 256, 1.00x at 1024 (the expansion, ~60 cycles a record, is paid once per call).
constexpr int kExpandTokens = 24;

// Activations of 64 columns (two blocks) as one vector: level 1, or level 2 (BlockQ8A2's residual).
template <class Act, bool Level2>
inline __m512i columns(const Act& x0, const Act& x1) {
  const int8_t* a = x0.qs;
  const int8_t* b = x1.qs;
  if constexpr (Level2) a = x0.qs2, b = x1.qs2;
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                            _mm256_loadu_si256((const __m256i*)b), 1);
}

// Unit u of a record: its 4 values of each of the 16 rows as bytes (codes 0..15: low nibbles in
// *lo, high in *hi) and the columns they sit at (0..31 for the low-nibble values, 32..63 for the
// high ones: byte indices into columns()'s vector), from the unit's 3-bit pattern codes.
inline void unit_values(const uint8_t* rec, int u, const Consts& k, __m512i* lo, __m512i* hi, __m512i* ilo,
                        __m512i* ihi) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), seven = _mm512_set1_epi8(7);
  const __m512i w = _mm512_loadu_si512(rec + 32 + 64 * u);
  *lo = _mm512_and_si512(w, m4);
  *hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
  const __m512i p = _mm512_permutexvar_epi8(k.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, rec + 288 + 24 * u));
  // (code & 7) | pick: the lookup index of each byte's kept column
  const __m512i clo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_lo, p), seven, k.pick, 0xEA);
  const __m512i chi = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_hi, p), seven, k.pick, 0xEA);
  *ilo = _mm512_add_epi8(_mm512_permutexvar_epi8(clo, k.lut), k.base_lo[u]);
  *ihi = _mm512_add_epi8(_mm512_permutexvar_epi8(chi, k.lut), k.base_hi[u]);
}

// The lanes (rows of a 16-row group) from lo to hi - 1.
inline __mmask16 row_mask(int lo, int hi) { return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u)); }

// sum over the kept columns of (q - 8) x, per row, for the low- and high-nibble values: the
// code x activation sums minus 8 x the kept activations' sums, exact in int32.
struct Sums {
  __m512i alo, ahi, slo, shi;
  void zero() { alo = ahi = slo = shi = _mm512_setzero_si512(); }
  void add(__m512i wlo, __m512i whi, __m512i plo, __m512i phi, __m512i ones) {
    alo = _mm512_dpbusd_epi32(alo, wlo, plo);
    ahi = _mm512_dpbusd_epi32(ahi, whi, phi);
    slo = _mm512_dpbusd_epi32(slo, ones, plo);
    shi = _mm512_dpbusd_epi32(shi, ones, phi);
  }
  // (low-nibble sums) * da + (high-nibble sums) * db
  __m512 scaled(float da, float db) const {
    const __m512i rlo = _mm512_sub_epi32(alo, _mm512_slli_epi32(slo, 3));
    const __m512i rhi = _mm512_sub_epi32(ahi, _mm512_slli_epi32(shi, 3));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(rlo), _mm512_set1_ps(da),
                           _mm512_mul_ps(_mm512_cvtepi32_ps(rhi), _mm512_set1_ps(db)));
  }
};

// The 16 rows of one record group (rows 16 g16 .. 16 g16 + 15) for one token; `end`: the tensor's
// end. Two-level activations (BlockQ8A2) add the residual's dot products with the same columns.
template <class Act>
inline __m512 group_rows(const uint8_t* rec, int nb, const Act* xq, const Consts& k, uintptr_t end) {
  constexpr bool kTwo = std::is_same_v<Act, BlockQ8A2>;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 facc = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b, rec += kSparse24Record) {
    const uintptr_t pf = (uintptr_t)rec + kPrefetchAhead;
    if (pf < end)
      for (int l = 0; l < 6; ++l) _mm_prefetch((const char*)(pf + 64 * (uintptr_t)l), _MM_HINT_T0);
    const Act& x0 = xq[2 * b];
    const Act& x1 = xq[2 * b + 1];
    const __m512i xv = columns<Act, false>(x0, x1);
    __m512i xv2 = _mm512_setzero_si512();
    if constexpr (kTwo) xv2 = columns<Act, true>(x0, x1);
    Sums s1, s2;
    s1.zero();
    if constexpr (kTwo) s2.zero();
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      __m512i wlo, whi, ilo, ihi;
      unit_values(rec, u, k, &wlo, &whi, &ilo, &ihi);
      s1.add(wlo, whi, _mm512_permutexvar_epi8(ilo, xv), _mm512_permutexvar_epi8(ihi, xv), ones);
      if constexpr (kTwo) s2.add(wlo, whi, _mm512_permutexvar_epi8(ilo, xv2), _mm512_permutexvar_epi8(ihi, xv2), ones);
    }
    __m512 v = s1.scaled(x0.d, x1.d);
    if constexpr (kTwo) v = _mm512_add_ps(v, s2.scaled(x0.d2, x1.d2));
    facc = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)rec)), v, facc);
  }
  return facc;
}

// Rows 16 g .. 16 g + 15 for RT tokens (prefill): each unit's columns are decoded once and serve
// every token of the tile. The activations are made unsigned (x + 128, one xor per block and token)
// and the codes signed (q - 8), so a token costs two vpermb and two vpdpbusd a unit; the 128 (q - 8)
// it adds is a sum of the weights alone, taken once per unit for all tokens.
template <int RT>
void group_rows_tile(const uint8_t* rec, int nb, const BlockQ8A* xq, int kb, const Consts& k, float* y,
                     size_t ldy, int lo, int hi) {
  const __m512i ones = _mm512_set1_epi8(1), eight = _mm512_set1_epi8(8), flip = _mm512_set1_epi8((char)0x80);
  const __mmask16 m = row_mask(lo, hi);
  __m512 facc[RT];
  for (int t = 0; t < RT; ++t) facc[t] = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b, rec += kSparse24Record) {
    __m512i xv[RT], alo[RT], ahi[RT];
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const BlockQ8A* xt = xq + (size_t)t * kb + 2 * b;
      xv[t] = _mm512_xor_si512(flip, _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)xt[0].qs)),
                                                         _mm256_loadu_si256((const __m256i*)xt[1].qs), 1));
      alo[t] = ahi[t] = _mm512_setzero_si512();
    }
    __m512i clo = _mm512_setzero_si512(), chi = clo;  // sum of the signed codes, per row and half
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      __m512i wlo, whi, ilo, ihi;
      unit_values(rec, u, k, &wlo, &whi, &ilo, &ihi);
      wlo = _mm512_sub_epi8(wlo, eight);  // signed codes q - 8
      whi = _mm512_sub_epi8(whi, eight);
      clo = _mm512_dpbusd_epi32(clo, ones, wlo);
      chi = _mm512_dpbusd_epi32(chi, ones, whi);
#pragma GCC unroll 4
      for (int t = 0; t < RT; ++t) {
        alo[t] = _mm512_dpbusd_epi32(alo[t], _mm512_permutexvar_epi8(ilo, xv[t]), wlo);
        ahi[t] = _mm512_dpbusd_epi32(ahi[t], _mm512_permutexvar_epi8(ihi, xv[t]), whi);
      }
    }
    const __m512i clo128 = _mm512_slli_epi32(clo, 7), chi128 = _mm512_slli_epi32(chi, 7);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)rec));
#pragma GCC unroll 4
    for (int t = 0; t < RT; ++t) {
      const BlockQ8A* xt = xq + (size_t)t * kb + 2 * b;
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(alo[t], clo128)), _mm512_set1_ps(xt[0].d),
                                       _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ahi[t], chi128)),
                                                     _mm512_set1_ps(xt[1].d)));
      facc[t] = _mm512_fmadd_ps(dw, v, facc[t]);
    }
  }
  for (int t = 0; t < RT; ++t) _mm512_mask_storeu_ps(y + (size_t)t * ldy, m, facc[t]);
}

// For expand_record: the vpermi2b indices that place a unit's values (bytes 4i..4i+3 of row i: two
// of pattern slot s's group, at 4i + 2 (s % 2) and + 1) at the group's columns: each byte's
// (code << 2) | column looks up the byte holding that column's value, or 0x40 (the second table's
// byte 0) where the column was pruned. p: the unit's pattern codes, spread.
inline __m512i placing(__m512i p, int s, const Consts& k) {
  const __m512i key = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_slot[s], p), _mm512_set1_epi8(0x1C),
                                                _mm512_set1_epi32(0x03020100), 0xEA);
  return _mm512_add_epi8(_mm512_permutexvar_epi8(key, k.kept[s % 2]), k.row_base);
}

// One record (16 rows x 64 columns) as the two dense Q4_0_X16 records of its columns (out: 576
// bytes), the pruned columns code 8: what prefill multiplies with the dense GEMM, which does more
// per byte than the tile above. Dense record h's unit v = 2a + p holds, per row, the columns of
// groups 8h + v (low nibbles) and 8h + 4 + v (high): the values of sparse unit a (low) and 2 + a
// (high), nibble h, whose pattern codes sit in slot 2h + p of the same units (layout in common.h).
inline void expand_record(const uint8_t* rec, uint8_t* out, const Consts& k) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  const __m256i d = _mm256_loadu_si256((const __m256i*)rec);
  _mm256_storeu_si256((__m256i*)out, d);
  _mm256_storeu_si256((__m256i*)(out + 288), d);
  __m512i w[4], p[4];
  for (int u = 0; u < 4; ++u) {
    w[u] = _mm512_loadu_si512(rec + 32 + 64 * u);
    p[u] = _mm512_permutexvar_epi8(k.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, rec + 288 + 24 * u));
  }
  // Sparse unit u's nibble h placed at the columns of pattern slot s (byte j of a row: column j of the group).
  auto placed = [&](int u, int h, int s) {
    const __m512i nib = h ? _mm512_and_si512(_mm512_srli_epi16(w[u], 4), m4) : _mm512_and_si512(w[u], m4);
    return _mm512_permutex2var_epi8(nib, placing(p[u], s, k), eight);
  };
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
    for (int a = 0; a < 2; ++a)
#pragma GCC unroll 2
      for (int par = 0; par < 2; ++par) {
        const int s = 2 * h + par;
        const __m512i v = _mm512_or_si512(placed(a, h, s), _mm512_slli_epi16(placed(2 + a, h, s), 4));
        _mm512_storeu_si512(out + 288 * h + 32 + 64 * (2 * a + par), v);
      }
}

// One I8_24_X16 record as the two dense I8_X16 records of its columns (out: 1024 bytes), the pruned
// columns 0. Dense record h's unit v holds, per row, the columns of group 8h + v: values of sparse
// unit 4h + v / 2, pattern slot 2h + v % 2 of pattern unit v / 2 (layout in common.h).
inline void expand_record_i8(const uint8_t* rec, uint8_t* out, const Consts& k) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i p[4];
  for (int u = 0; u < 4; ++u)
    p[u] = _mm512_permutexvar_epi8(k.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, rec + 512 + 24 * u));
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) {
      const __m512i w = _mm512_loadu_si512(rec + 64 * (4 * h + v / 2));
      _mm512_storeu_si512(out + 512 * h + 64 * v, _mm512_permutex2var_epi8(w, placing(p[v / 2], 2 * h + v % 2, k), zero));
    }
}

// I8_24_X16: the 16 rows of one record group for one token, before the row scales. Value unit u
// (columns 8u..8u+7) takes the columns of pattern unit u % 4's slots 0, 1 (u < 4) or 2, 3, as
// unit_values' low- and high-nibble values do. vpdpbusd wants unsigned x signed: the activations
// go in as x + 128 and 128 x the kept weights' sum (ones x codes, shared by both levels) comes off.
template <class Act>
inline __m512 group_rows_i8(const uint8_t* rec, int nb, const Act* xq, const Consts& k, uintptr_t end) {
  constexpr bool kTwo = std::is_same_v<Act, BlockQ8A2>;
  const __m512i ones = _mm512_set1_epi8(1), seven = _mm512_set1_epi8(7), flip = _mm512_set1_epi8((char)0x80);
  __m512 facc = _mm512_setzero_ps();
  for (int b = 0; b < nb; ++b, rec += kSparse24I8Record) {
    const uintptr_t pf = (uintptr_t)rec + kPrefetchAheadI8;
    if (pf < end)
      for (int l = 0; l < 10; ++l) _mm_prefetch((const char*)(pf + 64 * (uintptr_t)l), _MM_HINT_T0);
    const Act& x0 = xq[2 * b];
    const Act& x1 = xq[2 * b + 1];
    const __m512i xv = _mm512_xor_si512(columns<Act, false>(x0, x1), flip);
    __m512i xv2 = _mm512_setzero_si512();
    if constexpr (kTwo) xv2 = _mm512_xor_si512(columns<Act, true>(x0, x1), flip);
    __m512i a[2], a2[2], c[2];  // per half (columns 0..31, 32..63): level 1, level 2, the codes' sum
    for (int h = 0; h < 2; ++h) a[h] = a2[h] = c[h] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m512i p = _mm512_permutexvar_epi8(k.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, rec + 512 + 24 * u));
      const __m512i idx[2] = {
          _mm512_add_epi8(_mm512_permutexvar_epi8(
                              _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_lo, p), seven, k.pick, 0xEA), k.lut),
                          k.base_lo[u]),
          _mm512_add_epi8(_mm512_permutexvar_epi8(
                              _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_hi, p), seven, k.pick, 0xEA), k.lut),
                          k.base_hi[u])};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i w = _mm512_loadu_si512(rec + 64 * (4 * h + u));
        a[h] = _mm512_dpbusd_epi32(a[h], _mm512_permutexvar_epi8(idx[h], xv), w);
        if constexpr (kTwo) a2[h] = _mm512_dpbusd_epi32(a2[h], _mm512_permutexvar_epi8(idx[h], xv2), w);
        c[h] = _mm512_dpbusd_epi32(c[h], ones, w);
      }
    }
    const __m512i c0 = _mm512_slli_epi32(c[0], 7), c1 = _mm512_slli_epi32(c[1], 7);
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[0], c0)), _mm512_set1_ps(x0.d),
                               _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a[1], c1)), _mm512_set1_ps(x1.d)));
    if constexpr (kTwo) {
      v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a2[0], c0)), _mm512_set1_ps(x0.d2), v);
      v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a2[1], c1)), _mm512_set1_ps(x1.d2), v);
    }
    facc = _mm512_add_ps(facc, v);
  }
  return facc;
}

bool has_vbmi() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") != 0;
  }();
  return yes;
}

bool has_vbmi2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi2") != 0;
  }();
  return yes;
}

}  // namespace

// This file is compiled with VBMI2 as well (the bitmask kernel): both must be there to enter it.
int sparse24_kernel() { return has_vbmi() && has_vbmi2() ? kSparse24Faster : kSparse24None; }

// Called only where sparse24_kernel() is kSparse24Faster (kernels_avx512.cpp dispatches): this file is compiled
// with VBMI and must not run elsewhere, nor define code other files could link instead of theirs.
template <class Act>
void matmul_sparse24_vbmi(const WeightView& w, const Act* xq, int T, float* y, size_t ldy, int n0, int n1) {
  static const Consts k = make_consts();
  const bool i8 = w.dtype == DType::I8_24_X16;
  const int nb = (int)(w.cols / 64), kb = (int)(w.cols / 32);
  const size_t group_bytes = (size_t)nb * sparse24_record(w.dtype);
  auto rows_of = [&](int g, int* lo, int* hi) {  // group g's rows in [n0, n1), as lanes
    *lo = (n0 > g * 16 ? n0 : g * 16) - g * 16;
    *hi = (n1 < g * 16 + 16 ? n1 : g * 16 + 16) - g * 16;
  };
  // Prefill: each group of 16 rows expanded into dense records and through the dense GEMM. The int8
  // type has no tiles of its own: from 2 tokens (it expands as cheaply: a vpermi2b per 64 bytes).
  // Two-level activations have no tiles either: they expand from 2 tokens too.
  const bool tiles = !i8 && std::is_same_v<Act, BlockQ8A>;
  if (T >= (tiles ? kExpandTokens : 2) && !w.row_invariant) {
    const DType to = i8 ? DType::I8_X16 : DType::Q4_0_X16;
    thread_local ScratchBytes scratch;  // kernels.h: no std::vector code compiled with VBMI
    uint8_t* const dense = scratch.get((size_t)16 * row_bytes(to, w.cols));
    for (int g = n0 / 16; g * 16 < n1; ++g) {
      int lo, hi;
      rows_of(g, &lo, &hi);
      const uint8_t* rec = w.data + (size_t)g * group_bytes;
      for (int b = 0; b < nb; ++b) {
        if (i8) expand_record_i8(rec + (size_t)b * kSparse24I8Record, dense + (size_t)b * 1024, k);
        else expand_record(rec + (size_t)b * kSparse24Record, dense + (size_t)b * 576, k);
      }
      const WeightView dv{to, 16, w.cols, dense, row_bytes(to, w.cols), i8 ? w.row_scales + g * 16 : nullptr};
      if constexpr (std::is_same_v<Act, BlockQ8A>) matmul_x16(dv, nullptr, 0, xq, T, y + g * 16, ldy, lo, hi);
      else matmul2_x16(dv, nullptr, 0, xq, T, y + g * 16, ldy, lo, hi);
    }
    return;
  }
  if constexpr (std::is_same_v<Act, BlockQ8A>) {
    if (T > 1 && !w.row_invariant && !i8) {  // a short prefill: tiles of 4 tokens over each group of 16 rows
      for (int g = n0 / 16; g * 16 < n1; ++g) {
        int lo, hi;
        rows_of(g, &lo, &hi);
        const uint8_t* rec = w.data + (size_t)g * group_bytes;
        int t = 0;
        for (; t + kTile <= T; t += kTile)
          group_rows_tile<kTile>(rec, nb, xq + (size_t)t * kb, kb, k, y + (size_t)t * ldy + g * 16, ldy, lo, hi);
        for (; t < T; ++t)
          group_rows_tile<1>(rec, nb, xq + (size_t)t * kb, kb, k, y + (size_t)t * ldy + g * 16, ldy, lo, hi);
      }
      return;
    }
  }
  // Decode, a verifying step (each token exactly as a step of one), and two-level activations.
  const uintptr_t end = (uintptr_t)w.data + (uintptr_t)(w.rows / 16) * group_bytes;
  for (int t = 0; t < T; ++t) {
    const Act* xt = xq + (size_t)t * kb;
    float* yt = y + (size_t)t * ldy;
    for (int g = n0 / 16; g * 16 < n1; ++g) {
      int lo, hi;
      rows_of(g, &lo, &hi);
      const __mmask16 m = row_mask(lo, hi);
      const uint8_t* rec = w.data + (size_t)g * group_bytes;
      if (i8) {
        const __m512 r = group_rows_i8<Act>(rec, nb, xt, k, end);
        _mm512_mask_storeu_ps(yt + g * 16, m, _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, w.row_scales + g * 16)));
      } else {
        _mm512_mask_storeu_ps(yt + g * 16, m, group_rows<Act>(rec, nb, xt, k, end));
      }
    }
  }
}


// In place but slower than the dense kernel on the expanded weights: ~12 cycles per row and block
// of 64 columns, where the dense kernel streams them at the bus's rate (Qwen shape int8 pruned 50 %,
// Zen 5, 2 threads: decode 0.55x the dense int8 bundle). So "auto" expands, "in-place" keeps the bytes.
int bitmask_kernel() { return has_vbmi2() ? kSparse24Slower : kSparse24None; }

// The first k (0..64) bytes of a 64-byte load: a masked load reads no byte past them (no fault at
// the tensor's end). vpexpandb then spreads them over the mask's columns. (vpexpandb's memory
// form reads only the k bytes itself, but on Zen 4/5 it is microcoded: ~8x slower here.)
inline __mmask64 low_bytes(int k) { return k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << k) - 1); }

// I8_BITMASK, one token at a time: per row and block of 64 columns, a masked load takes the stored
// values (popcount of the mask) and vpexpandb puts them at their columns, zeros elsewhere; vpdpbusd multiplies them by the
// token's activations as x + 128 (flipped once per token), and 128 x the codes' sum comes off. The
// 16 int32 lanes (4 columns each: lanes 0-7 the first 32-block, 8-15 the second) take their
// activation scales and add into a float vector, summed once per row.
template <class Act>
void matmul_bitmask_vbmi2(const WeightView& w, const Act* xq, int T, float* y, size_t ldy, int n0, int n1) {
  constexpr bool kTwo = std::is_same_v<Act, BlockQ8A2>;
  const int nb = (int)(w.cols / 64), kb = (int)(w.cols / 32);
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8((char)0x80);
  // per block: the activations + 128 (then the residual's), and their scales per int32 lane
  thread_local ScratchBytes scratch;  // kernels.h: no std::vector code compiled with VBMI
  uint8_t* const buf = scratch.get((size_t)nb * (kTwo ? 2 : 1) * 128 + 64);
  __m512i* const xs = reinterpret_cast<__m512i*>(((uintptr_t)buf + 63) & ~(uintptr_t)63);
  __m512* const ds = reinterpret_cast<__m512*>(xs + (size_t)nb * (kTwo ? 2 : 1));
  for (int t = 0; t < T; ++t) {
    const Act* xt = xq + (size_t)t * kb;
    for (int b = 0; b < nb; ++b) {
      const Act &x0 = xt[2 * b], &x1 = xt[2 * b + 1];
      xs[b] = _mm512_xor_si512(columns<Act, false>(x0, x1), flip);
      ds[b] = _mm512_insertf32x8(_mm512_set1_ps(x0.d), _mm256_set1_ps(x1.d), 1);
      if constexpr (kTwo) {
        xs[nb + b] = _mm512_xor_si512(columns<Act, true>(x0, x1), flip);
        ds[nb + b] = _mm512_insertf32x8(_mm512_set1_ps(x0.d2), _mm256_set1_ps(x1.d2), 1);
      }
    }
    for (int n = n0; n < n1; ++n) {
      const uint8_t* row = bitmask_row(w.data, w.rows, n);
      const uint8_t* v = row + 8 * (size_t)nb;
      // float sums per block parity and level (registers, unrolled by hand: indexed by b & 1
      // they went through the stack): a block's FMAs do not wait on the previous block's
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a20 = a0, a21 = a0;
      auto block = [&](int b, __m512& acc, __m512& acc2) {
        uint64_t m;
        std::memcpy(&m, row + 8 * (size_t)b, 8);
        const int k = __builtin_popcountll(m);
        const __m512i wv = _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(low_bytes(k), v));
        v += k;
        const __m512i c = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv), 7);
        const __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xs[b], wv), c);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), ds[b], acc);
        if constexpr (kTwo) {
          const __m512i s2 = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xs[nb + b], wv), c);
          acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), ds[nb + b], acc2);
        }
      };
      int b = 0;
      for (; b + 2 <= nb; b += 2) {
        block(b, a0, a20);
        block(b + 1, a1, a21);
      }
      if (b < nb) block(b, a0, a20);
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a20, a21));
      y[(size_t)t * ldy + n] = _mm512_reduce_add_ps(sum) * w.row_scales[n];
    }
  }
}

void bitmask_rows_vbmi2(const WeightView& w, int n, int m, uint8_t* out) {
  const int nb = (int)(w.cols / 64);
  for (int r = 0; r < m; ++r) {
    const uint8_t* row = bitmask_row(w.data, w.rows, n + r);
    const uint8_t* v = row + 8 * (size_t)nb;
    for (int b = 0; b < nb; ++b, out += 64) {
      uint64_t mask;
      std::memcpy(&mask, row + 8 * (size_t)b, 8);
      const int k = __builtin_popcountll(mask);
      _mm512_storeu_si512(out, _mm512_maskz_expand_epi8(mask, _mm512_maskz_loadu_epi8(low_bytes(k), v)));
      v += k;
    }
  }
}

template void matmul_bitmask_vbmi2<BlockQ8A>(const WeightView&, const BlockQ8A*, int, float*, size_t, int, int);
template void matmul_bitmask_vbmi2<BlockQ8A2>(const WeightView&, const BlockQ8A2*, int, float*, size_t, int, int);

template void matmul_sparse24_vbmi<BlockQ8A>(const WeightView&, const BlockQ8A*, int, float*, size_t, int, int);
template void matmul_sparse24_vbmi<BlockQ8A2>(const WeightView&, const BlockQ8A2*, int, float*, size_t, int, int);

}  // namespace plm::kernels::avx512
