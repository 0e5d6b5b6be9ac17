// pocketlm._core.kernels: a thin test surface over the kernel tables, so that
// tests can compare every CPU variant against the scalar reference on the same
// inputs. Not used by the runtime (the executor calls the tables directly).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"
#include "runtime/sampler.h"

namespace nb = nanobind;
using namespace plm;
using namespace plm::kernels;

namespace {

template <typename T>
using In1 = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
template <typename T>
using In2 = nb::ndarray<const T, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

const KernelTable& table(const std::string& variant) {
  const KernelTable* t = kernels_by_name(variant);
  if (!t) throw nb::value_error(("kernel variant not available on this CPU: " + variant).c_str());
  return *t;
}

DType check_dtype(int dtype) {
  if (dtype < 0 || !dtype_valid((uint32_t)dtype))
    throw nb::value_error(("unknown tensor type id " + std::to_string(dtype)).c_str());
  return (DType)dtype;
}

// A new float32 numpy array of the given shape, owned by Python.
template <typename T, size_t N>
nb::ndarray<nb::numpy, T> new_array(const size_t (&shape)[N], T** data) {
  size_t count = 1;
  for (size_t s : shape) count *= s;
  T* buf = new T[count ? count : 1]();
  nb::capsule owner(buf, [](void* p) noexcept { delete[] static_cast<T*>(p); });
  *data = buf;
  return nb::ndarray<nb::numpy, T>(buf, N, shape, owner);
}

// Validated view of raw weight bytes for matmul / matmul2 (I8 scales copied if unaligned).
struct CheckedWeight {
  WeightView w;
  std::unique_ptr<float[]> scales_copy;  // the scales may sit unaligned in the byte array
};

void check_weight(const char* op, DType dt, const In1<uint8_t>& weight, int64_t rows, int64_t cols,
                  const In2<float>& x, CheckedWeight& out) {
  const auto& tr = traits(dt);
  auto fail = [op](const char* msg) { throw nb::value_error((std::string(op) + ": " + msg).c_str()); };
  if (rows <= 0 || cols <= 0 || rows > (1 << 30) || cols > (1 << 30)) fail("rows and cols must be positive");
  if (cols % tr.block_elems) fail("cols must be a multiple of the block size");
  if (tr.quantized && cols % 32) fail("quantized types need cols % 32 == 0");
  if (needs_16_rows(dt) && rows % kX16Rows) fail("x16 and 2:4 types need rows % 16 == 0");
  if (is_variable(dt)) {
    std::string why;
    if (bitmask_check(weight.data(), weight.shape(0), rows, cols, &why) < 0) fail(("bad i8_bitmask weight: " + why).c_str());
  } else if (weight.shape(0) != tensor_bytes(dt, rows, cols)) {
    fail("weight has the wrong number of bytes for dtype and shape");
  }
  if ((int64_t)x.shape(1) != cols) fail("x must be [T, cols]");
  if (x.shape(0) == 0) fail("x must have at least one row");

  out.w = WeightView{dt, rows, cols, weight.data(), row_bytes(dt, cols), nullptr};
  if (has_row_scales(dt))
    out.w.row_scales = is_variable(dt) ? bitmask_scales(weight.data(), rows)
                                       : reinterpret_cast<const float*>(weight.data() + rows * row_bytes(dt, cols));
  if (has_row_scales(dt) && reinterpret_cast<uintptr_t>(out.w.row_scales) % alignof(float)) {
    out.scales_copy.reset(new float[rows]);
    std::memcpy(out.scales_copy.get(), out.w.row_scales, rows * sizeof(float));
    out.w.row_scales = out.scales_copy.get();
  }
}

nb::ndarray<nb::numpy, float> matmul(const std::string& variant, int dtype_id, In1<uint8_t> weight,
                                     int64_t rows, int64_t cols, In2<float> x,
                                     int64_t n0, int64_t n1) {
  const KernelTable& kt = table(variant);
  const DType dt = check_dtype(dtype_id);
  if (!kt.matmul[(int)dt])
    throw nb::value_error(("matmul: " + std::string(traits(dt).name) + " not implemented by variant " + variant).c_str());
  CheckedWeight cw;
  check_weight("matmul", dt, weight, rows, cols, x, cw);
  const WeightView& w = cw.w;
  const int T = (int)x.shape(0);
  float* y;
  if (n1 < 0) n1 = rows;
  if (n0 < 0 || n0 > n1 || n1 > rows) throw nb::value_error("matmul: need 0 <= n0 <= n1 <= rows");
  auto out = new_array<float>({(size_t)T, (size_t)rows}, &y);
  std::fill(y, y + (size_t)T * rows, 0.0f);  // columns outside [n0, n1) stay 0
  const float* xp = x.data();
  {
    nb::gil_scoped_release unlock;
    std::vector<BlockQ8A> xq;
    if (traits(dt).quantized) {
      xq.resize((size_t)T * (cols / 32));
      for (int t = 0; t < T; ++t) kt.quantize_act(xp + t * cols, xq.data() + t * (cols / 32), (int)cols);
    }
    kt.matmul[(int)dt](w, xp, (size_t)cols, xq.data(), T, y, (size_t)rows, (int)n0, (int)n1);
  }
  return out;
}

nb::ndarray<nb::numpy, float> matmul2(const std::string& variant, int dtype_id, In1<uint8_t> weight,
                                      int64_t rows, int64_t cols, In2<float> x,
                                     int64_t n0, int64_t n1) {
  const KernelTable& kt = table(variant);
  const DType dt = check_dtype(dtype_id);
  if (!kt.matmul2[(int)dt] || !kt.quantize_act2)
    throw nb::value_error(("matmul2: " + std::string(traits(dt).name) + " not implemented by variant " + variant).c_str());
  CheckedWeight cw;
  check_weight("matmul2", dt, weight, rows, cols, x, cw);
  const WeightView& w = cw.w;
  const int T = (int)x.shape(0);
  float* y;
  if (n1 < 0) n1 = rows;
  if (n0 < 0 || n0 > n1 || n1 > rows) throw nb::value_error("matmul2: need 0 <= n0 <= n1 <= rows");
  auto out = new_array<float>({(size_t)T, (size_t)rows}, &y);
  std::fill(y, y + (size_t)T * rows, 0.0f);  // columns outside [n0, n1) stay 0
  const float* xp = x.data();
  {
    nb::gil_scoped_release unlock;
    std::vector<BlockQ8A2> xq;
    if (traits(dt).quantized) {
      xq.resize((size_t)T * (cols / 32));
      for (int t = 0; t < T; ++t) kt.quantize_act2(xp + t * cols, xq.data() + t * (cols / 32), (int)cols);
    }
    kt.matmul2[(int)dt](w, xp, (size_t)cols, xq.data(), T, y, (size_t)rows, (int)n0, (int)n1);
  }
  return out;
}

std::tuple<nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, int8_t>>
quantize_act(const std::string& variant, In1<float> x) {
  const KernelTable& kt = table(variant);
  const size_t K = x.shape(0);
  if (K % 32 || K == 0) throw nb::value_error("quantize_act: len(x) must be a positive multiple of 32");
  const size_t nb_ = K / 32;
  float *d, *s;
  int8_t* qs;
  auto da = new_array<float>({nb_}, &d);
  auto sa = new_array<float>({nb_}, &s);
  auto qa = new_array<int8_t>({nb_, (size_t)32}, &qs);
  {
    nb::gil_scoped_release unlock;
    std::vector<BlockQ8A> blocks(nb_);
    kt.quantize_act(x.data(), blocks.data(), (int)K);
    for (size_t b = 0; b < nb_; ++b) {
      d[b] = blocks[b].d;
      s[b] = blocks[b].s;
      std::memcpy(qs + 32 * b, blocks[b].qs, 32);
    }
  }
  return {da, sa, qa};
}

std::tuple<nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, float>,
           nb::ndarray<nb::numpy, float>, nb::ndarray<nb::numpy, int8_t>, nb::ndarray<nb::numpy, int8_t>>
quantize_act2(const std::string& variant, In1<float> x) {
  const KernelTable& kt = table(variant);
  if (!kt.quantize_act2) throw nb::value_error(("quantize_act2: not implemented by variant " + variant).c_str());
  const size_t K = x.shape(0);
  if (K % 32 || K == 0) throw nb::value_error("quantize_act2: len(x) must be a positive multiple of 32");
  const size_t nb_ = K / 32;
  float *d, *s, *d2, *s2;
  int8_t *qs, *qs2;
  auto da = new_array<float>({nb_}, &d);
  auto sa = new_array<float>({nb_}, &s);
  auto d2a = new_array<float>({nb_}, &d2);
  auto s2a = new_array<float>({nb_}, &s2);
  auto qa = new_array<int8_t>({nb_, (size_t)32}, &qs);
  auto q2a = new_array<int8_t>({nb_, (size_t)32}, &qs2);
  {
    nb::gil_scoped_release unlock;
    std::vector<BlockQ8A2> blocks(nb_);
    kt.quantize_act2(x.data(), blocks.data(), (int)K);
    for (size_t b = 0; b < nb_; ++b) {
      d[b] = blocks[b].d;
      s[b] = blocks[b].s;
      d2[b] = blocks[b].d2;
      s2[b] = blocks[b].s2;
      std::memcpy(qs + 32 * b, blocks[b].qs, 32);
      std::memcpy(qs2 + 32 * b, blocks[b].qs2, 32);
    }
  }
  return {da, sa, d2a, s2a, qa, q2a};
}

nb::ndarray<nb::numpy, float> dequant_row(int dtype_id, In1<uint8_t> raw, int64_t cols,
                                          const std::string& variant) {
  const KernelTable& kt = table(variant);
  const DType dt = check_dtype(dtype_id);
  if (cols <= 0 || cols % traits(dt).block_elems)
    throw nb::value_error("dequant_row: cols must be a positive multiple of the block size");
  if (needs_16_rows(dt) || is_variable(dt))
    throw nb::value_error("dequant_row: x16, 2:4 and bitmask types have no row-major rows");
  if (raw.shape(0) < row_bytes(dt, cols)) throw nb::value_error("dequant_row: raw is too short");
  float* out;
  auto arr = new_array<float>({(size_t)cols}, &out);
  {
    nb::gil_scoped_release unlock;
    kt.dequant_row(dt, raw.data(), out, cols);
  }
  return arr;
}

void same_len(size_t a, size_t b, const char* op) {
  if (a != b) throw nb::value_error((std::string(op) + ": arrays must have the same length").c_str());
}

nb::ndarray<nb::numpy, float> rms_norm(const std::string& variant, In1<float> x, In1<float> w, float eps) {
  const KernelTable& kt = table(variant);
  same_len(x.shape(0), w.shape(0), "rms_norm");
  if (x.shape(0) == 0) throw nb::value_error("rms_norm: empty input");
  float* y;
  auto arr = new_array<float>({x.shape(0)}, &y);
  {
    nb::gil_scoped_release unlock;
    kt.rms_norm(x.data(), w.data(), y, (int)x.shape(0), eps);
  }
  return arr;
}

nb::ndarray<nb::numpy, float> binary(const std::string& variant, In1<float> a, In1<float> b, bool silu) {
  const KernelTable& kt = table(variant);
  same_len(a.shape(0), b.shape(0), silu ? "silu_mul" : "add");
  float* y;
  auto arr = new_array<float>({a.shape(0)}, &y);
  {
    nb::gil_scoped_release unlock;
    (silu ? kt.silu_mul : kt.add)(a.data(), b.data(), y, (int)a.shape(0));
  }
  return arr;
}

float dot(const std::string& variant, In1<float> a, In1<float> b) {
  const KernelTable& kt = table(variant);
  same_len(a.shape(0), b.shape(0), "dot");
  nb::gil_scoped_release unlock;
  return kt.dot(a.data(), b.data(), (int)a.shape(0));
}

// out (G x dh) + w (G x n) @ rows (n x dh), through the variant's weighted_sum (f32 rows) or
// weighted_sum_f16 (rows of float16 given as their bits).
template <class Row>
nb::ndarray<nb::numpy, float> weighted_sum(const std::string& variant, In2<float> w, In2<Row> rows,
                                           In2<float> out) {
  const KernelTable& kt = table(variant);
  const size_t G = w.shape(0), n = w.shape(1), dh = rows.shape(1);
  if (rows.shape(0) != n || out.shape(0) != G || out.shape(1) != dh || G == 0 || dh == 0)
    throw nb::value_error("weighted_sum: need w [G, n], rows [n, dh], out [G, dh]");
  float* y;
  auto arr = new_array<float>({G, dh}, &y);
  std::memcpy(y, out.data(), G * dh * sizeof(float));
  {
    nb::gil_scoped_release unlock;
    if constexpr (std::is_same_v<Row, float>)
      kt.weighted_sum(w.data(), n, (int)G, rows.data(), dh, (int)n, y, dh, (int)dh);
    else
      kt.weighted_sum_f16(w.data(), n, (int)G, rows.data(), dh, (int)n, y, dh, (int)dh);
  }
  return arr;
}

// The Q8_0 KV cache's kernels: rows [n, row_bytes] of Q8_0 blocks (pocketlm.quant's layout).
// scores_q8_0: s [G, n] (zero outside [p0, p1)) of queries q [G, dh]; weighted_sum_q8_0: out + w @ rows.
nb::ndarray<nb::numpy, float> scores_q8_0(const std::string& variant, In2<uint8_t> rows, In2<float> q, int p0,
                                          int p1) {
  const KernelTable& kt = table(variant);
  const size_t n = rows.shape(0), rb = rows.shape(1), G = q.shape(0), dh = q.shape(1);
  if (G == 0 || dh == 0 || dh % 32 || rb != dh / 32 * 34 || p0 < 0 || p0 > p1 || (size_t)p1 > n)
    throw nb::value_error("scores_q8_0: need rows [n, dh/32*34], q [G, dh] (dh % 32 == 0), 0 <= p0 <= p1 <= n");
  float* s;
  auto arr = new_array<float>({G, n}, &s);
  std::memset(s, 0, G * n * sizeof(float));
  {
    nb::gil_scoped_release unlock;
    kt.scores_q8_0(rows.data(), rb, q.data(), dh, (int)G, s, n, p0, p1, (int)dh);
  }
  return arr;
}

nb::ndarray<nb::numpy, float> weighted_sum_q8_0(const std::string& variant, In2<float> w, In2<uint8_t> rows,
                                                In2<float> out) {
  const KernelTable& kt = table(variant);
  const size_t G = w.shape(0), n = w.shape(1), rb = rows.shape(1), dh = out.shape(1);
  if (rows.shape(0) != n || out.shape(0) != G || G == 0 || dh == 0 || dh % 32 || rb != dh / 32 * 34)
    throw nb::value_error("weighted_sum_q8_0: need w [G, n], rows [n, dh/32*34], out [G, dh] (dh % 32 == 0)");
  float* y;
  auto arr = new_array<float>({G, dh}, &y);
  std::memcpy(y, out.data(), G * dh * sizeof(float));
  {
    nb::gil_scoped_release unlock;
    kt.weighted_sum_q8_0(w.data(), n, (int)G, rows.data(), rb, (int)n, y, dh, (int)dh);
  }
  return arr;
}

nb::ndarray<nb::numpy, uint16_t> to_f16(const std::string& variant, In1<float> x) {
  const KernelTable& kt = table(variant);
  uint16_t* y;
  auto arr = new_array<uint16_t>({x.shape(0)}, &y);
  {
    nb::gil_scoped_release unlock;
    kt.to_f16(x.data(), y, (int)x.shape(0));
  }
  return arr;
}

float max_of(const std::string& variant, In1<float> s) {
  const KernelTable& kt = table(variant);
  nb::gil_scoped_release unlock;
  return kt.max(s.data(), (int)s.shape(0));
}

// (exp((s - m) * scale), its sum) through the variant's exp_sum.
nb::tuple exp_sum(const std::string& variant, In1<float> s, float m, float scale) {
  const KernelTable& kt = table(variant);
  float* y;
  auto arr = new_array<float>({s.shape(0)}, &y);
  std::memcpy(y, s.data(), s.shape(0) * sizeof(float));
  float sum;
  {
    nb::gil_scoped_release unlock;
    sum = kt.exp_sum(y, (int)s.shape(0), m, scale);
  }
  return nb::make_tuple(arr, sum);
}

nb::ndarray<nb::numpy, float> axpy(const std::string& variant, float a, In1<float> x, In1<float> y) {
  const KernelTable& kt = table(variant);
  same_len(x.shape(0), y.shape(0), "axpy");
  float* out;
  auto arr = new_array<float>({y.shape(0)}, &out);
  std::memcpy(out, y.data(), y.shape(0) * sizeof(float));
  {
    nb::gil_scoped_release unlock;
    kt.axpy(a, x.data(), out, (int)x.shape(0));
  }
  return arr;
}

nb::ndarray<nb::numpy, float> scale(const std::string& variant, float a, In1<float> y) {
  const KernelTable& kt = table(variant);
  float* out;
  auto arr = new_array<float>({y.shape(0)}, &out);
  std::memcpy(out, y.data(), y.shape(0) * sizeof(float));
  {
    nb::gil_scoped_release unlock;
    kt.scale(a, out, (int)y.shape(0));
  }
  return arr;
}

}  // namespace

