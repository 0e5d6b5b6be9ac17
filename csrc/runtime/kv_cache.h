// Session memory that is reserved up front but committed only when touched.
//
// A State reserves its KV cache, and its Program's shared workspace the arena and scratch, for
// the worst case (max_context, max_tokens) when the State is made, so run() never allocates;
// anonymous mappings are zero-filled lazily by the OS, so resident memory grows only with the
// context a session actually uses.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

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

// Per-layer K and V caches, f16 or f32 (elem_bytes 2 or 4), each
// [n_kv_heads][capacity(layer)][head_dim], in one lazily committed block: layer l's K, then its V. Head-major, so that a decode step's
// attention, one task per KV head, reads one contiguous run per head (the cache is cold by
// then, and strided runs of one head's slice of each position read ~40 % slower). A
// full-attention layer holds max_context positions; a sliding-window layer a ring of fewer
// (the executor maps position p to slot p % capacity).
class KVCache {
 public:
  KVCache() = default;
  KVCache(int n_layers, int n_kv_heads, int head_dim, std::vector<int64_t> capacities, size_t elem_bytes)
      : n_layers_(n_layers),
        n_kv_heads_(n_kv_heads),
        head_dim_(head_dim),
        row_elems_((size_t)n_kv_heads * (size_t)head_dim),
        elem_bytes_(elem_bytes),
        capacity_(std::move(capacities)),
        offset_(layer_offsets(capacity_, row_elems_)),
        buffer_(offset_.back() * elem_bytes_) {}

  int n_layers() const { return n_layers_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  size_t row_elems() const { return row_elems_; }     // values per position (all heads)
  size_t elem_bytes() const { return elem_bytes_; }   // 2 (f16) or 4 (f32)
  bool f16() const { return elem_bytes_ == 2; }
  size_t bytes() const { return buffer_.bytes(); }
  int64_t capacity(int layer) const { return capacity_[layer]; }
  const std::vector<int64_t>& capacities() const { return capacity_; }
  uint8_t* k(int layer) const { return buffer_.as<uint8_t>() + offset_[layer] * elem_bytes_; }
  uint8_t* v(int layer) const {
    return buffer_.as<uint8_t>() + (offset_[layer] + (size_t)capacity_[layer] * row_elems_) * elem_bytes_;
  }

  // Slots of a layer that positions [0, n_positions) occupy: a ring wraps at its capacity.
  int64_t used_slots(int layer, int64_t n_positions) const {
    return n_positions < capacity_[layer] ? n_positions : capacity_[layer];
  }

  // Copies the slots positions [0, n_positions) occupy from a cache of the same shape (the caller
  // checks it: State::copy_kv_from). Each head's block is [capacity][head_dim]: before a ring
  // wraps, only the first n_positions slots of each head are read and written, so the pages of a
  // long context that neither cache touched stay uncommitted; a wrapped ring is copied whole.
  void copy_from(const KVCache& src, int64_t n_positions) {
    const size_t head_row = (size_t)head_dim_ * elem_bytes_;
    for (int l = 0; l < n_layers_; ++l) {
      const size_t cap = (size_t)capacity_[l], used = (size_t)used_slots(l, n_positions);
      if (used == 0) continue;
      for (bool values : {false, true}) {  // K, then V
        uint8_t* dst = values ? v(l) : k(l);
        const uint8_t* from = values ? src.v(l) : src.k(l);
        if (used == cap) {
          std::memcpy(dst, from, (size_t)n_kv_heads_ * cap * head_row);
          continue;
        }
        for (size_t h = 0; h < (size_t)n_kv_heads_; ++h)
          std::memcpy(dst + h * cap * head_row, from + h * cap * head_row, used * head_row);
      }
    }
  }

  // The slots positions [0, n_positions) occupy, packed: per layer K then V, per KV head its used
  // slots (head_dim values each), as they are stored (f16 or f32). `out`/`in` hold exactly the
  // State's kv_used_bytes(n_positions) (the caller checks). For session files.
  void pack(int64_t n_positions, uint8_t* out) const { transfer(n_positions, out, true); }
  void unpack(int64_t n_positions, const uint8_t* in) { transfer(n_positions, const_cast<uint8_t*>(in), false); }

 private:
  void transfer(int64_t n_positions, uint8_t* packed, bool to_packed) const {
    const size_t head_row = (size_t)head_dim_ * elem_bytes_;
    for (int l = 0; l < n_layers_; ++l) {
      const size_t cap = (size_t)capacity_[l], used = (size_t)used_slots(l, n_positions);
      for (bool values : {false, true}) {
        uint8_t* block = values ? v(l) : k(l);
        for (size_t h = 0; h < (size_t)n_kv_heads_; ++h, packed += used * head_row) {
          uint8_t* slots = block + h * cap * head_row;
          if (to_packed) std::memcpy(packed, slots, used * head_row);
          else std::memcpy(slots, packed, used * head_row);
        }
      }
    }
  }

  // Start of each layer's K (in values), and the total at the end.
  static std::vector<size_t> layer_offsets(const std::vector<int64_t>& cap, size_t row_elems) {
    std::vector<size_t> off(cap.size() + 1, 0);
    for (size_t l = 0; l < cap.size(); ++l) off[l + 1] = off[l] + 2 * (size_t)cap[l] * row_elems;
    return off;
  }
  int n_layers_ = 0;
  int n_kv_heads_ = 0;
  int head_dim_ = 0;
  size_t row_elems_ = 0;
  size_t elem_bytes_ = 4;
  std::vector<int64_t> capacity_;
  std::vector<size_t> offset_ = {0};
  LazyBuffer buffer_;
};

}  // namespace plm
