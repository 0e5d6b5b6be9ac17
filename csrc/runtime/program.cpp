// What a program means: its tensor table resolved against the bundle and every op validated
// against the schema (runtime/ops.def) and the tensor table, once, when the Program is made.
// Every message names the op or tensor. The backend is asked whether it runs each op.
#include <cstdlib>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include <sys/mman.h>
#include <unistd.h>

#include "runtime/backend.h"
#include "runtime/checked.h"
#include "runtime/program.h"
#include "runtime/threadpool.h"

namespace plm {

namespace {
// The whole pages of a bundle tensor [p, p + n) dropped from this process's resident set, once the
// Program has expanded it into memory of its own: the mapping is read-only and shared, so the page
// cache keeps them and a later read (another Program reading it in place) faults them back. Without
// this, expanding counted both the sparse bytes and the dense copy (peak RSS 813 MB against 608 for
// a dense int8 bundle of the same model, docs/performance.md).
void release_pages(const uint8_t* p, size_t n) {
  static const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t lo = ((uintptr_t)p + page - 1) / page * page, hi = ((uintptr_t)p + n) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);  // advice: a failure changes nothing
}
}  // namespace


namespace {
// Most KV layers a program may declare (the Python loader allows 4096).
constexpr int64_t kMaxLayers = int64_t(1) << 16;
}  // namespace

Program::Impl::Impl() = default;
Program::Impl::~Impl() = default;

std::string shape_str(const Tensor& t) {
  return "[" + (t.rows == ROWS_T ? std::string("T") : t.rows == ROWS_S ? std::string("S") : std::to_string(t.rows)) +
         ", " + std::to_string(t.cols) + "]";
}

