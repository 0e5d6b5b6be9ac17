// Session memory that is reserved up front but committed only when touched.
//
// A State reserves its arena, KV cache and scratch for the worst case (max_context,
// max_tokens) in its constructor, so run() never allocates; anonymous mappings are
// zero-filled lazily by the OS, so resident memory grows only with the context a
// session actually uses.
#pragma once
#include <cstddef>
#include <new>
#include <utility>

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

// Per-layer K and V caches, f32, each [max_context][n_kv_heads * head_dim], in one
// lazily committed block: layer l's K at 2*l, its V at 2*l + 1.
class KVCache {
 public:
  KVCache() = default;
  KVCache(int n_layers, int n_kv_heads, int head_dim, int max_context)
      : n_layers_(n_layers),
        row_elems_((size_t)n_kv_heads * (size_t)head_dim),
        layer_elems_(row_elems_ * (size_t)max_context),
        buffer_(2 * (size_t)n_layers * layer_elems_ * sizeof(float)) {}

  int n_layers() const { return n_layers_; }
  size_t row_elems() const { return row_elems_; }     // floats per position
  size_t bytes() const { return buffer_.bytes(); }
  float* k(int layer) const { return buffer_.as<float>() + (2 * (size_t)layer) * layer_elems_; }
  float* v(int layer) const { return buffer_.as<float>() + (2 * (size_t)layer + 1) * layer_elems_; }

 private:
  int n_layers_ = 0;
  size_t row_elems_ = 0, layer_elems_ = 0;
  LazyBuffer buffer_;
};

}  // namespace plm
