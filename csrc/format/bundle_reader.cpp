// Reader for .plm bundles (docs/format.md). The file is mapped read-only and every number
// read from it is treated as hostile: all offset/size arithmetic is overflow-checked and every
// read goes through a bounds check against the mapping or the section it belongs to.
#include "format/bundle_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>
#include <unordered_set>

#include "format/sha256.h"

namespace plm {
namespace {

constexpr char kMagic[8] = {'P', 'O', 'C', 'K', 'E', 'T', 'L', 'M'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint64_t kHeaderBytes = 256;
constexpr uint64_t kHeaderHashedBytes = 168;  // the header checksum covers [0, 168)
constexpr uint64_t kHeaderReservedFrom = 200;  // [200, 256) must be zero
constexpr uint64_t kDataAlign = 4096;
constexpr uint64_t kTensorAlign = 64;
constexpr uint32_t kMaxNameBytes = 1024;
constexpr uint32_t kMaxDims = 4;
// Metadata is parsed into Python objects: bounded before it is copied (as MAX_METADATA_BYTES in
// python/pocketlm/metadata.py, which says why 64 MiB).
constexpr uint64_t kMaxMetadataBytes = uint64_t(64) << 20;
// Smallest index entry: name_len, 1-byte name, dtype, ndim, one dim, offset, nbytes, sha256.
constexpr uint64_t kMinEntryBytes = 2 + 1 + 4 + 4 + 8 + 8 + 8 + 32;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw BundleError(path + ": " + what);
}

uint16_t load_le16(const uint8_t* p) { return (uint16_t)(p[0] | p[1] << 8); }
uint32_t load_le32(const uint8_t* p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
uint64_t load_le64(const uint8_t* p) { return (uint64_t)load_le32(p) | (uint64_t)load_le32(p + 4) << 32; }

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

std::string quoted(const std::string& s) { return "'" + s + "'"; }

// Strict UTF-8 (RFC 3629): no overlongs, no surrogates, nothing above U+10FFFF.
bool is_valid_utf8(const uint8_t* p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t c = p[i];
    if (c < 0x80) { ++i; continue; }
    size_t len;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) { len = 2; cp = c & 0x1f; }
    else if ((c & 0xf0) == 0xe0) { len = 3; cp = c & 0x0f; }
    else if ((c & 0xf8) == 0xf0) { len = 4; cp = c & 0x07; }
    else return false;
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) return false;
      cp = cp << 6 | (p[i + k] & 0x3f);
    }
    static constexpr uint32_t kMinForLen[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLen[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    i += len;
  }
  return true;
}

bool all_zero(const uint8_t* p, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

// Sequential reader over one section; every read is checked against the section end.
class Cursor {
 public:
  Cursor(const uint8_t* begin, uint64_t size) : p_(begin), size_(size) {}
  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }
  bool read(void* out, uint64_t n) {
    if (n > remaining()) return false;
    std::memcpy(out, p_ + pos_, n);
    pos_ += n;
    return true;
  }
  bool u16(uint16_t* v) { uint8_t b[2]; if (!read(b, 2)) return false; *v = load_le16(b); return true; }
  bool u32(uint32_t* v) { uint8_t b[4]; if (!read(b, 4)) return false; *v = load_le32(b); return true; }
  bool u64(uint64_t* v) { uint8_t b[8]; if (!read(b, 8)) return false; *v = load_le64(b); return true; }
  const uint8_t* take(uint64_t n) {  // pointer to the next n bytes, or nullptr
    if (n > remaining()) return nullptr;
    const uint8_t* q = p_ + pos_;
    pos_ += n;
    return q;
  }

 private:
  const uint8_t* p_;
  uint64_t size_, pos_ = 0;
};

struct Section {
  const char* name;
  uint64_t offset, bytes;
};

bool sha_matches(const uint8_t* p, uint64_t n, const uint8_t* expected) {
  const std::array<uint8_t, 32> got = sha256(p, (size_t)n);
  return std::memcmp(got.data(), expected, 32) == 0;
}

}  // namespace

