// Prototype (not part of the build): a one-token AVX-512 (VBMI, VNNI) kernel for 2:4-sparse 4-bit
// weights in a row-interleaved layout, timed against pocketlm's dense Q4_0_X16 kernel on the same
// matrix shape, both streaming copies larger than the L3 ("cold"). It answers issue 17's "3 bits or
// 4 bits per pattern: measure" before a type id is fixed in the .plm format.
//
// Layout (per 16 rows x 64 columns, 384 bytes, 3.0 bits per weight):
//   d[16]   f16, one scale per row for its 32 kept values (x = d * (q - 8))
//   qs      4 units of 64 bytes: unit u holds bytes 4u..4u+3 of every row's 16 nibble bytes, row i at
//           4i (as Q4_0_X16): value j is the low nibble of byte j, value 16 + j the high one
//   pat     4 units of 24 bytes: unit u holds 12 bits per row (row i at bit 12i): the 3-bit pattern
//           codes of groups 2u, 2u+1 (values 4u..4u+3) and 8+2u, 9+2u (values 16+4u..16+4u+3)
//   group g (columns 4g..4g+3) keeps values 2g, 2g+1 at columns 4g+a, 4g+b, (a, b) = PAIRS[code]
//
// Build (from the repo root, with a CMake build's kernel objects as bench_matmul2.cpp says):
//   g++ -std=c++17 -O3 -DPLM_X86=1 -Icsrc -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512vbmi \
//       bench/kernels/sparse24_proto.cpp $O/csrc/kernels/x86/*.o $O/csrc/kernels/ref/kernels_ref.cpp.o \
//       $O/csrc/kernels/dispatch.cpp.o $O/avx2_vnni*/*.o -pthread -o /tmp/sparse24_proto
//   /tmp/sparse24_proto [N] [K] [records to prefetch ahead, 0 = none]
// Tried and dropped (Zen 5, [4864 x 896], one thread): codes made signed and activations unsigned so
// the kept activations' sums become weight-only byte adds: 32.2 against 33.0 us hot, no better cold.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/kernels.h"

using namespace plm;
using namespace plm::kernels;

namespace {

constexpr int kPairs[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};
constexpr int kRec = 384;
int kPrefetch = 0;  // records ahead (argv[3])

struct Sparse {
  int N, K;
  std::vector<uint8_t> data;
};

// Dense reference weights w[N][K] (already 2:4) and their sparse encoding.
Sparse encode(const std::vector<int>& code, const std::vector<int>& q, const std::vector<float>& d, int N, int K) {
  // code[n][g], q[n][v] (32 values per 64 columns, value index v over the row), d[n][b]
  Sparse s{N, K, std::vector<uint8_t>((size_t)N * K / 64 * 24)};
  const int nb = K / 64;
  for (int g16 = 0; g16 < N / 16; ++g16)
    for (int b = 0; b < nb; ++b) {
      uint8_t* rec = s.data.data() + ((size_t)g16 * nb + b) * kRec;
      for (int i = 0; i < 16; ++i) {
        const int n = g16 * 16 + i;
        const fp16_t h = fp32_to_fp16(d[(size_t)n * nb + b]);
        std::memcpy(rec + 2 * i, &h, 2);
        const int* qv = &q[((size_t)n * nb + b) * 32];
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = (uint8_t)(qv[j] | qv[16 + j] << 4);
          rec[32 + 64 * (j / 4) + 4 * i + j % 4] = byte;
        }
        const int* cg = &code[((size_t)n * nb + b) * 16];
        for (int u = 0; u < 4; ++u) {
          const int groups[4] = {2 * u, 2 * u + 1, 8 + 2 * u, 9 + 2 * u};
          uint32_t bits = 0;
          for (int k = 0; k < 4; ++k) bits |= (uint32_t)cg[groups[k]] << (3 * k);
          uint8_t* pu = rec + 288 + 24 * u;
          for (int t = 0; t < 12; ++t) {
            const int bit = 12 * i + t;
            if (bits >> t & 1) pu[bit / 8] |= (uint8_t)(1u << (bit % 8));
          }
        }
      }
    }
  return s;
}