void Program::Impl::resolve_tensor(size_t id) {
  TensorDesc& d = descs[id];
  Tensor t;
  t.kind = d.kind;
  t.rows = d.rows;
  t.cols = d.cols;
  t.label = "tensor " + std::to_string(id);
  auto fail = [&](const std::string& msg) -> void {
    throw std::invalid_argument(t.label + ": " + msg);
  };
  auto check_dims = [&](bool allow_rows_t) {
    bool rows_ok = (d.rows >= 1 && d.rows <= kMaxDim) || (allow_rows_t && (d.rows == ROWS_T || d.rows == ROWS_S));
    if (!rows_ok || d.cols < 1 || d.cols > kMaxDim)
      fail("bad shape [" + std::to_string(d.rows) + ", " + std::to_string(d.cols) + "]");
  };
  switch (d.kind) {
    case TensorKind::WEIGHT: {
      if (!d.weight_name.empty()) t.label += " ('" + d.weight_name + "')";
      DType dtype;
      const uint8_t* data;
      size_t nbytes;
      if (d.inline_dtype >= 0) {
        if (!dtype_valid((uint32_t)d.inline_dtype))
          throw UnsupportedError(t.label + ": unknown dtype id " + std::to_string(d.inline_dtype));
        check_dims(false);
        dtype = (DType)d.inline_dtype;
        data = d.inline_data.data();
        nbytes = d.inline_data.size();
      } else {
        if (!bundle) fail("weight '" + d.weight_name + "' needs a bundle (none given)");
        const Bundle::Tensor* bt = bundle->find(d.weight_name);
        if (!bt) throw BundleError(t.label + ": bundle " + bundle->path() + " has no tensor '" +
                                   d.weight_name + "'");
        if (d.rows == 0 && d.cols == 0) {  // shape taken from the bundle
          t.rows = bt->rows;
          t.cols = bt->cols;
        } else if (d.rows != bt->rows || d.cols != bt->cols) {
          fail("expected shape [" + std::to_string(d.rows) + ", " + std::to_string(d.cols) +
               "] but the bundle holds [" + std::to_string(bt->rows) + ", " +
               std::to_string(bt->cols) + "]");
        }
        d.rows = t.rows;
        d.cols = t.cols;
        check_dims(false);
        dtype = bt->dtype;
        data = bt->data;
        nbytes = bt->nbytes;
      }
      if (t.cols % traits(dtype).block_elems != 0)
        throw UnsupportedError(t.label + ": " + traits(dtype).name + " needs cols % " +
                               std::to_string(traits(dtype).block_elems) + " == 0, got " +
                               std::to_string(t.cols));
      if (needs_16_rows(dtype) && t.rows % kX16Rows != 0)
        throw UnsupportedError(t.label + ": " + traits(dtype).name + " needs rows % 16 == 0, got " +
                               std::to_string(t.rows));
      if (is_variable(dtype)) {  // the bundle reader checked a bundle's layout; inline bytes are checked here
        std::string why;
        if (d.inline_dtype >= 0 && bitmask_check(data, nbytes, t.rows, t.cols, &why) < 0)
          fail(std::string(traits(dtype).name) + ": " + why);
      } else {
        // rows x row bytes (+ row scales) in checked arithmetic before tensor_bytes forms it
        checked_add(checked_mul(t.rows, (int64_t)row_bytes(dtype, t.cols), t.label + " bytes"),
                    checked_mul(t.rows, (int64_t)sizeof(float), t.label + " bytes"), t.label + " bytes");
        size_t need = tensor_bytes(dtype, t.rows, t.cols);
        if (nbytes != need)
          fail(std::string(traits(dtype).name) + " [" + std::to_string(t.rows) + ", " +
               std::to_string(t.cols) + "] takes " + std::to_string(need) + " bytes, got " +
               std::to_string(nbytes));
      }
      const float* row_scales = nullptr;
      if (dtype == DType::I8_BITMASK) row_scales = bitmask_scales(data, t.rows);
      else if (has_row_scales(dtype)) row_scales = reinterpret_cast<const float*>(data + (size_t)t.rows * row_bytes(dtype, t.cols));
      if (is_sparse(dtype) && !backend->sparse_in_place(dtype)) {
        // No sparse kernel here, or one slower than dense (BackendOptions::sparse_layout): dense
        // Q4_0_X16 / I8_X16 (I8 for a bitmask tensor whose rows are not whole groups of 16) once,
        // rather than every row expanded at every step; the bundle's pages are dropped. 2:4: 1.5x /
        // 1.7x the bytes.
        const DType base = sparse_dense(dtype);
        const DType to = base == DType::Q4_0 ? DType::Q4_0_X16 : t.rows % kX16Rows == 0 ? DType::I8_X16 : DType::I8;
        const size_t dense = tensor_bytes(to, t.rows, t.cols);
        std::unique_ptr<uint8_t, void (*)(void*)> mem(static_cast<uint8_t*>(std::aligned_alloc(64, (dense + 63) / 64 * 64)),
                                                      std::free);
        if (!mem) throw std::bad_alloc();
        uint8_t* out = mem.get();
        expanded.push_back(std::move(mem));
        const size_t rb = row_bytes(base, t.cols);
        std::vector<uint8_t> row(rb);
        for (int64_t n = 0; n < t.rows; ++n) {
          if (to == base) {  // row-major I8: straight into place
            sparse_gather_row(dtype, data, t.rows, t.cols, n, out + (size_t)n * rb);
          } else {
            sparse_gather_row(dtype, data, t.rows, t.cols, n, row.data());
            x16_scatter_row(to, row.data(), t.cols, n, out);
          }
        }
        if (row_scales) {  // after the codes in the dense types
          float* scales = reinterpret_cast<float*>(out + (size_t)t.rows * row_bytes(to, t.cols));
          std::memcpy(scales, row_scales, (size_t)t.rows * sizeof(float));
          row_scales = scales;
        }
        if (d.inline_dtype < 0) release_pages(data, nbytes);
        dtype = to;
        data = out;
      }
      t.weight.dtype = dtype;
      t.weight.rows = t.rows;
      t.weight.cols = t.cols;
      t.weight.data = data;
      t.weight.row_stride = row_bytes(dtype, t.cols);  // 0 for I8_BITMASK: its rows are found by pointer
      t.weight.row_scales = row_scales;
      if (dtype == DType::F32) t.f32 = reinterpret_cast<const float*>(data);
      break;
    }
    case TensorKind::CONST: {
      check_dims(false);
      if ((int64_t)d.const_data.size() != d.rows * d.cols)
        fail("const data has " + std::to_string(d.const_data.size()) + " values, shape needs " +
             std::to_string(d.rows * d.cols));
      t.f32 = d.const_data.data();
      t.weight = {DType::F32, t.rows, t.cols, reinterpret_cast<const uint8_t*>(t.f32),
                  (size_t)t.cols * sizeof(float), nullptr};
      break;
    }
    case TensorKind::ARENA: {
      check_dims(true);
      t.arena_offset = d.arena_offset;
      if (d.arena_offset < 0 || d.arena_offset % 64 != 0)
        fail("arena offset " + std::to_string(d.arena_offset) + " is not a multiple of 64");
      const int64_t end = checked_add(
          d.arena_offset, checked_product({max_rows(t), d.cols, (int64_t)sizeof(float)}, t.label + " bytes"),
          t.label + " end");
      if (end > arena_bytes)
        fail("[" + std::to_string(max_rows(t)) + ", " + std::to_string(d.cols) +
             "] at arena offset " + std::to_string(d.arena_offset) + " ends at byte " +
             std::to_string(end) + ", past arena_bytes " + std::to_string(arena_bytes));
      break;
    }
    case TensorKind::TOKENS:
      t.rows = ROWS_T;
      t.cols = 1;
      break;
    default:
      fail("unknown tensor kind " + std::to_string((int)d.kind));
  }
  tensors[id] = std::move(t);
}