std::shared_ptr<Bundle> Bundle::open(const std::string& path) {
  // O_NONBLOCK so that opening a FIFO cannot hang; regular files ignore it.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) fail(path, "no such file");
    if (err == EACCES) fail(path, "permission denied");
    fail(path, std::string("cannot open: ") + std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail(path, std::string("cannot stat: ") + std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) { ::close(fd); fail(path, "is a directory, not a .plm bundle"); }
  if (!S_ISREG(st.st_mode)) { ::close(fd); fail(path, "not a regular file"); }
  if (st.st_size <= 0) { ::close(fd); fail(path, "empty file, not a .plm bundle"); }
  const uint64_t size = (uint64_t)st.st_size;
  if (size > (uint64_t)SIZE_MAX) { ::close(fd); fail(path, "file too large to map"); }
  void* map = ::mmap(nullptr, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) fail(path, std::string("cannot mmap: ") + std::strerror(map_err));

  // From here on the destructor unmaps, including when validation throws.
  std::shared_ptr<Bundle> b(new Bundle());
  b->path_ = path;
  b->base_ = static_cast<const uint8_t*>(map);
  b->size_ = size;
  const uint8_t* base = b->base_;

  // ---- header ----
  if (size < sizeof(kMagic) && std::memcmp(base, kMagic, (size_t)size) == 0)
    fail(path, "truncated: file has " + std::to_string(size) + " bytes, less than the " +
                   std::to_string(kHeaderBytes) + "-byte header");
  if (size < sizeof(kMagic) || std::memcmp(base, kMagic, sizeof(kMagic)) != 0) {
    if (size >= 4 && std::memcmp(base, "GGUF", 4) == 0)
      fail(path, "this is a GGUF file, not a .plm bundle; convert it first with `pocketlm convert`");
    fail(path, "not a .plm bundle (bad magic); convert the model first with `pocketlm convert`");
  }
  if (size < kHeaderBytes)
    fail(path, "truncated: file has " + std::to_string(size) + " bytes, less than the " +
                   std::to_string(kHeaderBytes) + "-byte header");
  const uint32_t version = load_le32(base + 8);
  if (version > kFormatVersion)
    fail(path, "made by a newer pocketlm (format version " + std::to_string(version) +
                   ", this build reads version " + std::to_string(kFormatVersion) +
                   "); upgrade pocketlm");
  if (version != kFormatVersion) fail(path, "unsupported format version " + std::to_string(version));
  b->version_ = version;
  const uint32_t header_size = load_le32(base + 12);
  if (header_size != kHeaderBytes)
    fail(path, "bad header size " + std::to_string(header_size) + " (expected 256)");
  if (!sha_matches(base, kHeaderHashedBytes, base + 168))
    fail(path, "header checksum mismatch (the file is corrupt)");
  if (!all_zero(base + kHeaderReservedFrom, kHeaderBytes - kHeaderReservedFrom))
    fail(path, "reserved header bytes [200, 256) are not zero");

  const uint64_t declared_size = load_le64(base + 16);
  if (declared_size > size)
    fail(path, "truncated: expected " + std::to_string(declared_size) + " bytes, file has " +
                   std::to_string(size));
  if (declared_size < size)
    fail(path, "file has " + std::to_string(size) + " bytes but its header says " +
                   std::to_string(declared_size) + " (trailing data?)");

  // ---- sections ----
  Section sections[3] = {
      {"metadata", load_le64(base + 24), load_le64(base + 32)},
      {"index", load_le64(base + 40), load_le64(base + 48)},
      {"data", load_le64(base + 56), load_le64(base + 64)},
  };
  for (const Section& s : sections) {
    uint64_t end;
    if (!checked_add(s.offset, s.bytes, &end) || end > size)
      fail(path, std::string(s.name) + " section [" + std::to_string(s.offset) + ", +" +
                     std::to_string(s.bytes) + ") lies outside the file (" + std::to_string(size) +
                     " bytes)");
    if (s.offset < kHeaderBytes)
      fail(path, std::string(s.name) + " section at offset " + std::to_string(s.offset) +
                     " overlaps the header");
  }
  const Section& meta = sections[0];
  const Section& index = sections[1];
  const Section& data = sections[2];
  if (meta.bytes < 2) fail(path, "metadata section is too small to hold a JSON object");
  if (meta.bytes > kMaxMetadataBytes)
    fail(path, "metadata section is " + std::to_string(meta.bytes) + " bytes, more than the " +
                   std::to_string(kMaxMetadataBytes) + " allowed");
  if (index.bytes < 4) fail(path, "index section is too small to hold the tensor count");
  if (data.offset % kDataAlign != 0)
    fail(path, "data section offset " + std::to_string(data.offset) + " is not a multiple of 4096");
  // Non-overlap, and zero padding outside the sections (padding is covered by no checksum).
  {
    Section sorted[3] = {sections[0], sections[1], sections[2]};
    std::sort(sorted, sorted + 3, [](const Section& x, const Section& y) { return x.offset < y.offset; });
    uint64_t covered_to = kHeaderBytes;
    for (int i = 0; i < 3; ++i) {
      const Section& s = sorted[i];
      if (s.offset < covered_to && s.bytes > 0) {
        fail(path, std::string(s.name) + " section overlaps the " + (i ? sorted[i - 1].name : "header") +
                       " section");
      }
      if (s.offset > covered_to && !all_zero(base + covered_to, s.offset - covered_to))
        fail(path, "padding before the " + std::string(s.name) + " section is not zero");
      covered_to = std::max(covered_to, s.offset + s.bytes);
    }
    if (covered_to < size && !all_zero(base + covered_to, size - covered_to))
      fail(path, "bytes after the last section are not zero");
  }

  if (!sha_matches(base + meta.offset, meta.bytes, base + 72))
    fail(path, "metadata checksum mismatch (the file is corrupt)");
  if (!sha_matches(base + index.offset, index.bytes, base + 104))
    fail(path, "index checksum mismatch (the file is corrupt)");
  std::memcpy(b->data_sha_.data(), base + 136, 32);
  b->data_offset_ = data.offset;
  b->data_bytes_ = data.bytes;

  // ---- metadata: UTF-8 here; JSON is parsed in Python ----
  if (!is_valid_utf8(base + meta.offset, meta.bytes)) fail(path, "metadata is not valid UTF-8");
  b->meta_.assign(reinterpret_cast<const char*>(base + meta.offset), meta.bytes);

  // ---- index ----
  Cursor cur(base + index.offset, index.bytes);
  uint32_t n_tensors = 0;
  cur.u32(&n_tensors);  // index.bytes >= 4 was checked
  if ((uint64_t)n_tensors > cur.remaining() / kMinEntryBytes)
    fail(path, "index claims " + std::to_string(n_tensors) + " tensors but has room for at most " +
                   std::to_string(cur.remaining() / kMinEntryBytes));
  b->tensors_.reserve(n_tensors);
  std::unordered_set<std::string> names;
  for (uint32_t i = 0; i < n_tensors; ++i) {
    std::string where = "index entry " + std::to_string(i);
    auto short_read = [&](const char* field) {
      fail(path, where + ": index ends inside the " + std::string(field) + " field");
    };
    uint16_t name_len = 0;
    if (!cur.u16(&name_len)) short_read("name_len");
    if (name_len < 1 || name_len > kMaxNameBytes)
      fail(path, where + ": name length " + std::to_string(name_len) + " is not in 1..1024");
    const uint8_t* name_ptr = cur.take(name_len);
    if (!name_ptr) short_read("name");
    if (!is_valid_utf8(name_ptr, name_len)) fail(path, where + ": tensor name is not valid UTF-8");
    Tensor t;
    t.name.assign(reinterpret_cast<const char*>(name_ptr), name_len);
    where = "tensor " + quoted(t.name);
    if (!names.insert(t.name).second) fail(path, where + ": duplicate tensor name");

    uint32_t dtype = 0, ndim = 0;
    if (!cur.u32(&dtype)) short_read("dtype");
    if (!dtype_valid(dtype)) fail(path, where + ": unknown tensor type id " + std::to_string(dtype));
    t.dtype = (DType)dtype;
    if (!cur.u32(&ndim)) short_read("ndim");
    if (ndim < 1 || ndim > kMaxDims)
      fail(path, where + ": ndim " + std::to_string(ndim) + " is not in 1..4");
    uint64_t rows = 1;
    for (uint32_t d = 0; d < ndim; ++d) {
      uint64_t dim = 0;
      if (!cur.u64(&dim)) short_read("shape");
      if (dim < 1 || dim > (uint64_t)INT64_MAX)
        fail(path, where + ": dimension " + std::to_string(d) + " has invalid size " + std::to_string(dim));
      t.shape.push_back((int64_t)dim);
      if (d + 1 < ndim && (!checked_mul(rows, dim, &rows) || rows > (uint64_t)INT64_MAX))
        fail(path, where + ": shape overflows");
    }
    const uint64_t cols = (uint64_t)t.shape.back();
    t.rows = (int64_t)rows;
    t.cols = (int64_t)cols;
    const DTypeTraits& tr = traits(t.dtype);
    if (cols % (uint64_t)tr.block_elems != 0)
      fail(path, where + ": " + tr.name + " needs the last dimension to be a multiple of " +
                     std::to_string(tr.block_elems) + ", got " + std::to_string(cols));
    // Same formula as plm::tensor_bytes(), with every step overflow-checked.
    uint64_t row_bytes = 0, expected = 0;
    bool ok = checked_mul(cols / (uint64_t)tr.block_elems, (uint64_t)tr.block_bytes, &row_bytes) &&
              checked_mul(rows, row_bytes, &expected);
    if (needs_16_rows(t.dtype) && (rows % kX16Rows != 0 || ndim != 2))
      fail(path, where + ": " + tr.name + " needs a 2-D shape with rows a multiple of 16, got " +
                     std::to_string(rows) + " rows");
    if (is_variable(t.dtype) && ndim != 2) fail(path, where + ": " + tr.name + " needs a 2-D shape");
    if (ok && has_row_scales(t.dtype)) {
      uint64_t scales = 0;
      ok = checked_mul(rows, sizeof(float), &scales) && checked_add(expected, scales, &expected);
    }
    if (!ok) fail(path, where + ": tensor size overflows");

    if (!cur.u64(&t.offset)) short_read("offset");
    if (!cur.u64(&t.nbytes)) short_read("nbytes");
    if (!cur.read(t.sha256.data(), 32)) short_read("sha256");
    if (t.offset % kTensorAlign != 0)
      fail(path, where + ": offset " + std::to_string(t.offset) + " is not a multiple of 64");
    if (t.nbytes != expected && !is_variable(t.dtype))  // a variable type's layout is checked below
      fail(path, where + ": nbytes " + std::to_string(t.nbytes) + " does not match " + tr.name +
                     " shape (expected " + std::to_string(expected) + ")");
    if (t.offset > data.bytes || t.nbytes > data.bytes - t.offset)
      fail(path, where + ": bytes [" + std::to_string(t.offset) + ", +" + std::to_string(t.nbytes) +
                     ") lie outside the data section (" + std::to_string(data.bytes) + " bytes)");
    t.data = base + data.offset + t.offset;
    if (is_sparse24(t.dtype)) {  // a pattern code past the six 2:4 patterns
      const int64_t bad = sparse24_bad_pattern(t.dtype, t.data, t.rows, t.cols);
      if (bad >= 0)
        fail(path, where + ": invalid 2:4 pattern code at byte " + std::to_string(bad) + " of the tensor");
    }
    if (t.dtype == DType::I8_BITMASK) {  // row pointers in order and in range, each row its masks' values
      std::string why;
      if (bitmask_check(t.data, t.nbytes, t.rows, t.cols, &why) < 0) fail(path, where + ": bad i8_bitmask tensor: " + why);
    }
    b->tensors_.push_back(std::move(t));
  }
  if (cur.remaining() != 0)
    fail(path, "index has " + std::to_string(cur.remaining()) + " trailing bytes after the last tensor");

  // Tensors may not overlap: sort by offset and compare neighbours.
  std::vector<const Tensor*> by_offset;
  by_offset.reserve(b->tensors_.size());
  for (const Tensor& t : b->tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Tensor* x, const Tensor* y) { return x->offset < y->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const Tensor* prev = by_offset[i - 1];
    if (prev->offset + prev->nbytes > by_offset[i]->offset)  // no overflow: both inside data
      fail(path, "tensor " + quoted(by_offset[i]->name) + " overlaps tensor " + quoted(prev->name));
  }
  return b;
}

Bundle::~Bundle() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), (size_t)size_);
}

const Bundle::Tensor* Bundle::find(const std::string& name) const {
  for (const Tensor& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<std::string> Bundle::verify() const {
  // The whole-section hash and the per-tensor hashes cover the same bytes; run them on two
  // threads so that verification costs one pass of wall time.
  std::array<uint8_t, 32> section_sha{};
  std::thread section_thread([&] { section_sha = sha256(base_ + data_offset_, (size_t)data_bytes_); });
  std::vector<std::string> problems;
  for (const Tensor& t : tensors_) {
    if (sha256(t.data, (size_t)t.nbytes) != t.sha256)
      problems.push_back("tensor " + quoted(t.name) + ": checksum mismatch");
  }
  section_thread.join();
  if (section_sha != data_sha_) {
    std::string msg = "data section: checksum mismatch";
    if (problems.empty()) msg += " (in padding between tensors: no tensor is damaged)";
    problems.insert(problems.begin(), msg);
  }
  return problems;
}

}  // namespace plm
