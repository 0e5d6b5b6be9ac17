// Bounds-checked, mmap-backed reader for .plm bundles (docs/format.md).
// Every offset and size read from the file is validated before use; a damaged or
// hostile file raises BundleError with the reason and never causes a read outside
// the mapping.
#pragma once
#include <array>
#include <memory>
#include <string>
#include <vector>
#include "common.h"

namespace plm {

class Bundle {
 public:
  struct Tensor {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    int64_t rows, cols;           // rows = prod(shape[:-1]), cols = shape[-1]
    const uint8_t* data;          // inside the mapping
    uint64_t offset, nbytes;      // offset relative to the data section
    std::array<uint8_t, 32> sha256;
  };

  // Opens, maps and validates header, sections, metadata and index checksums.
  static std::shared_ptr<Bundle> open(const std::string& path);
  ~Bundle();
  Bundle(const Bundle&) = delete;
  Bundle& operator=(const Bundle&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t file_bytes() const { return size_; }
  const std::string& metadata_json() const { return meta_; }
  const std::vector<Tensor>& tensors() const { return tensors_; }
  const Tensor* find(const std::string& name) const;   // nullptr if absent
  // Hashes the data section and every tensor; returns problems found (empty: intact).
  std::vector<std::string> verify() const;

 private:
  Bundle() = default;
  std::string path_;
  uint32_t version_ = 0;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0, data_bytes_ = 0;
  std::array<uint8_t, 32> data_sha_{};
  std::string meta_;
  std::vector<Tensor> tensors_;
};

}  // namespace plm
