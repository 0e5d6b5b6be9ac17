// Limits and checked arithmetic for sizes computed from a program's parameters (which a
// hand-built program, or a hostile bundle past the Python checks, controls): an overflow is an
// error naming the size, never a wrapped value that would size a buffer too small.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

namespace plm {

// Largest row or column count we accept: the kernels take counts as int.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();

[[noreturn]] inline void overflows(int64_t a, const char* op, int64_t b, const std::string& what) {
  throw std::invalid_argument(what + ": " + std::to_string(a) + op + std::to_string(b) + " overflows 64 bits");
}
inline int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) overflows(a, " x ", b, what);
  return r;
}
inline int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) overflows(a, " + ", b, what);
  return r;
}
inline int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what) {
  int64_t r = 1;
  for (int64_t f : factors) r = checked_mul(r, f, what);
  return r;
}

}  // namespace plm