namespace {

// Checks one op against the tensor table; every message names the op.
class OpChecker {
 public:
  OpChecker(const Program::Impl& p, size_t index)
      : p_(p), op_(p.ops[index]),
        prefix_("op " + std::to_string(index) + " (" + op_name(op_.code) + "): ") {}

  [[noreturn]] void fail(const std::string& msg) const {
    throw std::invalid_argument(prefix_ + msg);
  }
  [[noreturn]] void unsupported(const std::string& msg) const {
    throw UnsupportedError(prefix_ + msg);
  }

  // The op's inputs, outputs and params against its schema (ops.def). Omitted params that have
  // defaults are filled in, so the op holds all its params after this.
  void schema(OpDesc& op) const {
    const OpSpec& spec = op_spec(op.code);
    const size_t n_in = op.inputs.size(), n_out = op.outputs.size();
    const bool in_ok = spec.max_inputs < 0 ? n_in >= (size_t)spec.min_inputs : n_in == (size_t)spec.max_inputs;
    const bool out_ok = spec.n_outputs < 0 ? n_out >= 1 : n_out == (size_t)spec.n_outputs;
    if (!in_ok || !out_ok)
      fail("expects " + count(spec.max_inputs < 0 ? spec.min_inputs : spec.max_inputs, spec.max_inputs < 0) +
           " inputs and " + count(spec.n_outputs < 0 ? 1 : spec.n_outputs, spec.n_outputs < 0) +
           " outputs, got " + std::to_string(n_in) + " and " + std::to_string(n_out));
    auto required = [](const std::vector<const ParamSpec*>& ps) {
      size_t n = 0;
      while (n < ps.size() && !ps[n]->has_default) ++n;
      return n;
    };
    const size_t i_lo = required(spec.ints), f_lo = required(spec.floats);
    if (op.iparams.size() < i_lo || op.iparams.size() > spec.ints.size() || op.fparams.size() < f_lo ||
        op.fparams.size() > spec.floats.size())
      fail("expects " + range(i_lo, spec.ints.size()) + " int and " + range(f_lo, spec.floats.size()) +
           " float params, got " + std::to_string(op.iparams.size()) + " and " + std::to_string(op.fparams.size()));
    for (size_t i = op.iparams.size(); i < spec.ints.size(); ++i)
      op.iparams.push_back((int64_t)spec.ints[i]->default_value);
    for (size_t i = op.fparams.size(); i < spec.floats.size(); ++i)
      op.fparams.push_back((float)spec.floats[i]->default_value);
  }

