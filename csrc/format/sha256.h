#pragma once
#include <array>
#include <cstddef>
#include <cstdint>

namespace plm {
// FIPS 180-4 SHA-256. Streaming: update() any number of times, then final().
class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t n);
  std::array<uint8_t, 32> final();
 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};
std::array<uint8_t, 32> sha256(const void* data, size_t n);
}  // namespace plm
