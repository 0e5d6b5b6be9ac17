// Helpers shared by the x86 matmul kernels (gemm_avx512.cpp, gemm_avx2.cpp, x16_avx512.cpp,
// x16_avx2.cpp); AVX2 at most. Kept in an unnamed namespace: each file compiles them with its own ISA flags, and
// no instantiation may be shared across them by the linker.
#pragma once
#include <immintrin.h>

#include <type_traits>

#include "common.h"
#include "kernels/kernels.h"

namespace plm::kernels {
namespace {

// f(std::integral_constant<int, rt>) for a tile of 1 <= rt <= N tokens.
template <int N, class Fn>
inline void with_tile(int rt, Fn&& f) {
  if constexpr (N > 1) {
    if (rt < N) {
      with_tile<N - 1>(rt, f);
      return;
    }
  }
  f(std::integral_constant<int, N>{});
}

// How the x16 kernels walk a record of type T (layout in common.h, field sizes from x16_block):
// kFields f16 header fields of 32 bytes (d, then m when kAsym), then for Q5 the u32 qh field of
// 64 bytes at kQh; the code units start at kCodes. kRuns: 32-runs per record (2/4 for the
// group-64/128 Q4 types, whose run r is the 4 units at kCodes + 256 r, each shaped as a
// Q4_0_X16/Q4_1_X16 record's codes and sharing the record's header).
template <DType T>
struct X16Layout {
  static constexpr bool kQ5 = T == DType::Q5_0_X16 || T == DType::Q5_1_X16;
  static constexpr bool kQ4_0 = T == DType::Q4_0_X16 || T == DType::Q4_0_G64_X16 || T == DType::Q4_0_G128_X16;
  static constexpr bool kQ4_1 = T == DType::Q4_1_X16 || T == DType::Q4_1_G64_X16 || T == DType::Q4_1_G128_X16;
  static constexpr bool kQ4 = kQ4_0 || kQ4_1 || kQ5;             // nibble codes
  static constexpr bool kAsym = kQ4_1 || T == DType::Q5_1_X16;  // d and m
  static constexpr bool kRowScale = T == DType::I8_X16;
  static constexpr int kRuns = kDTypeTraits[(int)T].block_elems / 32;
  static constexpr int kRecord = 16 * kDTypeTraits[(int)T].block_bytes;
  static constexpr X16Block kBlock = x16_block(T);
  static constexpr int kFields = kBlock.n_fields - (kQ5 ? 1 : 0);
  static constexpr int kQh = 32 * kFields;
  static constexpr int kCodes = 16 * (kBlock.field_bytes[0] + kBlock.field_bytes[1] + kBlock.field_bytes[2]);
};
static_assert(X16Layout<DType::Q5_1_X16>::kQh == 64 && X16Layout<DType::Q5_1_X16>::kCodes == 128 &&
              X16Layout<DType::Q5_0_X16>::kQh == 32 && X16Layout<DType::Q5_0_X16>::kCodes == 96 &&
              X16Layout<DType::Q4_1_G128_X16>::kCodes == 64 && X16Layout<DType::Q8_0_X16>::kCodes == 32 &&
              X16Layout<DType::I8_X16>::kCodes == 0 && X16Layout<DType::I8_X16>::kFields == 0,
              "x16 record offsets (common.h)");

// f(std::integral_constant<DType, t>) for the x16 weight type t.
template <class Fn>
inline void x16_dispatch(DType t, Fn&& f) {
  using D = DType;
  switch (t) {
    case D::Q8_0_X16: f(std::integral_constant<D, D::Q8_0_X16>{}); break;
    case D::Q4_0_X16: f(std::integral_constant<D, D::Q4_0_X16>{}); break;
    case D::Q4_1_X16: f(std::integral_constant<D, D::Q4_1_X16>{}); break;
    case D::I8_X16: f(std::integral_constant<D, D::I8_X16>{}); break;
    case D::Q5_0_X16: f(std::integral_constant<D, D::Q5_0_X16>{}); break;
    case D::Q5_1_X16: f(std::integral_constant<D, D::Q5_1_X16>{}); break;
    case D::Q4_0_G64_X16: f(std::integral_constant<D, D::Q4_0_G64_X16>{}); break;
    case D::Q4_0_G128_X16: f(std::integral_constant<D, D::Q4_0_G128_X16>{}); break;
    case D::Q4_1_G64_X16: f(std::integral_constant<D, D::Q4_1_G64_X16>{}); break;
    case D::Q4_1_G128_X16: f(std::integral_constant<D, D::Q4_1_G128_X16>{}); break;
    default: throw UnsupportedError("matmul_x16: not an x16 type");
  }
}

// Q6_K's code bias for the GEMMs (gemm_avx512.cpp, gemm_avx2.cpp): -32 x the code sum of each
// 16-element half of every activation run, per level: out[((t * nruns + run) * L + level) * 2 + half].
template <class Block>
void half_bias(const Block* xq, int T, int nruns, int32_t* out) {
  constexpr bool kTwo = std::is_same_v<Block, BlockQ8A2>;
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  auto sums = [&](const int8_t* q, int32_t* o) {  // sad of q + 128 against 0, minus 128 x 16
    const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), flip);
    const __m256i sad = _mm256_sad_epu8(u, _mm256_setzero_si256());  // 4 sums of 8 bytes
    alignas(32) int64_t v[4];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), sad);
    o[0] = -32 * (int32_t)(v[0] + v[1] - 128 * 16);
    o[1] = -32 * (int32_t)(v[2] + v[3] - 128 * 16);
  };
  for (size_t i = 0; i < (size_t)T * nruns; ++i) {
    sums(xq[i].qs, out + i * (kTwo ? 4 : 2));
    if constexpr (kTwo) sums(xq[i].qs2, out + i * 4 + 2);
  }
}

}  // namespace
}  // namespace plm::kernels