void bind_kernels(nb::module_& m) {
  nb::module_ k = m.def_submodule("kernels", "Kernel variants, exposed for tests and benchmarks.");
  k.def("available", &available_kernels, "Kernel variants usable on this CPU, 'ref' first.");
  k.def(
      "sparse24",
      [](const std::string& variant) {
        const KernelTable& kt = table(variant);
        return kt.sparse24 ? kt.sparse24() : (int)kSparse24None;
      },
      nb::arg("variant"),
      "How a variant reads the 2:4-sparse types on this CPU: 0 none (rows expanded per call), 1 in place "
      "but slower than dense, 2 in place and faster (KernelTable::sparse24).");
  k.def(
      "bitmask",
      [](const std::string& variant) {
        const KernelTable& kt = table(variant);
        return kt.bitmask ? kt.bitmask() : (int)kSparse24None;
      },
      nb::arg("variant"), "The same for i8_bitmask (KernelTable::bitmask).");
  k.def("best", [] { return std::string(best_kernels().name); },
        "The variant the runtime uses (CPUID, or PLM_KERNELS).");
  k.def("matmul", &matmul, nb::arg("variant"), nb::arg("dtype"), nb::arg("weight"), nb::arg("rows"),
        nb::arg("cols"), nb::arg("x"), nb::arg("n0") = 0, nb::arg("n1") = -1,
        "y[T, rows] = x[T, cols] @ W.T for raw weight bytes W of the given dtype id, computing the\n"
        "output columns [n0, n1) (default all; the others are 0). Quantized types quantize x with\n"
        "the same variant's quantize_act first.");
  k.def("quantize_act", &quantize_act, nb::arg("variant"), nb::arg("x"),
        "Quantize x[K] into 32-blocks: returns (d[K/32], s[K/32], qs[K/32, 32]).");
  k.def("matmul2", &matmul2, nb::arg("variant"), nb::arg("dtype"), nb::arg("weight"), nb::arg("rows"),
        nb::arg("cols"), nb::arg("x"), nb::arg("n0") = 0, nb::arg("n1") = -1,
        "As matmul, with two-level activations: quantized types quantize x with the same\n"
        "variant's quantize_act2 and use matmul2.");
  k.def("quantize_act2", &quantize_act2, nb::arg("variant"), nb::arg("x"),
        "Two-level quantization of x[K]: returns (d, s, d2, s2, qs[K/32, 32], qs2[K/32, 32]).");
  k.def("top_k_ids", [](In1<float> x, int k) {
          if (k < 1 || (int64_t)x.shape(0) < k) throw nb::value_error("top_k_ids: k must be in 1..len(x)");
          std::vector<int32_t> ids;
          top_k_ids(x.data(), (int64_t)x.shape(0), k, ids);
          return ids;
        }, nb::arg("x"), nb::arg("k"), "Ids of the k largest values, in no particular order.");
  k.def("sample_top_k", [](In1<float> x, int top_k, float temperature, double top_p, double min_p, double u) {
          if (top_k < 1 || (int64_t)x.shape(0) <= top_k) throw nb::value_error("sample_top_k: top_k must be in 1..len(x)-1");
          if (!(temperature > 0) || !(top_p > 0 && top_p <= 1) || !(min_p >= 0 && min_p <= 1) || !(u >= 0 && u < 1))
            throw nb::value_error("sample_top_k: needs temperature > 0, top_p in (0, 1], min_p in [0, 1], u in [0, 1)");
          try {
            return sample_top_k(x.data(), (int64_t)x.shape(0), top_k, temperature, top_p, min_p, u);
          } catch (const std::invalid_argument& e) {
            throw nb::value_error(e.what());
          }
        }, nb::arg("x"), nb::arg("top_k"), nb::arg("temperature"), nb::arg("top_p"), nb::arg("min_p"), nb::arg("u"),
        "One token id by top-k sampling (top_k -> top_p -> min_p -> softmax at temperature), drawn at u;\n"
        "-1 if x holds a NaN or its largest value is infinite.");
  k.def("dequant_row", &dequant_row, nb::arg("dtype"), nb::arg("raw"), nb::arg("cols"),
        nb::arg("variant") = "ref", "Dequantize one row (I8: without its row scale).");
  k.def("rms_norm", &rms_norm, nb::arg("variant"), nb::arg("x"), nb::arg("w"), nb::arg("eps"));
  k.def("max", &max_of, nb::arg("variant"), nb::arg("s"));
  k.def("to_f16", &to_f16, nb::arg("variant"), nb::arg("x"));
  k.def("scores_q8_0", &scores_q8_0, nb::arg("variant"), nb::arg("rows"), nb::arg("q"), nb::arg("p0"), nb::arg("p1"));
  k.def("weighted_sum_q8_0", &weighted_sum_q8_0, nb::arg("variant"), nb::arg("w"), nb::arg("rows"), nb::arg("out"));
  k.def("weighted_sum_f16", &weighted_sum<uint16_t>, nb::arg("variant"), nb::arg("w"), nb::arg("rows"), nb::arg("out"));
  k.def("exp_sum", &exp_sum, nb::arg("variant"), nb::arg("s"), nb::arg("m"), nb::arg("scale"));
  k.def("silu_mul", [](const std::string& v, In1<float> g, In1<float> u) { return binary(v, g, u, true); },
        nb::arg("variant"), nb::arg("g"), nb::arg("u"));
  k.def("add", [](const std::string& v, In1<float> a, In1<float> b) { return binary(v, a, b, false); },
        nb::arg("variant"), nb::arg("a"), nb::arg("b"));
  k.def("dot", &dot, nb::arg("variant"), nb::arg("a"), nb::arg("b"));
  k.def("weighted_sum", &weighted_sum<float>, nb::arg("variant"), nb::arg("w"), nb::arg("rows"), nb::arg("out"),
        "out + w @ rows (attention's P.V) through the variant's weighted_sum.");
  k.def("axpy", &axpy, nb::arg("variant"), nb::arg("a"), nb::arg("x"), nb::arg("y"),
        "Returns y + a*x (y is not modified).");
  k.def("scale", &scale, nb::arg("variant"), nb::arg("a"), nb::arg("y"), "Returns a*y.");
}
