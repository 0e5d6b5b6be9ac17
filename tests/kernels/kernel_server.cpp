// The kernel tests' other end on a CPU Python does not run on: a static program that serves
// pocketlm._core.kernels' calls (same names, arguments, results and checks as
// csrc/bindings/bind_kernels.cpp) over standard input and output, so that tests/kernels runs
// unchanged against the aarch64 kernels under qemu-aarch64 (tests/kernels/remote.py is the
// Python side; scripts/test-arm.sh builds this and runs them).
//
// Messages, little-endian: a request is the op name (u32 length + bytes), a u32 count of
// arguments and the arguments; a reply is a status byte (0 ok, 1 error + a u32-length message)
// and the results, encoded like arguments. An argument is a tag byte then: 'S' u32 length +
// bytes; 'I' i64; 'F' f64; 'L' u32 count + that many 'S' bodies (a list of strings); 'A' an
// array: element code ('f' f32, 'b' u8, 'c' i8, 'h' u16), u8 ndim, i64 dims, the bytes.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kernels.h"

using namespace plm;
using namespace plm::kernels;

namespace {

struct Array {
  char code = 'f';
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
  size_t dim(int i) const { return i < (int)shape.size() ? (size_t)shape[i] : 0; }
  template <class T> const T* as() const { return reinterpret_cast<const T*>(bytes.data()); }
  template <class T> T* as() { return reinterpret_cast<T*>(bytes.data()); }
};

struct Arg {
  char tag = 0;
  std::string s;
  int64_t i = 0;
  double f = 0;
  Array a;
};

void read_exact(void* p, size_t n) {
  if (n && std::fread(p, 1, n, stdin) != n) throw std::runtime_error("eof");
}
template <class T> T read_pod() {
  T v;
  read_exact(&v, sizeof v);
  return v;
}
std::string read_str() {
  std::string s(read_pod<uint32_t>(), '\0');
  read_exact(s.data(), s.size());
  return s;
}
size_t elem_size(char code) { return code == 'f' ? 4 : code == 'h' ? 2 : 1; }

Arg read_arg() {
  Arg a;
  a.tag = (char)read_pod<uint8_t>();
  switch (a.tag) {
    case 'S': a.s = read_str(); break;
    case 'I': a.i = read_pod<int64_t>(); break;
    case 'F': a.f = read_pod<double>(); break;
    case 'A': {
      a.a.code = (char)read_pod<uint8_t>();
      const int nd = read_pod<uint8_t>();
      size_t n = 1;
      for (int d = 0; d < nd; ++d) {
        a.a.shape.push_back(read_pod<int64_t>());
        if (a.a.shape.back() < 0 || a.a.shape.back() > (int64_t(1) << 31)) throw std::runtime_error("bad shape");
        n *= (size_t)a.a.shape.back();
        if (n > (size_t(1) << 31)) throw std::runtime_error("array too large");  // no product can wrap
      }
      a.a.bytes.resize(n * elem_size(a.a.code));
      read_exact(a.a.bytes.data(), a.a.bytes.size());
      break;
    }
    default: throw std::runtime_error("bad argument tag");
  }
  return a;
}

struct Reply {
  std::vector<uint8_t> buf;
  uint32_t count = 0;
  void raw(const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    buf.insert(buf.end(), b, b + n);
  }
  void str(const std::string& s) {
    uint32_t n = (uint32_t)s.size();
    raw(&n, 4);
    raw(s.data(), n);
  }
  void text(const std::string& s) { buf.push_back('S'); str(s); ++count; }
  void strings(const std::vector<std::string>& v) {
    buf.push_back('L');
    uint32_t n = (uint32_t)v.size();
    raw(&n, 4);
    for (const auto& s : v) str(s);
    ++count;
  }
  void real(double f) { buf.push_back('F'); raw(&f, 8); ++count; }
  void array(const Array& a) {
    buf.push_back('A');
    buf.push_back((uint8_t)a.code);
    buf.push_back((uint8_t)a.shape.size());
    for (int64_t d : a.shape) raw(&d, 8);
    raw(a.bytes.data(), a.bytes.size());
    ++count;
  }
};

Array new_array(char code, std::vector<int64_t> shape) {
  Array a;
  a.code = code;
  a.shape = std::move(shape);
  size_t n = 1;
  for (int64_t d : a.shape) n *= (size_t)d;
  a.bytes.assign(n * elem_size(code), 0);
  return a;
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

const Arg& arg(const std::vector<Arg>& args, size_t i, char tag) {
  if (i >= args.size() || args[i].tag != tag)
    fail("argument " + std::to_string(i) + " must be of kind " + std::string(1, tag));
  return args[i];
}
int64_t I(const std::vector<Arg>& args, size_t i) { return arg(args, i, 'I').i; }
double F(const std::vector<Arg>& args, size_t i) { return arg(args, i, 'F').f; }
const std::string& S(const std::vector<Arg>& args, size_t i) { return arg(args, i, 'S').s; }

const KernelTable& table(const std::string& variant) {
  const KernelTable* t = kernels_by_name(variant);
  if (!t) fail("kernel variant not available on this CPU: " + variant);
  return *t;
}

DType check_dtype(int64_t dtype) {
  if (dtype < 0 || !dtype_valid((uint32_t)dtype)) fail("unknown tensor type id " + std::to_string(dtype));
  return (DType)dtype;
}

const Array& array_arg(const std::vector<Arg>& args, size_t i, char code, int ndim) {
  if (i >= args.size() || args[i].tag != 'A' || args[i].a.code != code || (int)args[i].a.shape.size() != ndim)
    fail("argument " + std::to_string(i) + " must be a " + std::to_string(ndim) + "-d array");
  return args[i].a;
}

template <class Act, bool Two>
void matmul(const std::vector<Arg>& args, Reply& r) {
  const char* op = Two ? "matmul2" : "matmul";
  const KernelTable& kt = table(S(args, 0));
  const DType dt = check_dtype(I(args, 1));
  const Array& weight = array_arg(args, 2, 'b', 1);
  const int64_t rows = I(args, 3), cols = I(args, 4);
  const Array& x = array_arg(args, 5, 'f', 2);
  int64_t n0 = I(args, 6), n1 = I(args, 7);
  const bool have = Two ? (kt.matmul2[(int)dt] && kt.quantize_act2) : kt.matmul[(int)dt] != nullptr;
  if (!have) fail(std::string(op) + ": " + traits(dt).name + " not implemented by variant " + kt.name);
  const auto& tr = traits(dt);
  auto bad = [op](const char* msg) { fail(std::string(op) + ": " + msg); };
  if (rows <= 0 || cols <= 0 || rows > (1 << 30) || cols > (1 << 30)) bad("rows and cols must be positive");
  if (cols % tr.block_elems) bad("cols must be a multiple of the block size");
  if (tr.quantized && cols % 32) bad("quantized types need cols % 32 == 0");
  if (needs_16_rows(dt) && rows % kX16Rows) bad("x16 and 2:4 types need rows % 16 == 0");
  if (is_variable(dt) ? bitmask_check(weight.as<uint8_t>(), weight.dim(0), rows, cols, nullptr) < 0
                      : weight.dim(0) != tensor_bytes(dt, rows, cols))
    bad("weight has the wrong number of bytes for dtype and shape");
  if ((int64_t)x.dim(1) != cols) bad("x must be [T, cols]");
  if (x.dim(0) == 0) bad("x must have at least one row");
  if (n1 < 0) n1 = rows;
  if (n0 < 0 || n0 > n1 || n1 > rows) bad("need 0 <= n0 <= n1 <= rows");
  std::vector<float> scales;
  WeightView w{dt, rows, cols, weight.as<uint8_t>(), row_bytes(dt, cols), nullptr};
  if (has_row_scales(dt)) {
    scales.resize(rows);
    const uint8_t* at = is_variable(dt) ? reinterpret_cast<const uint8_t*>(bitmask_scales(weight.as<uint8_t>(), rows))
                                        : weight.as<uint8_t>() + rows * row_bytes(dt, cols);
    std::memcpy(scales.data(), at, rows * sizeof(float));
    w.row_scales = scales.data();
  }
  const int T = (int)x.dim(0);
  Array y = new_array('f', {T, rows});
  std::vector<Act> xq;
  if (tr.quantized) {
    xq.resize((size_t)T * (cols / 32));
    for (int t = 0; t < T; ++t) {
      if constexpr (Two) kt.quantize_act2(x.as<float>() + t * cols, xq.data() + t * (cols / 32), (int)cols);
      else kt.quantize_act(x.as<float>() + t * cols, xq.data() + t * (cols / 32), (int)cols);
    }
  }
  if constexpr (Two) kt.matmul2[(int)dt](w, x.as<float>(), (size_t)cols, xq.data(), T, y.as<float>(), rows, (int)n0, (int)n1);
  else kt.matmul[(int)dt](w, x.as<float>(), (size_t)cols, xq.data(), T, y.as<float>(), rows, (int)n0, (int)n1);
  r.array(y);
}

template <bool Two>
void quantize(const std::vector<Arg>& args, Reply& r) {
  const char* op = Two ? "quantize_act2" : "quantize_act";
  const KernelTable& kt = table(S(args, 0));
  const Array& x = array_arg(args, 1, 'f', 1);
  const size_t K = x.dim(0);
  if (Two && !kt.quantize_act2) fail(std::string(op) + ": not implemented by variant " + kt.name);
  if (K % 32 || K == 0) fail(std::string(op) + ": len(x) must be a positive multiple of 32");
  const int64_t nb = (int64_t)K / 32;
  Array d = new_array('f', {nb}), s = new_array('f', {nb}), d2 = new_array('f', {nb}), s2 = new_array('f', {nb});
  Array q = new_array('c', {nb, 32}), q2 = new_array('c', {nb, 32});
  if constexpr (Two) {
    std::vector<BlockQ8A2> blocks(nb);
    kt.quantize_act2(x.as<float>(), blocks.data(), (int)K);
    for (int64_t b = 0; b < nb; ++b) {
      d.as<float>()[b] = blocks[b].d, s.as<float>()[b] = blocks[b].s;
      d2.as<float>()[b] = blocks[b].d2, s2.as<float>()[b] = blocks[b].s2;
      std::memcpy(q.as<int8_t>() + 32 * b, blocks[b].qs, 32);
      std::memcpy(q2.as<int8_t>() + 32 * b, blocks[b].qs2, 32);
    }
    for (const Array* a : {&d, &s, &d2, &s2, &q, &q2}) r.array(*a);
  } else {
    std::vector<BlockQ8A> blocks(nb);
    kt.quantize_act(x.as<float>(), blocks.data(), (int)K);
    for (int64_t b = 0; b < nb; ++b) {
      d.as<float>()[b] = blocks[b].d, s.as<float>()[b] = blocks[b].s;
      std::memcpy(q.as<int8_t>() + 32 * b, blocks[b].qs, 32);
    }
    for (const Array* a : {&d, &s, &q}) r.array(*a);
  }
}

void same_len(size_t a, size_t b, const char* op) {
  if (a != b) fail(std::string(op) + ": arrays must have the same length");
}

// out (G x dh) + w (G x n) @ rows (n x dh): f32 rows, f16 rows (as u16 bits) or Q8_0 rows (bytes).
void weighted_sum(const std::vector<Arg>& args, Reply& r, char kind) {
  const KernelTable& kt = table(S(args, 0));
  const Array& w = array_arg(args, 1, 'f', 2);
  const Array& rows = array_arg(args, 2, kind == 'q' ? 'b' : kind, 2);
  const Array& out = array_arg(args, 3, 'f', 2);
  const size_t G = w.dim(0), n = w.dim(1), dh = out.dim(1), rb = rows.dim(1);
  if (kind == 'q') {
    if (rows.dim(0) != n || out.dim(0) != G || G == 0 || dh == 0 || dh % 32 || rb != dh / 32 * 34)
      fail("weighted_sum_q8_0: need w [G, n], rows [n, dh/32*34], out [G, dh] (dh % 32 == 0)");
  } else if (rows.dim(0) != n || out.dim(0) != G || rb != dh || G == 0 || dh == 0) {
    fail("weighted_sum: need w [G, n], rows [n, dh], out [G, dh]");
  }
  Array y = out;
  if (kind == 'f') kt.weighted_sum(w.as<float>(), n, (int)G, rows.as<float>(), dh, (int)n, y.as<float>(), dh, (int)dh);
  else if (kind == 'h')
    kt.weighted_sum_f16(w.as<float>(), n, (int)G, rows.as<fp16_t>(), dh, (int)n, y.as<float>(), dh, (int)dh);
  else kt.weighted_sum_q8_0(w.as<float>(), n, (int)G, rows.as<uint8_t>(), rb, (int)n, y.as<float>(), dh, (int)dh);
  r.array(y);
}

void serve(const std::string& op, const std::vector<Arg>& args, Reply& r) {
  if (op == "available") return r.strings(available_kernels());
  if (op == "best") return r.text(best_kernels().name);
  if (op == "matmul") return matmul<BlockQ8A, false>(args, r);
  if (op == "matmul2") return matmul<BlockQ8A2, true>(args, r);
  if (op == "quantize_act") return quantize<false>(args, r);
  if (op == "quantize_act2") return quantize<true>(args, r);
  if (op == "weighted_sum") return weighted_sum(args, r, 'f');
  if (op == "weighted_sum_f16") return weighted_sum(args, r, 'h');
  if (op == "weighted_sum_q8_0") return weighted_sum(args, r, 'q');
  if (op == "dequant_row") {  // (dtype, raw, cols, variant)
    const KernelTable& kt = table(S(args, 3));
    const DType dt = check_dtype(I(args, 0));
    const Array& raw = array_arg(args, 1, 'b', 1);
    const int64_t cols = I(args, 2);
    if (cols <= 0 || cols % traits(dt).block_elems)
      fail("dequant_row: cols must be a positive multiple of the block size");
    if (needs_16_rows(dt) || is_variable(dt)) fail("dequant_row: x16, 2:4 and bitmask types have no row-major rows");
    if (raw.dim(0) < row_bytes(dt, cols)) fail("dequant_row: raw is too short");
    Array y = new_array('f', {cols});
    kt.dequant_row(dt, raw.as<uint8_t>(), y.as<float>(), cols);
    return r.array(y);
  }
  const KernelTable& kt = table(S(args, 0));
  if (op == "rms_norm") {  // (variant, x, w, eps)
    const Array &x = array_arg(args, 1, 'f', 1), &w = array_arg(args, 2, 'f', 1);
    same_len(x.dim(0), w.dim(0), "rms_norm");
    if (x.dim(0) == 0) fail("rms_norm: empty input");
    Array y = new_array('f', {(int64_t)x.dim(0)});
    kt.rms_norm(x.as<float>(), w.as<float>(), y.as<float>(), (int)x.dim(0), (float)F(args, 3));
    return r.array(y);
  }
  if (op == "silu_mul" || op == "add") {
    const Array &a = array_arg(args, 1, 'f', 1), &b = array_arg(args, 2, 'f', 1);
    same_len(a.dim(0), b.dim(0), op.c_str());
    Array y = new_array('f', {(int64_t)a.dim(0)});
    (op == "add" ? kt.add : kt.silu_mul)(a.as<float>(), b.as<float>(), y.as<float>(), (int)a.dim(0));
    return r.array(y);
  }
  if (op == "dot") {
    const Array &a = array_arg(args, 1, 'f', 1), &b = array_arg(args, 2, 'f', 1);
    same_len(a.dim(0), b.dim(0), "dot");
    return r.real(kt.dot(a.as<float>(), b.as<float>(), (int)a.dim(0)));
  }
  if (op == "scores_q8_0") {  // (variant, rows, q, p0, p1)
    const Array &rows = array_arg(args, 1, 'b', 2), &q = array_arg(args, 2, 'f', 2);
    const int64_t p0 = I(args, 3), p1 = I(args, 4);
    const size_t n = rows.dim(0), rb = rows.dim(1), G = q.dim(0), dh = q.dim(1);
    if (G == 0 || dh == 0 || dh % 32 || rb != dh / 32 * 34 || p0 < 0 || p0 > p1 || (size_t)p1 > n)
      fail("scores_q8_0: need rows [n, dh/32*34], q [G, dh] (dh % 32 == 0), 0 <= p0 <= p1 <= n");
    Array s = new_array('f', {(int64_t)G, (int64_t)n});
    kt.scores_q8_0(rows.as<uint8_t>(), rb, q.as<float>(), dh, (int)G, s.as<float>(), n, (int)p0, (int)p1, (int)dh);
    return r.array(s);
  }
  if (op == "to_f16") {
    const Array& x = array_arg(args, 1, 'f', 1);
    Array y = new_array('h', {(int64_t)x.dim(0)});
    kt.to_f16(x.as<float>(), y.as<fp16_t>(), (int)x.dim(0));
    return r.array(y);
  }
  if (op == "max") return r.real(kt.max(array_arg(args, 1, 'f', 1).as<float>(), (int)args.at(1).a.dim(0)));
  if (op == "exp_sum") {  // (variant, s, m, scale) -> (exp values, sum)
    Array y = array_arg(args, 1, 'f', 1);
    const float sum = kt.exp_sum(y.as<float>(), (int)y.dim(0), (float)F(args, 2), (float)F(args, 3));
    r.array(y);
    return r.real(sum);
  }
  if (op == "axpy") {  // (variant, a, x, y) -> y + a x
    const Array& x = array_arg(args, 2, 'f', 1);
    Array y = array_arg(args, 3, 'f', 1);
    same_len(x.dim(0), y.dim(0), "axpy");
    kt.axpy((float)F(args, 1), x.as<float>(), y.as<float>(), (int)x.dim(0));
    return r.array(y);
  }
  if (op == "scale") {  // (variant, a, y) -> a y
    Array y = array_arg(args, 2, 'f', 1);
    kt.scale((float)F(args, 1), y.as<float>(), (int)y.dim(0));
    return r.array(y);
  }
  fail("unknown op " + op);
}

}  // namespace

int main() {
  for (;;) {
    std::string op;
    std::vector<Arg> args;
    try {
      op = read_str();
      const uint32_t n = read_pod<uint32_t>();
      for (uint32_t i = 0; i < n; ++i) args.push_back(read_arg());
    } catch (const std::exception&) {
      return 0;  // the tests closed the pipe (or sent what no test sends: the server stops)
    }
    Reply r;
    uint8_t status = 0;
    std::string error;
    try {
      serve(op, args, r);
    } catch (const std::exception& e) {
      status = 1;
      error = e.what();
    }
    std::fwrite(&status, 1, 1, stdout);
    if (status) {
      const uint32_t len = (uint32_t)error.size();
      std::fwrite(&len, 4, 1, stdout);
      std::fwrite(error.data(), 1, len, stdout);
    } else {
      std::fwrite(&r.count, 4, 1, stdout);
      std::fwrite(r.buf.data(), 1, r.buf.size(), stdout);
    }
    std::fflush(stdout);
  }
}
