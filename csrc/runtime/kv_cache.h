// Session memory that is reserved up front but committed only when touched.
//
// A State reserves its KV cache, and its Program's shared workspace the arena and scratch, for
// the worst case (max_context, max_tokens) when the State is made, so run() never allocates;
// anonymous mappings are zero-filled lazily by the OS, so resident memory grows only with the
// context a session actually uses.
#pragma once
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "common.h"

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#define PLM_HAVE_MMAP 1
#endif

namespace plm {

// A 64-byte aligned (page-aligned with mmap) block of untouched memory.
class LazyBuffer {
 public:
  LazyBuffer() = default;
  explicit LazyBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
#ifdef PLM_HAVE_MMAP
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    data_ = p;
#else
    data_ = ::operator new(bytes, std::align_val_t(64));
#endif
  }
  ~LazyBuffer() { release(); }
  LazyBuffer(LazyBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), bytes_(o.bytes_) {}
  LazyBuffer& operator=(LazyBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = o.bytes_;
    }
    return *this;
  }
  LazyBuffer(const LazyBuffer&) = delete;
  LazyBuffer& operator=(const LazyBuffer&) = delete;

  template <class T>
  T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  void release() {
    if (!data_) return;
#ifdef PLM_HAVE_MMAP
    munmap(data_, bytes_);
#else
    ::operator delete(data_, std::align_val_t(64));
#endif
    data_ = nullptr;
  }
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// The element type of a KV cache. Q8_0: each head's row of head_dim values is head_dim / 32 blocks
// of GGUF's Q8_0, {f16 d; int8 q[32]}, x = d * q (34 bytes per 32 values: 0.53x of f16).
enum class KVType : int { F32 = 0, F16 = 1, Q8_0 = 2 };

inline const char* kv_type_name(KVType t) { return t == KVType::F32 ? "f32" : t == KVType::F16 ? "f16" : "q8_0"; }

// Bytes of one head's row of head_dim values (head_dim % 32 == 0 for Q8_0).
inline size_t kv_row_bytes(KVType t, int64_t head_dim) {
  switch (t) {
    case KVType::F32: return (size_t)head_dim * 4;
    case KVType::F16: return (size_t)head_dim * 2;
    case KVType::Q8_0: return (size_t)head_dim / 32 * 34;
  }
  return 0;
}

// n floats (a multiple of 32) as Q8_0 blocks, exactly as pocketlm.quant quantizes Q8_0 weights:
// d = f16(max|x| / 127), q = clamp(round-half-even(x * (1 / d)), -127, 127) with that f16-rounded d
// (the value attention will multiply by); an all-zero block has d = 0, q = 0.
inline void kv_quantize_q8_0(const float* x, uint8_t* out, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32, out += 34) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const fp16_t h = fp32_to_fp16(amax / 127.f);
    const float d = fp16_to_fp32(h), id = d != 0.f ? 1.f / d : 0.f;
    std::memcpy(out, &h, 2);
    for (int i = 0; i < 32; ++i)
      out[2 + i] = (uint8_t)(int8_t)std::clamp(std::nearbyint(x[i] * id), -127.f, 127.f);
  }
}

// A Q8_0 cache stores each key rotated by a normalized Walsh-Hadamard transform H (Sylvester order,
// over blocks of the largest power of two, at most 256, that divides head_dim): H spreads a few outlier
// channels (Qwen2's keys have them) over the whole block, so one block scale no longer rounds the other
// values away (mean KL divergence on Qwen2.5-Coder-0.5B 4x lower). H is orthonormal and symmetric, so
// q . k = (H q) . (H k): attention rotates its queries alike, and H undoes itself.
inline int kv_hadamard_block(int64_t head_dim) {
  int b = 1;
  while (b < 256 && head_dim % (2 * b) == 0) b *= 2;
  return b;
}
inline void kv_hadamard(float* x, int64_t n, int block) {
  const float norm = 1.f / std::sqrt((float)block);
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    float* v = x + b0;
    for (int len = 1; len < block; len *= 2)
      for (int i = 0; i < block; i += 2 * len)
        for (int j = i; j < i + len; ++j) {
          const float a = v[j], c = v[j + len];
          v[j] = a + c;
          v[j + len] = a - c;
        }
    for (int i = 0; i < block; ++i) v[i] *= norm;
  }
}

inline void kv_dequantize_q8_0(const uint8_t* in, float* x, int64_t n) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32, in += 34) {
    fp16_t h;
    std::memcpy(&h, in, 2);
    const float d = fp16_to_fp32(h);
    for (int i = 0; i < 32; ++i) x[i] = d * (float)(int8_t)in[2 + i];
  }
}

