// The 2:4-sparse types (Q4_0_24_X16, I8_24_X16; layouts in common.h) with AVX2 + FMA + F16C, and
// AVX-VNNI (dot_avx2.h: one source, a namespace per variant): one token at a time (decode, and each
// token of a verifying step); prefill expands the rows into dense ones (matmul_sparse_expand).
//
// A 16-row record is two halves of 8 rows, one row per dword lane: the first 32 bytes of each
// 64-byte unit are rows 0-7. The 4 values of a row in unit u sit in two groups whose columns all lie
// in one 16-byte run of the activations (columns 8u..8u+7: Q4's low nibbles and I8's units 0-3; 32 +
// 8u..: Q4's high nibbles and I8's units 4-7), so vpshufb gathers them from that run, broadcast to
// both lanes, once the values' columns are known. Those come from the pattern codes: a vpshufb puts
// each row's two pattern bytes in its dword and vpsrlvd aligns its 12 bits; the two codes of a half
// (6 bits) go to all 4 bytes (vpshufb), the second code is brought down in bytes 2 and 3 (a 16-bit
// shift and a blend), and a vpshufb looks up the kept column of the group (kSparse24Pairs). Then
// vpmaddubsw (or vpdpbusd) multiplies values by activations:
//   Q4: codes 0..15 unsigned; the -8 comes off as 8 x the kept activations' sum (ones x activations).
//       Without VNNI a block's pair sums stay in 16 bits: 4 units x 2*15*127 = 15240, ones 4*2*127.
//   I8: |w| x sign(a, w) without VNNI (a pair <= 2*128*127, widened every step); with VNNI the
//       activations go in as a + 128 and 128 x the codes' sum comes off, as the AVX-512 kernel does.
// The compute per byte of weights is about twice the dense x16 kernel's, for 2/3 (I8: 0.6) of its
// bytes; decode is bound by the bytes where the dense kernel streams near the bus's rate.
#include "kernels/x86/sparse_avx2.h"

#include "kernels/x86/dot_avx2.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace plm::kernels::PLM_AVX2_NS {
namespace {

struct Consts {
  __m256i rows;       // vpshufb: the two pattern bytes of each row (of 8) into its dword
  __m256i shift[4];   // vpsrlvd: the code of pattern slot s of each row to bits 0..2
  __m256i cols[2][2]; // vpermd tables [u % 2][slot % 2]: code -> the columns (in the value's 16-byte
                      // run of activations) of the slot's two values, bytes 0, 1 (even slots) or 2, 3
};

Consts make_consts() {
  alignas(32) uint8_t rows[32];
  alignas(32) int32_t sh[4][8], cols[2][2][8];
  for (int n = 0; n < 32; ++n) {
    const int k = n / 4, b = n % 4;  // row k (of the half), byte b
    const int byte = (12 * k) / 8 - 6 * (k / 4);  // relative to the lane's 16 bytes (rows 4-7 from byte 6)
    rows[n] = (uint8_t)(b < 2 ? byte + b : 0x80);
  }
  for (int k = 0; k < 8; ++k)
    for (int s = 0; s < 4; ++s) sh[s][k] = (k % 2 ? 4 : 0) + 3 * s;  // odd rows start at bit 4 of their byte
  for (int u = 0; u < 2; ++u)
    for (int p = 0; p < 2; ++p)
      for (int c = 0; c < 8; ++c) {
        const int base = 8 * u + 4 * p;
        cols[u][p][c] = (int32_t)((uint32_t)(base + kSparse24Pairs[c][0]) | (uint32_t)(base + kSparse24Pairs[c][1]) << 8)
                        << (16 * p);
      }
  auto ld = [](const void* q) { return _mm256_load_si256(static_cast<const __m256i*>(q)); };
  Consts k;
  k.rows = ld(rows);
  for (int s = 0; s < 4; ++s) k.shift[s] = ld(sh[s]);
  for (int u = 0; u < 2; ++u)
    for (int p = 0; p < 2; ++p) k.cols[u][p] = ld(cols[u][p]);
  return k;
}

// Each row's 16 pattern bits holding its 12 (pattern unit u, half H of the rows) in its dword:
// 12 bytes at pat + 12 H, read as 8 + 4 so as never to pass the record.
inline __m256i row_codes(const uint8_t* pat, const Consts& k) {
  int32_t tail;
  std::memcpy(&tail, pat + 8, 4);
  const __m128i b = _mm_insert_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pat)), tail, 2);
  // rows 0-3 read bytes 0..5, rows 4-7 bytes 6..11: the high lane starts 6 bytes on
  const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_si128(b, 6), 1);
  return _mm256_shuffle_epi8(both, k.rows);
}

// The columns (0..15, in the values' 16-byte run of activations) of the 4 values of each row whose
// groups' codes are pattern slots 2h, 2h + 1, in unit u.
inline __m256i value_columns(__m256i codes, int u, int h, const Consts& k) {
  return _mm256_or_si256(_mm256_permutevar8x32_epi32(k.cols[u % 2][0], _mm256_srlv_epi32(codes, k.shift[2 * h])),
                         _mm256_permutevar8x32_epi32(k.cols[u % 2][1], _mm256_srlv_epi32(codes, k.shift[2 * h + 1])));
}

// A 16-byte run of activations in both lanes.
inline __m256i run(const int8_t* q) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
}