  const Tensor& tensor(int id, const char* role) const {
    if (id < 0 || id >= (int)p_.tensors.size())
      fail(std::string(role) + " tensor id " + std::to_string(id) + " is out of range");
    return p_.tensors[id];
  }
  // f32 activations in the arena.
  const Tensor& act(int id, const char* role) const {
    const Tensor& t = tensor(id, role);
    if (t.kind != TensorKind::ARENA) fail(std::string(role) + " " + t.label + " must be an arena tensor");
    return t;
  }
  // An f32 [1, cols] parameter (norm weight, bias): CONST or an F32 WEIGHT.
  const Tensor& f32_row(int id, const char* role, int64_t cols) const {
    const Tensor& t = tensor(id, role);
    if (!t.f32)
      fail(std::string(role) + " " + t.label + " must be f32 (a const or an f32 weight)");
    if (t.rows != 1 || t.cols != cols)
      fail(std::string(role) + " " + t.label + " has shape " + shape_str(t) + ", expected [1, " +
           std::to_string(cols) + "]");
    return t;
  }
  // A matmul / embedding weight: WEIGHT of any dtype, or CONST (f32).
  const Tensor& weight(int id, const char* role) const {
    const Tensor& t = tensor(id, role);
    if (t.kind != TensorKind::WEIGHT && t.kind != TensorKind::CONST)
      fail(std::string(role) + " " + t.label + " must be a weight or a const");
    return t;
  }
  void same_shape(const Tensor& a, const Tensor& b, const char* what) const {
    if (a.rows != b.rows || a.cols != b.cols)
      fail(std::string(what) + ": " + a.label + " " + shape_str(a) + " vs " + b.label + " " + shape_str(b));
  }
  void same_rows(const Tensor& a, const Tensor& b, const char* what) const {
    if (a.rows != b.rows)
      fail(std::string(what) + ": rows of " + a.label + " " + shape_str(a) + " vs " + b.label + " " +
           shape_str(b));
  }
  // A weight multiplied by x [R, K]. (Whether the backend runs its dtype: Backend::supports.)
  void matmul_weight(const Tensor& w, int64_t k) const {
    if (w.cols != k)
      fail(w.label + " " + shape_str(w) + " does not match x with K = " + std::to_string(k));
  }
  // A float param that must be finite and > 0; the message names it as the schema does.
  float positive(FloatParam p) const {
    const float v = param(op_, p);
    if (!(v > 0.f) || !std::isfinite(v))
      fail(std::string(op_spec(op_.code).floats[(size_t)p.index]->name) + " must be finite and > 0");
    return v;
  }

  // act_levels of a matmul op (ops.def): 0 (the program's option), 1 or 2.
  void act_levels(IntParam p) const {
    const int64_t v = param(op_, p);
    if (v < 0 || v > 2) fail("act_levels must be 0, 1 or 2, got " + std::to_string(v));
  }

  static std::string count(int n, bool or_more) { return std::to_string(n) + (or_more ? "+" : ""); }
  static std::string range(size_t lo, size_t hi) {
    return lo == hi ? std::to_string(lo) : std::to_string(lo) + ".." + std::to_string(hi);
  }

 private:
  const Program::Impl& p_;
  const OpDesc& op_;
  std::string prefix_;
};

}  // namespace