struct Consts {
  __m512i spread, ctrl_lo, ctrl_hi, add_lo, lut, base_lo[4], base_hi[4];
};

Consts make_consts() {
  alignas(64) uint8_t spread[64], cl[64], ch[64], al[64], lut[64];
  alignas(64) uint8_t bl[4][64], bh[4][64];
  for (int n = 0; n < 64; ++n) {
    const int q = n / 8, t = n % 8;
    spread[n] = (uint8_t)(t < 3 ? 3 * q + t : 0);
    const int r = (n % 8) / 4, j = n % 4;  // byte n: row 2q + r, value j
    cl[n] = (uint8_t)(12 * r + 3 * (j / 2));
    ch[n] = (uint8_t)(12 * r + 3 * (2 + j / 2));
    al[n] = (uint8_t)(8 * (j % 2));
    for (int u = 0; u < 4; ++u) {
      bl[u][n] = (uint8_t)(8 * u + 4 * (j / 2));
      bh[u][n] = (uint8_t)(32 + 8 * u + 4 * (j / 2));
    }
    lut[n] = 0;
  }
  for (int c = 0; c < 8; ++c) {
    lut[c] = (uint8_t)(c < 6 ? kPairs[c][0] : 0);
    lut[8 + c] = (uint8_t)(c < 6 ? kPairs[c][1] : 1);
  }
  Consts k;
  k.spread = _mm512_load_si512(spread);
  k.ctrl_lo = _mm512_load_si512(cl);
  k.ctrl_hi = _mm512_load_si512(ch);
  k.add_lo = _mm512_load_si512(al);
  k.lut = _mm512_load_si512(lut);
  for (int u = 0; u < 4; ++u) {
    k.base_lo[u] = _mm512_load_si512(bl[u]);
    k.base_hi[u] = _mm512_load_si512(bh[u]);
  }
  return k;
}

// y[n] for n in [0, N), one token.
void sparse_matvec(const Sparse& s, const BlockQ8A* xq, float* y, const Consts& k) {
  const int nb = s.K / 64;
  const __m512i m4 = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1), seven = _mm512_set1_epi8(7);
  for (int g16 = 0; g16 < s.N / 16; ++g16) {
    __m512 facc = _mm512_setzero_ps();
    const uint8_t* rec = s.data.data() + (size_t)g16 * nb * kRec;
    for (int b = 0; b < nb; ++b, rec += kRec) {
      const BlockQ8A& x0 = xq[2 * b];
      const BlockQ8A& x1 = xq[2 * b + 1];
      if (kPrefetch) {
        const uintptr_t pf = (uintptr_t)rec + (uintptr_t)kPrefetch * kRec;
        for (int l = 0; l < 6; ++l) _mm_prefetch((const char*)(pf + 64 * l), _MM_HINT_T0);
      }
      const __m512i xv = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)x0.qs)), _mm256_loadu_si256((const __m256i*)x1.qs), 1);
      __m512i alo = _mm512_setzero_si512(), ahi = alo, slo = alo, shi = alo;
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const __m512i w = _mm512_loadu_si512(rec + 32 + 64 * u);
        const __m512i wlo = _mm512_and_si512(w, m4);
        const __m512i whi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
        const __m512i p = _mm512_permutexvar_epi8(k.spread, _mm512_maskz_loadu_epi8(0xFFFFFFull, rec + 288 + 24 * u));
        const __m512i clo = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_lo, p), seven, k.add_lo, 0xEA);
        const __m512i chi = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(k.ctrl_hi, p), seven, k.add_lo, 0xEA);
        const __m512i ilo = _mm512_add_epi8(_mm512_permutexvar_epi8(clo, k.lut), k.base_lo[u]);
        const __m512i ihi = _mm512_add_epi8(_mm512_permutexvar_epi8(chi, k.lut), k.base_hi[u]);
        const __m512i plo = _mm512_permutexvar_epi8(ilo, xv), phi = _mm512_permutexvar_epi8(ihi, xv);
        alo = _mm512_dpbusd_epi32(alo, wlo, plo);
        ahi = _mm512_dpbusd_epi32(ahi, whi, phi);
        slo = _mm512_dpbusd_epi32(slo, ones, plo);
        shi = _mm512_dpbusd_epi32(shi, ones, phi);
      }
      const __m512i rlo = _mm512_sub_epi32(alo, _mm512_slli_epi32(slo, 3));
      const __m512i rhi = _mm512_sub_epi32(ahi, _mm512_slli_epi32(shi, 3));
      const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)rec));
      const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rlo), _mm512_set1_ps(x0.d),
                                       _mm512_mul_ps(_mm512_cvtepi32_ps(rhi), _mm512_set1_ps(x1.d)));
      facc = _mm512_fmadd_ps(dw, v, facc);
    }
    _mm512_storeu_ps(y + 16 * g16, facc);
  }
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

}  // namespace