inline __m256 f16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Half H (rows 8H..8H+7) of one record group for one token (I8: before the row scales).
template <class Act, bool I8>
__m256 group_half(const uint8_t* rec, int64_t nb, const Act* xq, int H, const Consts& k) {
  constexpr bool kTwo = std::is_same_v<Act, BlockQ8A2>;
  constexpr size_t kRec = I8 ? kSparse24I8Record : kSparse24Record, kPat = I8 ? 512 : 288;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1), flip = _mm256_set1_epi8((char)0x80);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b, rec += kRec) {
    if (b + 4 < nb) _mm_prefetch(reinterpret_cast<const char*>(rec + 4 * kRec + 64 * H), _MM_HINT_T0);
    const Act* x[2] = {&xq[2 * b], &xq[2 * b + 1]};  // columns 0..31, 32..63
    // per half of the columns: level-1 and level-2 sums; Q4: the kept activations' sums of each
    // level (o1, o2); I8 with VNNI: the codes' sum (o1)
    __m256i s1[2], s2[2], o1[2], o2[2];
    for (int h = 0; h < 2; ++h) s1[h] = s2[h] = o1[h] = o2[h] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const __m256i codes = row_codes(rec + kPat + 24 * u + 12 * H, k);
      __m256i w[2];
      if constexpr (I8) {
        w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 64 * u + 32 * H));
        w[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 64 * (4 + u) + 32 * H));
      } else {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32 + 64 * u + 32 * H));
        w[0] = _mm256_and_si256(v, m4);
        w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      }
      for (int h = 0; h < 2; ++h) {  // pattern slots 2h, 2h + 1: columns 32h + 8u ..
        const __m256i cols = value_columns(codes, u, h, k);
        const __m256i a = _mm256_shuffle_epi8(run(x[h]->qs + 16 * (u / 2)), cols);
        __m256i a2 = _mm256_setzero_si256();
        if constexpr (kTwo) a2 = _mm256_shuffle_epi8(run(x[h]->qs2 + 16 * (u / 2)), cols);
        if constexpr (!I8) {
          s1[h] = dp_add(s1[h], w[h], a);
          o1[h] = dp_add(o1[h], ones, a);
          if constexpr (kTwo) {
            s2[h] = dp_add(s2[h], w[h], a2);
            o2[h] = dp_add(o2[h], ones, a2);
          }
        } else if constexpr (kVnni) {
          s1[h] = dp_add(s1[h], _mm256_xor_si256(a, flip), w[h]);
          if constexpr (kTwo) s2[h] = dp_add(s2[h], _mm256_xor_si256(a2, flip), w[h]);
          o1[h] = dp_add(o1[h], ones, w[h]);
        } else {
          const __m256i wabs = _mm256_abs_epi8(w[h]);
          s1[h] = dp_signed(s1[h], wabs, w[h], a);
          if constexpr (kTwo) s2[h] = dp_signed(s2[h], wabs, w[h], a2);
        }
      }
    }
    __m256 v = _mm256_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      __m256i r1, r2 = _mm256_setzero_si256();
      if constexpr (!I8) {  // sum (q - 8) a
        r1 = _mm256_sub_epi32(widen(s1[h]), _mm256_slli_epi32(widen(o1[h]), 3));
        if constexpr (kTwo) r2 = _mm256_sub_epi32(widen(s2[h]), _mm256_slli_epi32(widen(o2[h]), 3));
      } else if constexpr (kVnni) {  // sum (a + 128) w - 128 sum w
        const __m256i c = _mm256_slli_epi32(o1[h], 7);
        r1 = _mm256_sub_epi32(s1[h], c);
        if constexpr (kTwo) r2 = _mm256_sub_epi32(s2[h], c);
      } else {
        r1 = s1[h];
        r2 = s2[h];
      }
      v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r1), _mm256_set1_ps(x[h]->d), v);
      if constexpr (kTwo) v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(r2), _mm256_set1_ps(x[h]->d2), v);
    }
    acc = I8 ? _mm256_add_ps(acc, v) : _mm256_fmadd_ps(f16x8(rec + 16 * H), v, acc);
  }
  return acc;
}

}  // namespace

template <class Act>
void matmul_sparse24(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y, size_t ldy,
                     int n0, int n1) {
  if (T > 1 && !w.row_invariant) {  // prefill: dense rows through the GEMM
    matmul_sparse_expand<Act, PLM_AVX2_TABLE>(w, x, ldx, xq, T, y, ldy, n0, n1);
    return;
  }
  static const Consts k = make_consts();
  const bool i8 = w.dtype == DType::I8_24_X16;
  const int64_t nb = w.cols / 64, kb = w.cols / 32;
  const size_t group_bytes = (size_t)nb * sparse24_record(w.dtype);
  alignas(32) float out[16];
  for (int t = 0; t < T; ++t)
    for (int g = n0 / 16; g * 16 < n1; ++g) {
      const uint8_t* rec = w.data + (size_t)g * group_bytes;
      const Act* xt = xq + (size_t)t * kb;
      for (int H = 0; H < 2; ++H) {
        if (g * 16 + 8 * H + 8 <= n0 || g * 16 + 8 * H >= n1) continue;  // no row of this half in range
        const __m256 r = i8 ? group_half<Act, true>(rec, nb, xt, H, k) : group_half<Act, false>(rec, nb, xt, H, k);
        _mm256_store_ps(out + 8 * H, r);
      }
      for (int n = std::max(n0, g * 16); n < std::min(n1, g * 16 + 16); ++n)
        y[(size_t)t * ldy + n] = i8 ? out[n - g * 16] * w.row_scales[n] : out[n - g * 16];
    }
}

template void matmul_sparse24<BlockQ8A>(const WeightView&, const float*, size_t, const BlockQ8A*, int, float*, size_t,
                                        int, int);
template void matmul_sparse24<BlockQ8A2>(const WeightView&, const float*, size_t, const BlockQ8A2*, int, float*,
                                         size_t, int, int);

}  // namespace plm::kernels::PLM_AVX2_NS