void Program::Impl::validate_op(size_t index) {
  OpChecker c(*this, index);
  c.schema(ops[index]);
  const OpDesc& op = ops[index];
  const auto& in = op.inputs;
  const auto& out = op.outputs;

  switch (op.code) {
    case OpCode::embed: {
      const Tensor& e = c.weight(in[0], "embedding");
      const Tensor& tok = c.tensor(in[1], "tokens");
      if (tok.kind != TensorKind::TOKENS) c.fail("input 1 must be the tokens tensor");
      const Tensor& y = c.act(out[0], "output");
      if (y.rows != ROWS_T || y.cols != e.cols)
        c.fail("output " + y.label + " " + shape_str(y) + ", expected [T, " +
               std::to_string(e.cols) + "]");
      vocab = std::min(vocab, e.rows);
      break;
    }
    case OpCode::rms_norm: {
      const Tensor& x = c.act(in[0], "x");
      c.f32_row(in[1], "norm weight", x.cols);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive(params::rms_norm::eps);
      break;
    }
    case OpCode::add:
    case OpCode::swiglu:
    case OpCode::geglu: {
      const Tensor& a = c.act(in[0], "input 0");
      c.same_shape(a, c.act(in[1], "input 1"), "input shapes");
      c.same_shape(a, c.act(out[0], "output"), "output shape");
      break;
    }
    case OpCode::add_rms_norm: {
      const Tensor& a = c.act(in[0], "a");
      c.same_shape(a, c.act(in[1], "b"), "input shapes");
      c.f32_row(in[2], "norm weight", a.cols);
      c.same_shape(a, c.act(out[0], "sum output"), "sum output shape");
      c.same_shape(a, c.act(out[1], "norm output"), "norm output shape");
      c.positive(params::add_rms_norm::eps);
      break;
    }
    case OpCode::matmul:
    case OpCode::matmul_multi: {
      if (in.size() < 3 || in.size() % 2 != 1 || out.size() != (in.size() - 1) / 2)
        c.fail("expects inputs [x, W1, b1, W2, b2, ...] and one output per weight, got " +
               std::to_string(in.size()) + " inputs and " + std::to_string(out.size()) +
               " outputs");
      c.act_levels(act_levels_param(op.code));
      const Tensor& x = c.act(in[0], "x");
      for (size_t j = 0; j < out.size(); ++j) {
        const Tensor& w = c.weight(in[1 + 2 * j], "weight");
        c.matmul_weight(w, x.cols);
        if (in[2 + 2 * j] != -1) c.f32_row(in[2 + 2 * j], "bias", w.rows);
        const Tensor& y = c.act(out[j], "output");
        c.same_rows(x, y, "output rows");
        if (y.cols != w.rows)
          c.fail("output " + y.label + " " + shape_str(y) + " does not match " + w.label +
                 " " + shape_str(w));
      }
      break;
    }
    case OpCode::matmul_swiglu:
    case OpCode::matmul_geglu: {
      c.act_levels(act_levels_param(op.code));
      const Tensor& x = c.act(in[0], "x");
      const Tensor& wg = c.weight(in[1], "gate weight");
      const Tensor& wu = c.weight(in[2], "up weight");
      c.matmul_weight(wg, x.cols);
      c.matmul_weight(wu, x.cols);
      if (wg.rows != wu.rows) c.same_shape(wg, wu, "gate and up weights");
      const Tensor& y = c.act(out[0], "output");
      c.same_rows(x, y, "output rows");
      if (y.cols != wg.rows)
        c.fail("output " + y.label + " " + shape_str(y) + " does not match " + wg.label +
               " " + shape_str(wg));
      break;
    }
    case OpCode::rope: {
      const Tensor& x = c.act(in[0], "x");
      const Tensor& table = c.tensor(in[1], "table");
      if (table.kind != TensorKind::CONST || !table.f32)
        c.fail("table " + table.label + " must be a const");
      const int64_t n_heads = param(op, params::rope::n_heads), head_dim = param(op, params::rope::head_dim),
                    rope_dim = param(op, params::rope::rope_dim);
      if (n_heads < 1 || head_dim < 1 || n_heads > x.cols || head_dim > x.cols || n_heads * head_dim != x.cols)
        c.fail("n_heads " + std::to_string(n_heads) + " x head_dim " + std::to_string(head_dim) +
               " != x cols " + std::to_string(x.cols));
      if (rope_dim < 2 || rope_dim % 2 != 0 || rope_dim > head_dim)
        c.fail("rope_dim " + std::to_string(rope_dim) + " must be even and in 2..head_dim");
      if (table.cols != rope_dim)
        c.fail("table " + table.label + " has " + std::to_string(table.cols) +
               " cols, rope_dim is " + std::to_string(rope_dim));
      if (x.rows != ROWS_T) c.fail("x must have T rows (positions come from the row index)");
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      rope_positions = std::min(rope_positions, table.rows);
      break;
    }
    case OpCode::attention: {
      namespace a = params::attention;
      const int64_t layer = param(op, a::layer), hq = param(op, a::n_heads), hkv = param(op, a::n_kv_heads),
                    dh = param(op, a::head_dim), window = param(op, a::window);
      const float softcap = param(op, a::softcap);
      if (window < 0) c.fail("window must be >= 0 (0 = full attention)");
      const int64_t causal = param(op, a::causal);
      if (causal != 0 && causal != 1) c.fail("causal must be 0 or 1");
      if (!(softcap >= 0.f) || !std::isfinite(softcap)) c.fail("softcap must be finite and >= 0");
      if (layer < 0 || layer >= kv.n_layers)
        c.fail("layer " + std::to_string(layer) + " outside the KV cache's " +
               std::to_string(kv.n_layers) + " layers");
      if (hkv != kv.n_kv_heads || dh != kv.head_dim)
        c.fail("n_kv_heads " + std::to_string(hkv) + " / head_dim " + std::to_string(dh) +
               " differ from the KV cache's " + std::to_string(kv.n_kv_heads) + " / " +
               std::to_string(kv.head_dim));
      if (hq < 1 || hq % hkv != 0)
        c.fail("n_heads " + std::to_string(hq) + " is not a multiple of n_kv_heads " +
               std::to_string(hkv));
      if (hq > kMaxDim / dh) c.fail("n_heads " + std::to_string(hq) + " x head_dim " + std::to_string(dh) +
                                     " exceeds " + std::to_string(kMaxDim));
      // The tasks of one call (rows x KV heads, split into chunks) are counted in an int.
      if (checked_mul(max_tokens, hkv, "attention tasks") > kMaxDim / 2)
        c.fail("max_tokens " + std::to_string(max_tokens) + " x n_kv_heads " + std::to_string(hkv) +
               " is too many attention tasks");
      const Tensor& q = c.act(in[0], "q");
      const Tensor& k = c.act(in[1], "k");
      const Tensor& v = c.act(in[2], "v");
      const Tensor& o = c.act(out[0], "output");
      if (q.rows != ROWS_T) c.fail("q must have T rows");
      if (q.cols != hq * dh) c.fail("q " + shape_str(q) + " is not [T, n_heads*head_dim]");
      if (k.cols != hkv * dh) c.fail("k " + shape_str(k) + " is not [T, n_kv_heads*head_dim]");
      c.same_shape(k, v, "k and v");
      c.same_shape(q, o, "output shape");
      c.same_rows(q, k, "q and k rows");
      c.positive(a::scale);
      if (layer_window[layer] >= 0 && layer_window[layer] != window)
        c.fail("layer " + std::to_string(layer) + " already has an attention op with window " +
               std::to_string(layer_window[layer]) + ", this one has " + std::to_string(window));
      layer_window[layer] = window;
      has_attention = true;
      if (causal) {  // where its keys come from, for State::kv_shift
        const int w = last_writer[(size_t)in[1]];
        KeyRope rope;
        if (w >= 0 && ops[(size_t)w].code == OpCode::rope && param(ops[(size_t)w], params::rope::n_heads) == hkv &&
            param(ops[(size_t)w], params::rope::head_dim) == dh)
          rope = {ops[(size_t)w].inputs[1], param(ops[(size_t)w], params::rope::rope_dim)};
        if (rope.table < 0 && shift_unsupported.empty())
          shift_unsupported = "the keys of layer " + std::to_string(layer) +
                              " carry no rotary position (a model with learned or no positions): its KV cache "
                              "cannot be moved to other positions";
        else if (seen_rope_[layer] && (layer_rope[layer].table != rope.table || layer_rope[layer].rope_dim != rope.rope_dim)
                 && shift_unsupported.empty())
          shift_unsupported = "layer " + std::to_string(layer) + " has attention ops with differently rotated keys";
        layer_rope[layer] = rope;
        seen_rope_[layer] = true;
      } else if (shift_unsupported.empty()) {
        shift_unsupported = "an encoder (attention that is not causal) has no context to shift";
      }
      break;
    }
    case OpCode::layer_norm: {
      const Tensor& x = c.act(in[0], "x");
      c.f32_row(in[1], "norm weight", x.cols);
      c.f32_row(in[2], "norm bias", x.cols);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive(params::layer_norm::eps);
      break;
    }
    case OpCode::pos_embed: {
      const Tensor& x = c.act(in[0], "x");
      const Tensor& table = c.weight(in[1], "position table");
      if (x.rows != ROWS_T) c.fail("x must have T rows (positions come from the row index)");
      if (table.cols != x.cols)
        c.fail("position table " + table.label + " " + shape_str(table) +
               " does not match x " + shape_str(x));
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      embed_positions = std::min(embed_positions, table.rows);
      break;
    }
    case OpCode::head_rms_norm: {
      const Tensor& x = c.act(in[0], "x");
      const int64_t n_heads = param(op, params::head_rms_norm::n_heads),
                    head_dim = param(op, params::head_rms_norm::head_dim);
      if (n_heads < 1 || head_dim < 1 || n_heads > x.cols || head_dim > x.cols || n_heads * head_dim != x.cols)
        c.fail("n_heads " + std::to_string(n_heads) + " x head_dim " + std::to_string(head_dim) +
               " != x cols " + std::to_string(x.cols));
      c.f32_row(in[1], "norm weight", head_dim);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive(params::head_rms_norm::eps);
      break;
    }
    case OpCode::scale:
    case OpCode::softcap: {
      c.same_shape(c.act(in[0], "x"), c.act(out[0], "output"), "output shape");
      if (op.code == OpCode::softcap) c.positive(params::softcap::cap);
      else if (!std::isfinite(param(op, params::scale::s))) c.fail("s must be finite");
      break;
    }
    case OpCode::gelu: {
      c.same_shape(c.act(in[0], "x"), c.act(out[0], "output"), "output shape");
      const int64_t exact = param(op, params::gelu::exact);
      if (exact != 0 && exact != 1) c.fail("exact must be 0 or 1");
      break;
    }
    case OpCode::take_last: {
      const Tensor& x = c.act(in[0], "x");
      const Tensor& y = c.act(out[0], "output");
      if (x.rows != ROWS_T) c.fail("x must have T rows");
      // One row per sequence; a fixed [1, D] output only in a program of one sequence per step.
      if (!(y.rows == ROWS_S || (y.rows == 1 && max_seqs == 1)) || y.cols != x.cols)
        c.fail("output " + y.label + " " + shape_str(y) + ", expected [S, " + std::to_string(x.cols) +
               "] (one row per sequence" + (max_seqs == 1 ? ", or [1, " + std::to_string(x.cols) + "]" : std::string()) +
               ")");
      break;
    }
    default:
      c.unsupported("unknown op code " + std::to_string((int)op.code));
  }

  // The backend runs it? (Its kernels for the weights' dtypes, its limits on shapes.)
  std::vector<const Tensor*> operands;
  for (int id : in) operands.push_back(id < 0 ? nullptr : &tensors[id]);
  const std::string why_not = backend->supports(op.code, operands);
  if (!why_not.empty()) c.unsupported(why_not);

  // Arena overlap: an output may share memory with an input only where the op allows it in
  // place (the schema's in-place pairs), and then exactly; outputs never overlap each other.
  const std::vector<InplacePair>& aliases = op_spec(op.code).inplace;
  auto range_of = [&](int id) {
    const Tensor& t = tensors[id];
    return std::make_pair(t.arena_offset, t.arena_offset + max_rows(t) * t.cols * 4);
  };
  for (size_t o = 0; o < out.size(); ++o) {
    auto ro = range_of(out[o]);
    for (size_t o2 = o + 1; o2 < out.size(); ++o2) {
      auto r2 = range_of(out[o2]);
      if (ro.first < r2.second && r2.first < ro.second)
        c.fail("outputs " + tensors[out[o]].label + " and " + tensors[out[o2]].label + " overlap");
    }
    for (size_t i = 0; i < in.size(); ++i) {
      if (in[i] < 0 || tensors[in[i]].kind != TensorKind::ARENA) continue;
      auto ri = range_of(in[i]);
      if (!(ro.first < ri.second && ri.first < ro.second)) continue;
      const bool allowed = std::any_of(aliases.begin(), aliases.end(), [&](const InplacePair& a) {
        return a.output == (int)o && a.input == (int)i;
      });
      if (!allowed || ro != ri)
        c.fail("output " + tensors[out[o]].label + " overlaps input " + tensors[in[i]].label +
               (allowed ? " without aliasing it exactly" : " and this op does not work in place"));
    }
  }
}