// The element type of layer `layer`'s keys in a cache of type t: t, but the first layer's keys stay
// f16 in a Q8_0 cache. Quantizing them alone gave most of the KL divergence of quantizing every
// layer's keys on Qwen2.5-Coder-0.5B (~1e-3 of 1e-3 in a 540-token probe; the next layer 1.8e-4), for
// 1/48 of the cache (docs/performance.md, "Conversations that last").
inline KVType kv_key_type(KVType t, int layer) { return t == KVType::Q8_0 && layer == 0 ? KVType::F16 : t; }

// Per-layer K and V caches, each [n_kv_heads][capacity(layer)][head_dim] rows of their element type
// (kv_key_type for keys, the cache's type for values), in one lazily committed block: layer l's K,
// then its V. Head-major, so that a decode step's attention, one task per KV head, reads one
// contiguous run per head (the cache is cold by then, and strided runs of one head's slice of each
// position read ~40 % slower). A full-attention layer holds max_context positions; a sliding-window
// layer a ring of fewer (the executor maps position p to slot p % capacity).
class KVCache {
 public:
  KVCache() = default;
  KVCache(int n_layers, int n_kv_heads, int head_dim, std::vector<int64_t> capacities, KVType type)
      : n_layers_(n_layers),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        type_(type),
        capacity_(std::move(capacities)) {
    offset_.assign((size_t)n_layers + 1, 0);
    for (int l = 0; l < n_layers; ++l)
      offset_[(size_t)l + 1] = offset_[(size_t)l] + (size_t)capacity_[(size_t)l] * (size_t)n_kv_heads *
                                                        (key_row_bytes(l) + value_row_bytes());
    buffer_ = LazyBuffer(offset_.back());
  }

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  KVType type() const { return type_; }  // what the cache was made as ("q8_0": see kv_key_type)
  KVType key_type(int layer) const { return kv_key_type(type_, layer); }
  KVType value_type() const { return type_; }
  size_t key_row_bytes(int layer) const { return kv_row_bytes(key_type(layer), head_dim_); }  // one head's row
  size_t value_row_bytes() const { return kv_row_bytes(type_, head_dim_); }
  // Bytes of one position of a layer, K and V of every KV head.
  size_t position_bytes(int layer) const { return (size_t)n_kv_heads_ * (key_row_bytes(layer) + value_row_bytes()); }
  size_t bytes() const { return buffer_.bytes(); }
  int64_t capacity(int layer) const { return capacity_[layer]; }
  const std::vector<int64_t>& capacities() const { return capacity_; }
  uint8_t* k(int layer) const { return buffer_.as<uint8_t>() + offset_[layer]; }
  uint8_t* v(int layer) const {
    return k(layer) + (size_t)capacity_[layer] * n_kv_heads_ * key_row_bytes(layer);
  }

  // Slots of a layer that positions [0, n_positions) occupy: a ring wraps at its capacity.
  int64_t used_slots(int layer, int64_t n_positions) const {
    return n_positions < capacity_[layer] ? n_positions : capacity_[layer];
  }

  // A key of `layer` as attention sees it (float; a Q8_0 row is stored as H k, kv_hadamard), and back
  // (rounded to its type; x is overwritten).
  bool rotated_keys(int layer) const { return key_type(layer) == KVType::Q8_0; }
  void load_key(int layer, const uint8_t* row, float* x) const {
    load_row(key_type(layer), row, x);
    if (rotated_keys(layer)) kv_hadamard(x, head_dim_, kv_hadamard_block(head_dim_));
  }
  void store_key(int layer, float* x, uint8_t* row) const {
    if (rotated_keys(layer)) kv_hadamard(x, head_dim_, kv_hadamard_block(head_dim_));
    store_row(key_type(layer), x, row);
  }
  void store_value(const float* x, uint8_t* row) const { store_row(type_, x, row); }

