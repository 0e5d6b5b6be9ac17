// _core.Bundle: the mmap-backed .plm reader. Python code uses pocketlm.bundle.read_bundle();
// the executor takes the shared_ptr<plm::Bundle> held by this class.
#include <algorithm>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.h"
#include "format/bundle_reader.h"
#include "format/sha256.h"

namespace nb = nanobind;

namespace plm {
bool sha256_force_scalar(bool scalar);  // test hook in format/sha256.cpp
}

namespace {

using ByteView = nb::ndarray<nb::numpy, const uint8_t, nb::ndim<1>>;

nb::dict tensor_dict(const plm::Bundle::Tensor& t) {
  nb::list shape;
  for (int64_t d : t.shape) shape.append(d);
  nb::dict d;
  d["name"] = t.name;
  d["dtype"] = (uint32_t)t.dtype;
  d["shape"] = nb::tuple(shape);
  d["offset"] = t.offset;
  d["nbytes"] = t.nbytes;
  return d;
}

}  // namespace

void bind_bundle(nb::module_& m) {
  nb::class_<plm::Bundle>(m, "Bundle", "A validated, read-only memory-mapped .plm bundle.")
      .def(nb::new_([](const std::string& path) {
             nb::gil_scoped_release unlocked;  // open() hashes the metadata and index
             return plm::Bundle::open(path);
           }),
           nb::arg("path"))
      .def_prop_ro("path", &plm::Bundle::path)
      .def_prop_ro("version", &plm::Bundle::version)
      .def_prop_ro("file_bytes", &plm::Bundle::file_bytes)
      .def_prop_ro("metadata_json", &plm::Bundle::metadata_json)
      .def_prop_ro("tensors",
                   [](const plm::Bundle& b) {
                     nb::list out;
                     for (const auto& t : b.tensors()) out.append(tensor_dict(t));
                     return out;
                   })
      .def("verify", &plm::Bundle::verify, nb::call_guard<nb::gil_scoped_release>(),
           "Hash the data section and every tensor; returns the problems found (empty: intact).")
      .def(
          "tensor_bytes",
          [](std::shared_ptr<plm::Bundle> self, const std::string& name) {
            const plm::Bundle::Tensor* t = self->find(name);
            if (!t) throw nb::key_error(("no tensor named '" + name + "' in " + self->path()).c_str());
            // The view points into the mapping; its owner keeps the Bundle (and the mapping) alive.
            auto* keep = new std::shared_ptr<plm::Bundle>(std::move(self));
            nb::capsule owner(keep, [](void* p) noexcept {
              delete static_cast<std::shared_ptr<plm::Bundle>*>(p);
            });
            size_t shape[1] = {(size_t)t->nbytes};
            return ByteView(t->data, 1, shape, owner);
          },
          nb::arg("name"), "Read-only uint8 view of one tensor's bytes inside the mapping.")
      .def("__repr__", [](const plm::Bundle& b) {
        return "<_core.Bundle '" + b.path() + "': " + std::to_string(b.tensors().size()) +
               " tensors, " + std::to_string(b.file_bytes()) + " bytes>";
      });

  // The converter's x16 interleaving (csrc/common.h): row-major bytes of the base type -> a new
  // array in x16 type `dtype`'s layout (I8_X16: the row scales copied after the codes). numpy's
  // transposes took 1.4 s of a 0.5B model's 9 s conversion; this is a pass of copies.
  m.def(
      "interleave_x16",
      [](nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> raw, uint32_t dtype, int64_t rows,
         int64_t cols) {
        if (dtype < (uint32_t)plm::DType::Q8_0_X16 || dtype > (uint32_t)plm::DType::Q4_1_G128_X16)
          throw nb::value_error(("interleave_x16: dtype " + std::to_string(dtype) + " is not an x16 type").c_str());
        const plm::DType t = (plm::DType)dtype;
        const int64_t be = plm::traits(t).block_elems;
        // Bounded so that no size below overflows (a bundle tensor's dimensions are far smaller).
        if (rows <= 0 || cols <= 0 || rows > (int64_t(1) << 31) || cols > (int64_t(1) << 31) ||
            rows % plm::kX16Rows != 0 || cols % be != 0)
          throw nb::value_error(("interleave_x16: shape (" + std::to_string(rows) + ", " + std::to_string(cols) +
                                 ") is not whole groups of 16 rows and blocks of " + std::to_string(be))
                                    .c_str());
        const size_t nbytes = plm::tensor_bytes(t, rows, cols), rb = plm::row_bytes(t, cols);
        if (raw.size() != nbytes)
          throw nb::value_error(("interleave_x16: expected " + std::to_string(nbytes) + " bytes, got " +
                                 std::to_string(raw.size())).c_str());
        uint8_t* out = new uint8_t[nbytes];
        nb::capsule owner(out, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
        {
          nb::gil_scoped_release unlocked;
          const uint8_t* src = raw.data();
          for (int64_t n = 0; n < rows; ++n) plm::x16_scatter_row(t, src + (size_t)n * rb, cols, n, out);
          const size_t codes = (size_t)rows * rb;
          std::memcpy(out + codes, src + codes, nbytes - codes);  // I8's row scales
        }
        size_t shape[1] = {nbytes};
        return nb::ndarray<nb::numpy, uint8_t, nb::ndim<1>>(out, 1, shape, owner);
      },
      nb::arg("raw"), nb::arg("dtype"), nb::arg("rows"), nb::arg("cols"));
  // Test hook for the C++ SHA-256: feeds `data` in pieces cycling through `chunk_sizes`
  // (all at once if empty) so that tests can compare streaming against hashlib.
  m.def(
      "_sha256",
      [](nb::bytes data, const std::vector<size_t>& chunk_sizes, bool scalar) {
        const uint8_t* p = static_cast<const uint8_t*>(data.data());
        size_t n = data.size();
        if (!chunk_sizes.empty() && *std::max_element(chunk_sizes.begin(), chunk_sizes.end()) == 0)
          throw nb::value_error("chunk_sizes must contain a positive size");
        plm::sha256_force_scalar(scalar);  // process-wide: test use only
        plm::Sha256 h;
        if (chunk_sizes.empty()) {
          h.update(p, n);
        } else {
          for (size_t pos = 0, i = 0; pos < n; ++i) {
            size_t take = std::min(chunk_sizes[i % chunk_sizes.size()], n - pos);
            h.update(p + pos, take);
            pos += take;
          }
        }
        std::array<uint8_t, 32> digest = h.final();
        plm::sha256_force_scalar(false);
        return nb::bytes(reinterpret_cast<const char*>(digest.data()), digest.size());
      },
      nb::arg("data"), nb::arg("chunk_sizes") = std::vector<size_t>{}, nb::arg("scalar") = false);
  // True when SHA-256 runs on the CPU's SHA extensions.
  m.def("_sha256_accelerated", [] { return plm::sha256_force_scalar(false); });
}