Program::Program(std::shared_ptr<Bundle> bundle, std::vector<TensorDesc> tensors,
                 std::vector<OpDesc> ops, int64_t arena_bytes, int max_tokens, KVConfig kv,
                 int output_tensor, int n_threads, const std::string& kernels,
                 const std::string& activations, int max_seqs, const std::string& sparse_layout)
    : impl_(std::make_unique<Impl>()) {
  Impl& p = *impl_;
  p.options = BackendOptions{kernels, activations, n_threads, sparse_layout};
  p.backend = make_backend(p, p.options);  // checks kernels and activations
  if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
  if (max_seqs < 1 || max_seqs > std::min(max_tokens, kMaxStepSeqs))
    throw std::invalid_argument("max_seqs must be in 1.." + std::to_string(std::min(max_tokens, kMaxStepSeqs)) +
                                " (at most max_tokens), got " + std::to_string(max_seqs));
  if (arena_bytes < 0) throw std::invalid_argument("arena_bytes must be >= 0");
  if (n_threads < 1 || n_threads > ThreadPool::kMaxThreads)
    throw std::invalid_argument("n_threads must be in 1.." + std::to_string(ThreadPool::kMaxThreads));
  if (kv.n_layers < 0 || kv.n_kv_heads < 0 || kv.head_dim < 0 ||
      (kv.n_layers > 0 && (kv.n_kv_heads < 1 || kv.head_dim < 1)))
    throw std::invalid_argument("bad KV config (n_layers, n_kv_heads, head_dim)");
  if (kv.n_layers > kMaxLayers || (int64_t)kv.n_kv_heads * kv.head_dim > kMaxDim)
    throw std::invalid_argument("KV config too large: " + std::to_string(kv.n_layers) + " layers (at most " +
                                std::to_string(kMaxLayers) + "), n_kv_heads x head_dim " +
                                std::to_string((int64_t)kv.n_kv_heads * kv.head_dim) + " (at most " +
                                std::to_string(kMaxDim) + ")");
  p.bundle = std::move(bundle);
  p.descs = std::move(tensors);
  p.ops = std::move(ops);
  p.arena_bytes = arena_bytes;
  p.max_tokens = max_tokens;
  p.max_seqs = max_seqs;
  p.owner = this;
  p.kv = kv;
  p.layer_window.assign((size_t)kv.n_layers, -1);
  p.layer_rope.assign((size_t)kv.n_layers, {});
  p.seen_rope_.assign((size_t)kv.n_layers, false);
  p.n_threads = n_threads;

  p.tensors.resize(p.descs.size());
  int n_token_tensors = 0;
  for (size_t i = 0; i < p.descs.size(); ++i) {
    p.resolve_tensor(i);
    n_token_tensors += p.tensors[i].kind == TensorKind::TOKENS;
  }
  if (n_token_tensors > 1) throw std::invalid_argument("more than one tokens tensor");
  p.last_writer.assign(p.descs.size(), -1);
  for (size_t i = 0; i < p.ops.size(); ++i) {
    p.validate_op(i);
    for (int t : p.ops[i].outputs)
      if (t >= 0) p.last_writer[(size_t)t] = (int)i;
  }
  p.last_writer = {};
  p.seen_rope_ = {};
  if (!p.has_attention && p.shift_unsupported.empty()) p.shift_unsupported = "the program has no attention";
  p.backend->prepare();

  if (output_tensor < 0 || output_tensor >= (int)p.tensors.size() ||
      p.tensors[output_tensor].kind != TensorKind::ARENA)
    throw std::invalid_argument("output tensor " + std::to_string(output_tensor) +
                                " must be an arena tensor");
  p.output = output_tensor;
  p.step.tokens.resize((size_t)max_tokens);
  p.step.row_pos.resize((size_t)max_tokens);
  p.step.row_seq.resize((size_t)max_tokens);
  p.step.seqs.resize((size_t)max_seqs);
}

Program::~Program() = default;
int Program::max_tokens() const { return impl_->max_tokens; }
int Program::n_threads() const { return impl_->n_threads; }
int64_t Program::arena_bytes() const { return impl_->arena_bytes; }
const char* Program::kernel_name() const { return impl_->backend->variant(); }
const char* Program::activations() const { return impl_->options.activations.c_str(); }
int Program::sparse_expanded() const { return (int)impl_->expanded.size(); }
int64_t Program::output_cols() const { return impl_->tensors[impl_->output].cols; }
const std::vector<int64_t>& Program::layer_windows() const { return impl_->layer_window; }
int Program::max_seqs() const { return impl_->max_seqs; }
const std::string& Program::shift_unsupported() const { return impl_->shift_unsupported; }
int64_t Program::output_rows(int n_rows, int n_out) const {
  return impl_->rows_at(impl_->tensors[impl_->output], n_rows, n_out);
}

}  // namespace plm