  // Copies the slots positions [0, n_positions) occupy from a cache of the same shape (the caller
  // checks it: State::copy_kv_from). Each head's block is [capacity][head_dim]: before a ring
  // wraps, only the first n_positions slots of each head are read and written, so the pages of a
  // long context that neither cache touched stay uncommitted; a wrapped ring is copied whole.
  void copy_from(const KVCache& src, int64_t n_positions) {
    for (int l = 0; l < n_layers_; ++l) {
      const size_t cap = (size_t)capacity_[l], used = (size_t)used_slots(l, n_positions);
      if (used == 0) continue;
      for (bool values : {false, true}) {  // K, then V
        const size_t rb = values ? value_row_bytes() : key_row_bytes(l);
        uint8_t* dst = values ? v(l) : k(l);
        const uint8_t* from = values ? src.v(l) : src.k(l);
        if (used == cap) {
          std::memcpy(dst, from, (size_t)n_kv_heads_ * cap * rb);
          continue;
        }
        for (size_t h = 0; h < (size_t)n_kv_heads_; ++h)
          std::memcpy(dst + h * cap * rb, from + h * cap * rb, used * rb);
      }
    }
  }

  // The slots positions [0, n_positions) occupy, packed: per layer K then V, per KV head its used
  // slots (one row of head_dim values each), as they are stored (f16, f32 or Q8_0 blocks). `out`/`in`
  // hold exactly the State's kv_used_bytes(n_positions) (the caller checks). For session files.
  void pack(int64_t n_positions, uint8_t* out) const { transfer(n_positions, out, true); }
  void unpack(int64_t n_positions, const uint8_t* in) { transfer(n_positions, const_cast<uint8_t*>(in), false); }

  // Positions [p0, p1) of a cache whose every layer holds a slot per position up to p1 (the caller
  // checks), packed as pack() packs [0, n): per layer K then V, per KV head rows p0..p1-1. The prefix
  // cache's blocks (pocketlm.prefix_cache).
  void pack_range(int64_t p0, int64_t p1, uint8_t* out) const { transfer_range(p0, p1, out, true); }
  void unpack_range(int64_t p0, int64_t p1, const uint8_t* in) {
    transfer_range(p0, p1, const_cast<uint8_t*>(in), false);
  }

 private:
  static void load_row(KVType t, const uint8_t* row, float* x, int64_t n) {
    if (t == KVType::F32) std::memcpy(x, row, (size_t)n * 4);
    else if (t == KVType::F16)
      for (int64_t i = 0; i < n; ++i) x[i] = fp16_to_fp32(reinterpret_cast<const fp16_t*>(row)[i]);
    else kv_dequantize_q8_0(row, x, n);
  }
  void load_row(KVType t, const uint8_t* row, float* x) const { load_row(t, row, x, head_dim_); }
  void store_row(KVType t, const float* x, uint8_t* row) const {
    if (t == KVType::F32) std::memcpy(row, x, (size_t)head_dim_ * 4);
    else if (t == KVType::F16)
      for (int i = 0; i < head_dim_; ++i) reinterpret_cast<fp16_t*>(row)[i] = fp32_to_fp16(x[i]);
    else kv_quantize_q8_0(x, row, head_dim_);
  }
  void transfer(int64_t n_positions, uint8_t* packed, bool to_packed) const {
    for (int l = 0; l < n_layers_; ++l) {
      const size_t cap = (size_t)capacity_[l], used = (size_t)used_slots(l, n_positions);
      for (bool values : {false, true}) {
        const size_t rb = values ? value_row_bytes() : key_row_bytes(l);
        uint8_t* block = values ? v(l) : k(l);
        for (size_t h = 0; h < (size_t)n_kv_heads_; ++h, packed += used * rb) {
          uint8_t* slots = block + h * cap * rb;
          if (to_packed) std::memcpy(packed, slots, used * rb);
          else std::memcpy(slots, packed, used * rb);
        }
      }
    }
  }

  void transfer_range(int64_t p0, int64_t p1, uint8_t* packed, bool to_packed) const {
    const size_t n = (size_t)(p1 - p0);
    for (int l = 0; l < n_layers_; ++l) {
      const size_t cap = (size_t)capacity_[l];
      for (bool values : {false, true}) {
        const size_t rb = values ? value_row_bytes() : key_row_bytes(l);
        uint8_t* block = values ? v(l) : k(l);
        for (size_t h = 0; h < (size_t)n_kv_heads_; ++h, packed += n * rb) {
          uint8_t* slots = block + (h * cap + (size_t)p0) * rb;
          if (to_packed) std::memcpy(packed, slots, n * rb);
          else std::memcpy(slots, packed, n * rb);
        }
      }
    }
  }

  int n_layers_ = 0;
  int n_kv_heads_ = 0;
  int head_dim_ = 0;
  KVType type_ = KVType::F32;
  std::vector<int64_t> capacity_;
  std::vector<size_t> offset_ = {0};  // start of each layer's K (bytes), and the total at the end
  LazyBuffer buffer_;
};

}  // namespace plm