int main(int argc, char** argv) {
  const int N = argc > 1 ? std::atoi(argv[1]) : 4864, K = argc > 2 ? std::atoi(argv[2]) : 896;
  kPrefetch = argc > 3 ? std::atoi(argv[3]) : 0;
  std::mt19937 rng(1);
  const int nb = K / 64;
  std::vector<int> code((size_t)N * nb * 16), q((size_t)N * nb * 32);
  std::vector<float> d((size_t)N * nb);
  for (auto& c : code) c = (int)(rng() % 6);
  for (auto& v : q) v = (int)(rng() % 16);
  for (auto& v : d) v = fp16_to_fp32(fp32_to_fp16(0.01f + 0.001f * (float)(rng() % 100)));
  // dense f32 weights, and the same as dense Q4_0 (zeros are q = 8, scale per 32 columns = the row's d)
  std::vector<float> w((size_t)N * K, 0.0f);
  std::vector<uint8_t> dense((size_t)N * (K / 32) * 18);
  for (int n = 0; n < N; ++n)
    for (int b = 0; b < nb; ++b) {
      int qq[64];
      for (int c = 0; c < 64; ++c) qq[c] = 8;
      for (int g = 0; g < 16; ++g) {
        const int* pr = kPairs[code[((size_t)n * nb + b) * 16 + g]];
        qq[4 * g + pr[0]] = q[((size_t)n * nb + b) * 32 + 2 * g];
        qq[4 * g + pr[1]] = q[((size_t)n * nb + b) * 32 + 2 * g + 1];
      }
      for (int c = 0; c < 64; ++c) w[(size_t)n * K + 64 * b + c] = d[(size_t)n * nb + b] * (float)(qq[c] - 8);
      for (int h = 0; h < 2; ++h) {
        uint8_t* blk = dense.data() + ((size_t)n * (K / 32) + 2 * b + h) * 18;
        const fp16_t hd = fp32_to_fp16(d[(size_t)n * nb + b]);
        std::memcpy(blk, &hd, 2);
        for (int j = 0; j < 16; ++j) blk[2 + j] = (uint8_t)(qq[32 * h + j] | qq[32 * h + 16 + j] << 4);
      }
    }
  // The sparse values as encode() wants them: value 2g / 2g + 1 = the group's kept ones in order.
  const Sparse s = encode(code, q, d, N, K);
  std::vector<float> x(K);
  for (auto& v : x) v = (float)((int)(rng() % 2001) - 1000) / 500.0f;
  std::vector<BlockQ8A> xq(K / 32);
  const KernelTable& kt = *kernels_by_name("avx512");
  kt.quantize_act(x.data(), xq.data(), K);
  const Consts k = make_consts();
  std::vector<float> ys(N), yd(N), yr(N);
  sparse_matvec(s, xq.data(), ys.data(), k);
  const WeightView dv{DType::Q4_0, N, K, dense.data(), (size_t)(K / 32) * 18, nullptr};
  kernels_by_name("ref")->matmul[(int)DType::Q4_0](dv, x.data(), K, xq.data(), 1, yr.data(), N, 0, N);
  double err = 0, mag = 0;
  for (int n = 0; n < N; ++n) err = std::max(err, (double)std::fabs(ys[n] - yr[n])), mag = std::max(mag, (double)std::fabs(yr[n]));
  std::printf("N=%d K=%d: sparse vs ref dense Q4_0 on the same weights: max |diff| %.3g (max |y| %.3g)\n", N, K, err, mag);
  // dense Q4_0_X16 copy for the production kernel
  std::vector<uint8_t> dx16(dense.size());
  for (int n = 0; n < N; ++n) x16_scatter_row(DType::Q4_0_X16, dense.data() + (size_t)n * (K / 32) * 18, K, n, dx16.data());
  const WeightView dxv{DType::Q4_0_X16, N, K, dx16.data(), (size_t)(K / 32) * 18, nullptr};
  kt.matmul[(int)DType::Q4_0_X16](dxv, x.data(), K, xq.data(), 1, yd.data(), N, 0, N);
  err = 0;
  for (int n = 0; n < N; ++n) err = std::max(err, (double)std::fabs(yd[n] - yr[n]));
  std::printf("dense x16 avx512 vs ref: max |diff| %.3g\n", err);
  // cold timing: rotate over copies larger than the L3
  const size_t sb = s.data.size(), db = dx16.size();
  const int copies = (int)std::max<size_t>(8, (256u << 20) / db);
  std::vector<Sparse> sc(copies, s);
  std::vector<std::vector<uint8_t>> dc(copies, dx16);
  double best_s = 1e9, best_d = 1e9;
  for (int round = 0; round < 7; ++round) {
    double t0 = now();
    for (int c = 0; c < copies; ++c) sparse_matvec(sc[c], xq.data(), ys.data(), k);
    best_s = std::min(best_s, (now() - t0) / copies);
    t0 = now();
    for (int c = 0; c < copies; ++c) {
      const WeightView v{DType::Q4_0_X16, N, K, dc[c].data(), (size_t)(K / 32) * 18, nullptr};
      kt.matmul[(int)DType::Q4_0_X16](v, x.data(), K, xq.data(), 1, yd.data(), N, 0, N);
    }
    best_d = std::min(best_d, (now() - t0) / copies);
  }
  std::printf("one thread, cold: dense Q4_0_X16 %.1f us (%.1f GB/s of %zu B), sparse 2:4 %.1f us (%.1f GB/s of %zu B): "
              "%.2fx\n", best_d * 1e6, db / best_d / 1e9, db, best_s * 1e6, sb / best_s / 1e9, sb, best_d / best_s);
  // hot: one copy, repeated
  best_s = best_d = 1e9;
  for (int round = 0; round < 7; ++round) {
    double t0 = now();
    for (int c = 0; c < 50; ++c) sparse_matvec(s, xq.data(), ys.data(), k);
    best_s = std::min(best_s, (now() - t0) / 50);
    t0 = now();
    for (int c = 0; c < 50; ++c) kt.matmul[(int)DType::Q4_0_X16](dxv, x.data(), K, xq.data(), 1, yd.data(), N, 0, N);
    best_d = std::min(best_d, (now() - t0) / 50);
  }
  std::printf("one thread, hot (L2/L3): dense %.1f us, sparse %.1f us: %.2fx\n", best_d * 1e6, best_s * 1e6, best_d / best_s);
  return 0;
}
