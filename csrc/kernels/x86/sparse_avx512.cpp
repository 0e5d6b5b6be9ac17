// Q4_0_24_X16 (2:4-sparse 4-bit weights, layout in common.h) for AVX-512 VNNI + VBMI.
//
// One token (decode, and each row of a verifying step): per record of 16 rows x 64 columns, each
// 64-byte unit of codes holds 4 kept values of each row (a dword per row). The columns they sit at
// come from the pattern codes: vpmultishiftqb pulls each value's 3-bit code out of its row's
// 12 bits, vpermb looks up the column in the group (kSparse24Pairs), and vpermb gathers the token's
// activation at that column for every byte. vpdpbusd then sums code x activation per row, and
// ones x activation gives the sum of the kept activations for the codes' -8. Decode reads 3.0
// bits per weight where dense Q4_0 reads 4.5. A short prefill runs tiles of 4 tokens per group of 16
// rows, each unit's columns decoded once for the tile; a longer one expands each group of rows into
// dense Q4_0_X16 records (vpermi2b places each kept value at its column) and runs the dense GEMM
// on them, which does more per cycle than the tiles though it multiplies the zeros. A CPU without VBMI never enters this file: the
// table's entry (kernels_avx512.cpp) sends it to matmul_sparse24_expand instead.
#include <immintrin.h>

// GCC 12 sees the undefined pass-through operand of the vpermb / vpmultishiftqb intrinsics as
// "maybe uninitialized": a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <type_traits>

#include "kernels/x86/sparse_avx512.h"
#include "kernels/x86/x16_avx512.h"

#include <vector>

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

// One record (16 rows x 64 columns) as the two dense Q4_0_X16 records of its columns (out: 576
// bytes), the pruned columns code 8: what prefill multiplies with the dense GEMM, which does more
// per byte than the tile above. Dense record h's unit v = 2a + p holds, per row, the columns of
// groups 8h + v (low nibbles) and 8h + 4 + v (high): the values of sparse unit a (low) and 2 + a
// (high), nibble h, whose pattern codes sit in slot 2h + p of the same units (layout in common.h).
inline void expand_record(const uint8_t* rec, uint8_t* out, const Consts& k) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), code4 = _mm512_set1_epi8(0x1C), eight = _mm512_set1_epi8(8),
                col = _mm512_set1_epi32(0x03020100);
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
    // (code << 2) | column, the byte holding that column's value, and the value (or 8 from the
    // second table, where bit 6 of the index is set)
    const __m512i key = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_slot[s], p[u]), code4, col, 0xEA);
    const __m512i at = _mm512_add_epi8(_mm512_permutexvar_epi8(key, k.kept[s % 2]), k.row_base);
    return _mm512_permutex2var_epi8(nib, at, eight);
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

bool has_vbmi() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi") != 0;
  }();
  return yes;
}

}  // namespace

bool sparse24_native() { return has_vbmi(); }

// Called only where sparse24_native() holds (kernels_avx512.cpp dispatches): this file is compiled
// with VBMI and must not run elsewhere, nor define code other files could link instead of theirs.
template <class Act>
void matmul_sparse24_vbmi(const WeightView& w, const Act* xq, int T, float* y, size_t ldy, int n0, int n1) {
  static const Consts k = make_consts();
  const int nb = (int)(w.cols / 64), kb = (int)(w.cols / 32);
  const size_t group_bytes = (size_t)nb * kSparse24Record;
  if (T >= kExpandTokens && !w.row_invariant) {  // prefill: each group of 16 rows through the dense GEMM
    thread_local std::vector<uint8_t> dense;
    const size_t dense_bytes = (size_t)nb * 2 * 288;
    if (dense.size() < dense_bytes) dense.resize(dense_bytes);
    for (int g = n0 / 16; g * 16 < n1; ++g) {
      const int lo = (n0 > g * 16 ? n0 : g * 16) - g * 16, hi = (n1 < g * 16 + 16 ? n1 : g * 16 + 16) - g * 16;
      const uint8_t* rec = w.data + (size_t)g * group_bytes;
      for (int b = 0; b < nb; ++b) expand_record(rec + (size_t)b * kSparse24Record, dense.data() + (size_t)b * 576, k);
      const WeightView dv{DType::Q4_0_X16, 16, w.cols, dense.data(), row_bytes(DType::Q4_0_X16, w.cols), nullptr};
      if constexpr (std::is_same_v<Act, BlockQ8A>) matmul_x16(dv, nullptr, 0, xq, T, y + g * 16, ldy, lo, hi);
      else matmul2_x16(dv, nullptr, 0, xq, T, y + g * 16, ldy, lo, hi);
    }
    return;
  }
  if constexpr (std::is_same_v<Act, BlockQ8A>) {
    if (T > 1 && !w.row_invariant) {  // prefill: tiles of 4 tokens over each group of 16 rows
      for (int g = n0 / 16; g * 16 < n1; ++g) {
        const int lo = (n0 > g * 16 ? n0 : g * 16) - g * 16, hi = (n1 < g * 16 + 16 ? n1 : g * 16 + 16) - g * 16;
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
      const __m512 r = group_rows<Act>(w.data + (size_t)g * group_bytes, nb, xt, k, end);
      const int lo = (n0 > g * 16 ? n0 : g * 16) - g * 16, hi = (n1 < g * 16 + 16 ? n1 : g * 16 + 16) - g * 16;
      _mm512_mask_storeu_ps(yt + g * 16, row_mask(lo, hi), r);
    }
  }
}

template void matmul_sparse24_vbmi<BlockQ8A>(const WeightView&, const BlockQ8A*, int, float*, size_t, int, int);
template void matmul_sparse24_vbmi<BlockQ8A2>(const WeightView&, const BlockQ8A2*, int, float*, size_t, int, int);

}  // namespace plm::kernels::avx512
