// Compile-time helpers shared by the x86 matmul kernels (gemm_avx512.cpp, x16_avx512.cpp,
// x16_avx2.cpp). Kept in an unnamed namespace: each file compiles them with its own ISA flags, and
// no instantiation may be shared across them by the linker.
#pragma once
#include <type_traits>

#include "common.h"

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

}  // namespace
}  // namespace plm::kernels
