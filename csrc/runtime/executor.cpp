// Executor: validates a planned op list once (Program), then runs it with no
// allocation and no Python per call (State::run). Op semantics: executor.h.
#include "runtime/executor.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>

#include "runtime/kv_cache.h"
#include "runtime/threadpool.h"

namespace plm {

namespace {

struct OpInfo {
  const char* name;
  OpCode code;
};
constexpr OpInfo kOps[] = {
    {"embed", OpCode::EMBED},
    {"rms_norm", OpCode::RMS_NORM},
    {"add", OpCode::ADD},
    {"matmul", OpCode::MATMUL},
    {"matmul_multi", OpCode::MATMUL_MULTI},
    {"matmul_swiglu", OpCode::MATMUL_SWIGLU},
    {"swiglu", OpCode::SWIGLU},
    {"add_rms_norm", OpCode::ADD_RMS_NORM},
    {"rope", OpCode::ROPE},
    {"attention", OpCode::ATTENTION},
    {"take_last", OpCode::TAKE_LAST},
    {"layer_norm", OpCode::LAYER_NORM},
    {"pos_embed", OpCode::POS_EMBED},
    {"gelu", OpCode::GELU},
    {"head_rms_norm", OpCode::HEAD_RMS_NORM},
    {"geglu", OpCode::GEGLU},
    {"matmul_geglu", OpCode::MATMUL_GEGLU},
    {"scale", OpCode::SCALE},
    {"softcap", OpCode::SOFTCAP},
};

const char* op_name(OpCode code) {
  for (const auto& op : kOps)
    if (op.code == code) return op.name;
  return "?";
}

// Largest row or column count we accept: the kernels take counts as int.
constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
// Most sequences one step may hold (Program's max_seqs; vLLM's default max_num_seqs).
constexpr int kMaxStepSeqs = 256;
// Most KV layers a program may declare (the Python loader allows 4096).
constexpr int64_t kMaxLayers = int64_t(1) << 16;

// Sizes computed from a program's parameters (which a hand-built program, or a hostile bundle
// past the Python checks, controls) use checked arithmetic: an overflow is an error naming the
// size, never a wrapped value that would size a buffer too small.
int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r))
    throw std::invalid_argument(what + ": " + std::to_string(a) + " x " + std::to_string(b) +
                                " overflows 64 bits");
  return r;
}
int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r))
    throw std::invalid_argument(what + ": " + std::to_string(a) + " + " + std::to_string(b) +
                                " overflows 64 bits");
  return r;
}
int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what) {
  int64_t r = 1;
  for (int64_t f : factors) r = checked_mul(r, f, what);
  return r;
}

}  // namespace

OpCode opcode_from_name(const std::string& name) {
  for (const auto& op : kOps)
    if (name == op.name) return op.code;
  throw UnsupportedError("unknown executor op '" + name + "'");
}

// ---------------------------------------------------------------------------
// Program

namespace {

// A tensor of the table, resolved to what the ops need at run time.
struct Tensor {
  TensorKind kind;
  int64_t rows = 0, cols = 0;        // ARENA rows may be ROWS_T
  int64_t arena_offset = 0;
  const float* f32 = nullptr;        // CONST data, or the data of an F32 WEIGHT
  kernels::WeightView weight{};      // WEIGHT, and CONST seen as an f32 weight
  std::string label;                 // for messages: "tensor 3 ('blk.0.wq')"
};

}  // namespace

// What one step needs besides a session's KV cache: the thread pool, the arena (activations,
// planned for max_tokens rows) and the ops' scratch. One per Program, shared by all its States and
// used by one step at a time (Program::Impl::step_mutex); made by the first State (a Program that
// never runs starts no threads). Sizes: state_sizes, reserve_workspace below.
// One sequence of a batched step: its KV cache and its rows (run_batch).
struct SeqSlot {
  KVCache* kv = nullptr;
  int64_t pos0 = 0;    // position of its first row
  int n_tokens = 0;
  int first_row = 0;   // its first row in the step
};

struct Workspace {
  ThreadPool pool;
  // A step's rows and sequences, filled by run_batch: [max_tokens] and [max_seqs].
  std::vector<int32_t> tokens;
  std::vector<int64_t> row_pos;
  std::vector<int32_t> row_seq;
  std::vector<SeqSlot> seqs;
  LazyBuffer arena;
  LazyBuffer act_q;      // [max_tokens][max_quant_k / 32] BlockQ8A, or BlockQ8A2 (act2)
  LazyBuffer up;         // [max_tokens][max_swiglu_f] f32: matmul_swiglu's up projection
  LazyBuffer scores;     // [n_threads][max_group][scores_context] f32: attention scores
  LazyBuffer partials;   // attention split over positions: [slots][2 + head_dim] f32
  LazyBuffer pos_rows;   // [n_threads][max_pos_cols] f32: pos_embed's dequantized rows
  int scores_context = 0;  // the largest max_context of the States made so far
  explicit Workspace(int n_threads) : pool(n_threads) {}
};

struct Program::Impl {
  const Program* owner = nullptr;
  std::shared_ptr<Bundle> bundle;
  const kernels::KernelTable* kt = nullptr;
  bool act2 = true;                  // two-level activations (BlockQ8A2), see executor.h
  std::vector<TensorDesc> descs;     // owns CONST and inline WEIGHT bytes
  std::vector<Tensor> tensors;
  std::vector<OpDesc> ops;
  int64_t arena_bytes = 0;
  int max_tokens = 0;
  int max_seqs = 1;
  KVConfig kv;
  int output = -1;
  int n_threads = 1;

  // Scratch a State must reserve, found while validating.
  int64_t max_quant_k = 0;           // largest K of a matmul with quantized activations
  int64_t max_swiglu_f = 0;          // largest F of a matmul_swiglu (its "up" half)
  bool has_attention = false;
  int64_t max_group = 0;             // largest n_heads / n_kv_heads of an attention op
  std::vector<int64_t> layer_window; // per KV layer: the attention window, 0 = full, -1 = unused
  int64_t vocab = std::numeric_limits<int64_t>::max();       // smallest embedding table
  int64_t rope_positions = std::numeric_limits<int64_t>::max();  // smallest rope table
  int64_t embed_positions = std::numeric_limits<int64_t>::max(); // smallest pos_embed table
  int64_t max_pos_cols = 0;          // widest pos_embed table (per-thread dequant scratch)

  // The shared workspace and the lock of a step on it (see executor.h: lock order). Mutable: a
  // Program is const to the States that run it; the workspace is their shared scratch.
  mutable std::mutex step_mutex;
  mutable std::unique_ptr<Workspace> workspace;  // made by the first State, under step_mutex

  int64_t rows_at(const Tensor& t, int n_rows, int n_seqs) const {
    return t.rows == ROWS_T ? n_rows : t.rows == ROWS_S ? n_seqs : t.rows;
  }
  int64_t max_rows(const Tensor& t) const {
    return t.rows == ROWS_T ? max_tokens : t.rows == ROWS_S ? max_seqs : t.rows;
  }

  void resolve_tensor(size_t id);
  void validate_op(size_t index);
};

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
      if (is_x16(dtype) && t.rows % kX16Rows != 0)
        throw UnsupportedError(t.label + ": " + traits(dtype).name + " needs rows % 16 == 0, got " +
                               std::to_string(t.rows));
      // rows x row bytes (+ row scales) in checked arithmetic before tensor_bytes forms it
      checked_add(checked_mul(t.rows, (int64_t)row_bytes(dtype, t.cols), t.label + " bytes"),
                  checked_mul(t.rows, (int64_t)sizeof(float), t.label + " bytes"), t.label + " bytes");
      size_t need = tensor_bytes(dtype, t.rows, t.cols);
      if (nbytes != need)
        fail(std::string(traits(dtype).name) + " [" + std::to_string(t.rows) + ", " +
             std::to_string(t.cols) + "] takes " + std::to_string(need) + " bytes, got " +
             std::to_string(nbytes));
      t.weight.dtype = dtype;
      t.weight.rows = t.rows;
      t.weight.cols = t.cols;
      t.weight.data = data;
      t.weight.row_stride = row_bytes(dtype, t.cols);
      t.weight.row_scales =
          has_row_scales(dtype) ? reinterpret_cast<const float*>(data + (size_t)t.rows * t.cols)
                                : nullptr;
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

  void arity(size_t n_in, size_t n_out) const {
    if (op_.inputs.size() != n_in || op_.outputs.size() != n_out)
      fail("expects " + std::to_string(n_in) + " inputs and " + std::to_string(n_out) +
           " outputs, got " + std::to_string(op_.inputs.size()) + " and " +
           std::to_string(op_.outputs.size()));
  }
  void params(size_t n_i, size_t n_f) const {
    if (op_.iparams.size() != n_i || op_.fparams.size() != n_f)
      fail("expects " + std::to_string(n_i) + " int and " + std::to_string(n_f) +
           " float params, got " + std::to_string(op_.iparams.size()) + " and " +
           std::to_string(op_.fparams.size()));
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
      fail(std::string(role) + " " + t.label + " has shape " + shape(t) + ", expected [1, " +
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
      fail(std::string(what) + ": " + a.label + " " + shape(a) + " vs " + b.label + " " + shape(b));
  }
  void same_rows(const Tensor& a, const Tensor& b, const char* what) const {
    if (a.rows != b.rows)
      fail(std::string(what) + ": rows of " + a.label + " " + shape(a) + " vs " + b.label + " " +
           shape(b));
  }
  // A weight multiplied by x [R, K]: checks K and that the kernels support its dtype.
  void matmul_weight(const Tensor& w, int64_t k, Program::Impl& p) const {
    if (w.cols != k)
      fail(w.label + " " + shape(w) + " does not match x with K = " + std::to_string(k));
    DType dt = w.weight.dtype;
    if (!p.kt->matmul[(int)dt])
      unsupported(std::string("kernels '") + p.kt->name + "' have no " + traits(dt).name + " matmul");
    if (traits(dt).quantized) {
      if (k % 32 != 0)
        unsupported(w.label + " is " + traits(dt).name + " with K = " + std::to_string(k) +
                    "; quantized matmuls need K % 32 == 0");
      p.max_quant_k = std::max(p.max_quant_k, k);
    }
  }
  float positive_fparam(size_t i, const char* what) const {
    float v = op_.fparams[i];
    if (!(v > 0.f) || !std::isfinite(v)) fail(std::string(what) + " must be finite and > 0");
    return v;
  }

  static std::string shape(const Tensor& t) {
    return "[" + (t.rows == ROWS_T ? std::string("T") : t.rows == ROWS_S ? std::string("S") : std::to_string(t.rows)) + ", " +
           std::to_string(t.cols) + "]";
  }

 private:
  const Program::Impl& p_;
  const OpDesc& op_;
  std::string prefix_;
};

}  // namespace

void Program::Impl::validate_op(size_t index) {
  const OpDesc& op = ops[index];
  OpChecker c(*this, index);
  const auto& in = op.inputs;
  const auto& out = op.outputs;
  // In-place pairs this op allows (output index, input index); any other overlap of
  // arena tensors touched by the op is rejected below.
  std::vector<std::pair<size_t, size_t>> aliases;

  switch (op.code) {
    case OpCode::EMBED: {
      c.arity(2, 1);
      c.params(0, 0);
      const Tensor& e = c.weight(in[0], "embedding");
      const Tensor& tok = c.tensor(in[1], "tokens");
      if (tok.kind != TensorKind::TOKENS) c.fail("input 1 must be the tokens tensor");
      const Tensor& y = c.act(out[0], "output");
      if (y.rows != ROWS_T || y.cols != e.cols)
        c.fail("output " + y.label + " " + OpChecker::shape(y) + ", expected [T, " +
               std::to_string(e.cols) + "]");
      DType dt = e.weight.dtype;
      if (dt != DType::F32 && dt != DType::I8 && !kt->dequant_row)
        c.unsupported(std::string("kernels '") + kt->name + "' cannot dequantize embeddings");
      vocab = std::min(vocab, e.rows);
      break;
    }
    case OpCode::RMS_NORM: {
      c.arity(2, 1);
      c.params(0, 1);
      const Tensor& x = c.act(in[0], "x");
      c.f32_row(in[1], "norm weight", x.cols);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive_fparam(0, "eps");
      break;
    }
    case OpCode::ADD:
    case OpCode::SWIGLU:
    case OpCode::GEGLU: {
      c.arity(2, 1);
      c.params(0, 0);
      const Tensor& a = c.act(in[0], "input 0");
      c.same_shape(a, c.act(in[1], "input 1"), "input shapes");
      c.same_shape(a, c.act(out[0], "output"), "output shape");
      aliases = {{0, 0}, {0, 1}};
      break;
    }
    case OpCode::ADD_RMS_NORM: {
      c.arity(3, 2);
      c.params(0, 1);
      const Tensor& a = c.act(in[0], "a");
      c.same_shape(a, c.act(in[1], "b"), "input shapes");
      c.f32_row(in[2], "norm weight", a.cols);
      c.same_shape(a, c.act(out[0], "sum output"), "sum output shape");
      c.same_shape(a, c.act(out[1], "norm output"), "norm output shape");
      c.positive_fparam(0, "eps");
      // Each row is summed before it is normalised, so y may take the input that s did not.
      aliases = {{0, 0}, {0, 1}, {1, 0}, {1, 1}};
      break;
    }
    case OpCode::MATMUL:
    case OpCode::MATMUL_MULTI: {
      if (in.size() < 3 || in.size() % 2 != 1 || out.size() != (in.size() - 1) / 2)
        c.fail("expects inputs [x, W1, b1, W2, b2, ...] and one output per weight, got " +
               std::to_string(in.size()) + " inputs and " + std::to_string(out.size()) +
               " outputs");
      if (op.code == OpCode::MATMUL) c.arity(3, 1);
      c.params(0, 0);
      const Tensor& x = c.act(in[0], "x");
      for (size_t j = 0; j < out.size(); ++j) {
        const Tensor& w = c.weight(in[1 + 2 * j], "weight");
        c.matmul_weight(w, x.cols, *this);
        if (in[2 + 2 * j] != -1) c.f32_row(in[2 + 2 * j], "bias", w.rows);
        const Tensor& y = c.act(out[j], "output");
        c.same_rows(x, y, "output rows");
        if (y.cols != w.rows)
          c.fail("output " + y.label + " " + OpChecker::shape(y) + " does not match " + w.label +
                 " " + OpChecker::shape(w));
      }
      break;
    }
    case OpCode::MATMUL_SWIGLU:
    case OpCode::MATMUL_GEGLU: {
      c.arity(3, 1);
      c.params(0, 0);
      const Tensor& x = c.act(in[0], "x");
      const Tensor& wg = c.weight(in[1], "gate weight");
      const Tensor& wu = c.weight(in[2], "up weight");
      c.matmul_weight(wg, x.cols, *this);
      c.matmul_weight(wu, x.cols, *this);
      if (wg.rows != wu.rows) c.same_shape(wg, wu, "gate and up weights");
      const Tensor& y = c.act(out[0], "output");
      c.same_rows(x, y, "output rows");
      if (y.cols != wg.rows)
        c.fail("output " + y.label + " " + OpChecker::shape(y) + " does not match " + wg.label +
               " " + OpChecker::shape(wg));
      max_swiglu_f = std::max(max_swiglu_f, wg.rows);
      break;
    }
    case OpCode::ROPE: {
      c.arity(2, 1);
      c.params(3, 0);
      const Tensor& x = c.act(in[0], "x");
      const Tensor& table = c.tensor(in[1], "table");
      if (table.kind != TensorKind::CONST || !table.f32)
        c.fail("table " + table.label + " must be a const");
      int64_t n_heads = op.iparams[0], head_dim = op.iparams[1], rope_dim = op.iparams[2];
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
      aliases = {{0, 0}};
      break;
    }
    case OpCode::ATTENTION: {
      c.arity(3, 1);
      if (op.iparams.size() != 5 || op.fparams.size() != 2) c.params(4, 1);  // both forms
      int64_t layer = op.iparams[0], hq = op.iparams[1], hkv = op.iparams[2], dh = op.iparams[3];
      const int64_t window = op.iparams.size() > 4 ? op.iparams[4] : 0;
      const float softcap = op.fparams.size() > 1 ? op.fparams[1] : 0.f;
      if (window < 0) c.fail("window must be >= 0 (0 = full attention)");
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
      if (q.cols != hq * dh) c.fail("q " + OpChecker::shape(q) + " is not [T, n_heads*head_dim]");
      if (k.cols != hkv * dh) c.fail("k " + OpChecker::shape(k) + " is not [T, n_kv_heads*head_dim]");
      c.same_shape(k, v, "k and v");
      c.same_shape(q, o, "output shape");
      c.same_rows(q, k, "q and k rows");
      c.positive_fparam(0, "scale");
      if (!kt->matmul[(int)DType::F32] || !kt->matmul[(int)DType::F16])
        c.unsupported(std::string("kernels '") + kt->name + "' have no f32/f16 matmul (attention scores)");
      if (layer_window[layer] >= 0 && layer_window[layer] != window)
        c.fail("layer " + std::to_string(layer) + " already has an attention op with window " +
               std::to_string(layer_window[layer]) + ", this one has " + std::to_string(window));
      layer_window[layer] = window;
      has_attention = true;
      max_group = std::max(max_group, hq / hkv);
      break;
    }
    case OpCode::LAYER_NORM: {
      c.arity(3, 1);
      c.params(0, 1);
      const Tensor& x = c.act(in[0], "x");
      c.f32_row(in[1], "norm weight", x.cols);
      c.f32_row(in[2], "norm bias", x.cols);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive_fparam(0, "eps");
      aliases = {{0, 0}};
      break;
    }
    case OpCode::POS_EMBED: {
      c.arity(2, 1);
      c.params(0, 0);
      const Tensor& x = c.act(in[0], "x");
      const Tensor& table = c.weight(in[1], "position table");
      if (x.rows != ROWS_T) c.fail("x must have T rows (positions come from the row index)");
      if (table.cols != x.cols)
        c.fail("position table " + table.label + " " + OpChecker::shape(table) +
               " does not match x " + OpChecker::shape(x));
      DType dt = table.weight.dtype;
      if (dt != DType::F32 && dt != DType::I8 && !kt->dequant_row)
        c.unsupported(std::string("kernels '") + kt->name + "' cannot dequantize position rows");
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      embed_positions = std::min(embed_positions, table.rows);
      max_pos_cols = std::max(max_pos_cols, table.cols);
      aliases = {{0, 0}};
      break;
    }
    case OpCode::HEAD_RMS_NORM: {
      c.arity(2, 1);
      c.params(2, 1);
      const Tensor& x = c.act(in[0], "x");
      const int64_t n_heads = op.iparams[0], head_dim = op.iparams[1];
      if (n_heads < 1 || head_dim < 1 || n_heads > x.cols || head_dim > x.cols || n_heads * head_dim != x.cols)
        c.fail("n_heads " + std::to_string(n_heads) + " x head_dim " + std::to_string(head_dim) +
               " != x cols " + std::to_string(x.cols));
      c.f32_row(in[1], "norm weight", head_dim);
      c.same_shape(x, c.act(out[0], "output"), "output shape");
      c.positive_fparam(0, "eps");
      aliases = {{0, 0}};
      break;
    }
    case OpCode::SCALE:
    case OpCode::SOFTCAP: {
      c.arity(1, 1);
      c.params(0, 1);
      c.same_shape(c.act(in[0], "x"), c.act(out[0], "output"), "output shape");
      if (op.code == OpCode::SOFTCAP) c.positive_fparam(0, "cap");
      else if (!std::isfinite(op.fparams[0])) c.fail("s must be finite");
      aliases = {{0, 0}};
      break;
    }
    case OpCode::GELU: {
      c.arity(1, 1);
      c.params(0, 0);
      c.same_shape(c.act(in[0], "x"), c.act(out[0], "output"), "output shape");
      aliases = {{0, 0}};
      break;
    }
    case OpCode::TAKE_LAST: {
      c.arity(1, 1);
      c.params(0, 0);
      const Tensor& x = c.act(in[0], "x");
      const Tensor& y = c.act(out[0], "output");
      if (x.rows != ROWS_T) c.fail("x must have T rows");
      // One row per sequence; a fixed [1, D] output only in a program of one sequence per step.
      if (!(y.rows == ROWS_S || (y.rows == 1 && max_seqs == 1)) || y.cols != x.cols)
        c.fail("output " + y.label + " " + OpChecker::shape(y) + ", expected [S, " + std::to_string(x.cols) +
               "] (one row per sequence" + (max_seqs == 1 ? ", or [1, " + std::to_string(x.cols) + "]" : std::string()) +
               ")");
      break;
    }
    default:
      c.unsupported("unknown op code " + std::to_string((int)op.code));
  }

  // Arena overlap: an output may share memory with an input only where the op allows
  // it in place, and then exactly; outputs never overlap each other.
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
      bool allowed = std::find(aliases.begin(), aliases.end(), std::make_pair(o, i)) != aliases.end();
      if (!allowed || ro != ri)
        c.fail("output " + tensors[out[o]].label + " overlaps input " + tensors[in[i]].label +
               (allowed ? " without aliasing it exactly" : " and this op does not work in place"));
    }
  }
}

Program::Program(std::shared_ptr<Bundle> bundle, std::vector<TensorDesc> tensors,
                 std::vector<OpDesc> ops, int64_t arena_bytes, int max_tokens, KVConfig kv,
                 int output_tensor, int n_threads, const std::string& kernels,
                 const std::string& activations, int max_seqs)
    : impl_(std::make_unique<Impl>()) {
  Impl& p = *impl_;
  if (activations == "int8x2") p.act2 = true;
  else if (activations == "int8") p.act2 = false;
  else throw std::invalid_argument("activations must be 'int8' or 'int8x2', got '" + activations + "'");
  if (kernels.empty()) {
    p.kt = &kernels::best_kernels();
  } else {
    p.kt = kernels::kernels_by_name(kernels);
    if (!p.kt) throw UnsupportedError("kernels '" + kernels + "' are not available on this CPU");
  }
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
  p.n_threads = n_threads;

  p.tensors.resize(p.descs.size());
  int n_token_tensors = 0;
  for (size_t i = 0; i < p.descs.size(); ++i) {
    p.resolve_tensor(i);
    n_token_tensors += p.tensors[i].kind == TensorKind::TOKENS;
  }
  if (n_token_tensors > 1) throw std::invalid_argument("more than one tokens tensor");
  for (size_t i = 0; i < p.ops.size(); ++i) p.validate_op(i);

  if (output_tensor < 0 || output_tensor >= (int)p.tensors.size() ||
      p.tensors[output_tensor].kind != TensorKind::ARENA)
    throw std::invalid_argument("output tensor " + std::to_string(output_tensor) +
                                " must be an arena tensor");
  p.output = output_tensor;
}

Program::~Program() = default;
int Program::max_tokens() const { return impl_->max_tokens; }
int Program::n_threads() const { return impl_->n_threads; }
int64_t Program::arena_bytes() const { return impl_->arena_bytes; }
const char* Program::kernel_name() const { return impl_->kt->name; }
const char* Program::activations() const { return impl_->act2 ? "int8x2" : "int8"; }
int64_t Program::output_cols() const { return impl_->tensors[impl_->output].cols; }
const std::vector<int64_t>& Program::layer_windows() const { return impl_->layer_window; }
int Program::max_seqs() const { return impl_->max_seqs; }
int64_t Program::output_rows(int n_rows, int n_seqs) const {
  return impl_->rows_at(impl_->tensors[impl_->output], n_rows, n_seqs);
}

// ---------------------------------------------------------------------------
// State

namespace {

// Bounds of part `i` of `n_parts` over [0, total), cut at multiples of `align` so that
// SIMD kernels see whole column tiles.
inline int64_t split_point(int64_t total, int n_parts, int i, int64_t align) {
  if (i >= n_parts) return total;
  return std::min(total, (total * i / n_parts) / align * align);
}
inline int64_t split_align(int64_t total, int n_parts) {
  return total >= 16 * n_parts ? 16 : (total >= 4 * n_parts ? 4 : 1);
}
// Attention runs one task per (row, KV head); when that gives fewer than this many tasks
// per thread (decode), each task's positions are split into chunks merged afterwards.
constexpr int kAttnTasksPerThread = 4;
// Fewest positions in one such chunk.
constexpr int64_t kAttnMinChunk = 64;

// Pieces an output range of `total` columns is cut into: a few per thread (at least
// 64 columns each), so that when one thread is descheduled the others take its share.
inline int matmul_parts(int64_t total, int n_threads) {
  if (n_threads == 1) return 1;
  return (int)std::max<int64_t>(n_threads, std::min<int64_t>(4 * n_threads, total / 64));
}

// y = gelu_tanh(g) * u (HF gelu_pytorch_tanh); y may alias g or u.
void gelu_mul(const float* g, const float* u, float* y, int n) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  for (int i = 0; i < n; ++i) {
    const float v = g[i];
    y[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v))) * u[i];
  }
}

// Positions each layer's KV cache keeps: a sliding-window layer needs its window plus the
// rows of one call (they are stored before the first of them reads), full layers everything.
// A window of max_context or more is full attention; below it, window + max_tokens - 1 is
// under 2^32 (both are ints), so the sum cannot overflow whatever the window (up to 2^63 - 1).
std::vector<int64_t> layer_kv_capacities(const Program::Impl& p, int max_context) {
  std::vector<int64_t> cap((size_t)p.kv.n_layers, max_context);
  for (size_t l = 0; l < cap.size(); ++l) {
    const int64_t window = p.layer_window[l];
    if (window > 0 && window < max_context)
      cap[l] = std::min<int64_t>(max_context, window + (int64_t)p.max_tokens - 1);
  }
  return cap;
}

// A reservation the OS refused, with the sizes asked for: still a std::bad_alloc (Python's
// MemoryError), but one whose message says what was too large.
struct ReserveError : std::bad_alloc {
  explicit ReserveError(std::string msg) : msg_(std::move(msg)) {}
  const char* what() const noexcept override { return msg_.c_str(); }

 private:
  std::string msg_;
};

// Bytes of every buffer a State (its KV cache) and the workspace it runs on reserve, in checked
// arithmetic (see checked_mul). scores is for a State of this max_context.
struct StateSizes {
  std::vector<int64_t> kv_capacities;
  int64_t arena, act_q, up, scores, partials, pos_rows, kv;
  int64_t scratch() const { return act_q + up + scores + partials + pos_rows; }
};

StateSizes state_sizes(const Program::Impl& p, int max_context, bool kv_f16) {
  StateSizes z;
  z.kv_capacities = layer_kv_capacities(p, max_context);
  z.arena = p.arena_bytes;
  const int64_t block = p.act2 ? sizeof(kernels::BlockQ8A2) : sizeof(kernels::BlockQ8A);
  z.act_q = checked_product({p.max_tokens, p.max_quant_k / 32, block}, "activation scratch bytes");
  z.up = checked_product({p.max_tokens, p.max_swiglu_f, (int64_t)sizeof(float)}, "up-projection scratch bytes");
  z.scores = p.has_attention ? checked_product({p.n_threads, p.max_group, max_context, (int64_t)sizeof(float)},
                                               "attention score bytes")
                             : 0;
  z.partials = p.has_attention ? checked_product({kAttnTasksPerThread * 2, p.n_threads, p.max_group,
                                                  checked_add(2, p.kv.head_dim, "attention partials"),
                                                  (int64_t)sizeof(float)},
                                                 "attention partial bytes")
                               : 0;
  z.pos_rows = checked_product({p.n_threads, p.max_pos_cols, (int64_t)sizeof(float)}, "position scratch bytes");
  const int64_t row = checked_product({2, p.kv.n_kv_heads, p.kv.head_dim, kv_f16 ? 2 : 4}, "KV row bytes");
  z.kv = 0;
  for (int64_t c : z.kv_capacities) z.kv = checked_add(z.kv, checked_mul(c, row, "KV cache bytes"), "KV cache bytes");
  int64_t total = 0;
  for (int64_t b : {z.arena, z.act_q, z.up, z.scores, z.partials, z.pos_rows, z.kv})
    total = checked_add(total, b, "session bytes");
  return z;
}

// The Program's workspace, made or grown (attention scores) for a State of max_context: called by
// the State constructor under step_mutex, so run() never allocates.
void reserve_workspace(const Program::Impl& p, int max_context, const StateSizes& z) {
  std::unique_ptr<Workspace>& ws = p.workspace;
  if (!ws) {
    auto made = std::make_unique<Workspace>(p.n_threads);
    made->arena = LazyBuffer((size_t)z.arena);
    made->act_q = LazyBuffer((size_t)z.act_q);
    made->up = LazyBuffer((size_t)z.up);
    made->partials = LazyBuffer((size_t)z.partials);
    made->pos_rows = LazyBuffer((size_t)z.pos_rows);
    made->tokens.resize((size_t)p.max_tokens);
    made->row_pos.resize((size_t)p.max_tokens);
    made->row_seq.resize((size_t)p.max_tokens);
    made->seqs.resize((size_t)p.max_seqs);
    ws = std::move(made);
  }
  if (max_context > ws->scores_context) {
    ws->scores = LazyBuffer((size_t)z.scores);  // the smaller one is released
    ws->scores_context = max_context;
  }
}

}  // namespace

struct State::Impl {
  const Program::Impl& p;
  int max_context;
  KVCache kv;
  std::mutex run_mutex;  // one step or copy_kv_from() at a time per State

  Impl(const Program::Impl& program, int max_context_, bool kv_f16_, const StateSizes& z)
      : p(program),
        max_context(max_context_),
        kv(program.kv.n_layers, program.kv.n_kv_heads, program.kv.head_dim, z.kv_capacities,
           kv_f16_ ? sizeof(fp16_t) : sizeof(float)) {}
};

// One forward pass over the rows of a batch (run_batch): the ops' implementations. Rows are the
// sequences' tokens one after another; each row carries its position (row_pos) and its sequence
// (row_seq), so rope, position embeddings and attention (the KV writes and reads) are per row and
// every other op is row-wise. Made under the Program's step mutex, on its workspace.
struct Step {
  const Program::Impl& p;
  const kernels::KernelTable& kt;
  Workspace& ws;
  ThreadPool& pool;
  int n_rows = 0;            // rows of this step (ROWS_T)
  int n_seqs = 0;            // sequences of this step (ROWS_S)
  const SeqSlot* seqs;       // [n_seqs]
  const int32_t* tokens;     // [n_rows]
  const int64_t* row_pos;    // [n_rows]
  const int32_t* row_seq;    // [n_rows]

  Step(const Program::Impl& program, Workspace& w, int n_rows_, int n_seqs_)
      : p(program), kt(*program.kt), ws(w), pool(w.pool), n_rows(n_rows_), n_seqs(n_seqs_),
        seqs(w.seqs.data()), tokens(w.tokens.data()), row_pos(w.row_pos.data()), row_seq(w.row_seq.data()) {}

  float* f32(int id) const {
    const Tensor& t = p.tensors[id];
    if (t.kind == TensorKind::ARENA) return reinterpret_cast<float*>(ws.arena.as<uint8_t>() + t.arena_offset);
    return const_cast<float*>(t.f32);
  }
  int64_t rows(int id) const { return p.rows_at(p.tensors[id], n_rows, n_seqs); }
  const Tensor& tensor(int id) const { return p.tensors[id]; }

  // Runs fn(row) for every row, spread over the threads when there are several.
  template <class F>
  void for_rows(int64_t n, F&& fn) {
    pool.parallel_for((int)n, [&](int row, int) { fn(row); });
  }

  void exec(const OpDesc& op);
  void embed(const OpDesc& op);
  // Row r of a weight as floats (embedding and position tables), whatever its layout.
  void weight_row(const kernels::WeightView& w, int64_t r, float* out) const;
  void quantize(const float* x, int64_t rows, int64_t k);
  // One weight's columns [n0, n1) for r rows, reading the activations quantize() prepared.
  void mm(const kernels::WeightView& w, const float* x, int64_t k, int64_t r, float* y, int64_t ldy,
          int64_t n0, int64_t n1) const {
    if (p.act2)
      kt.matmul2[(int)w.dtype](w, x, (size_t)k, ws.act_q.as<kernels::BlockQ8A2>(), (int)r, y, (size_t)ldy,
                               (int)n0, (int)n1);
    else
      kt.matmul[(int)w.dtype](w, x, (size_t)k, ws.act_q.as<kernels::BlockQ8A>(), (int)r, y, (size_t)ldy,
                              (int)n0, (int)n1);
  }
  void matmul(const OpDesc& op);
  void matmul_swiglu(const OpDesc& op);
  void rope(const OpDesc& op);
  void attention(const OpDesc& op);
  void head_rms_norm(const OpDesc& op);
  void scale_or_softcap(const OpDesc& op);
  void layer_norm(const OpDesc& op);
  void pos_embed(const OpDesc& op);
  void gelu(const OpDesc& op);
  void take_last(const OpDesc& op);
};

void Step::embed(const OpDesc& op) {
  const kernels::WeightView& e = tensor(op.inputs[0]).weight;
  float* y = f32(op.outputs[0]);
  const int64_t d = e.cols;
  for_rows(n_rows, [&](int64_t t) { weight_row(e, tokens[t], y + t * d); });
}

void Step::weight_row(const kernels::WeightView& w, int64_t r, float* out) const {
  const int64_t d = w.cols;
  const uint8_t* row = w.data + (size_t)r * w.row_stride;
  DType dt = w.dtype;
  if (is_x16(dt)) {  // gathered back into row-major bytes first
    thread_local std::vector<uint8_t> gathered;  // grows once per thread
    if (gathered.size() < w.row_stride) gathered.resize(w.row_stride);
    x16_gather_row(dt, w.data, d, r, gathered.data());
    row = gathered.data();
    dt = x16_base(dt);
  }
  if (dt == DType::F32) {
    std::memcpy(out, row, (size_t)d * sizeof(float));
  } else if (dt == DType::I8) {  // the per-row scale lives outside the row
    float s;
    std::memcpy(&s, w.row_scales + r, sizeof(float));
    const int8_t* q = reinterpret_cast<const int8_t*>(row);
    for (int64_t i = 0; i < d; ++i) out[i] = s * (float)q[i];
  } else {
    kt.dequant_row(dt, row, out, d);
  }
}

void Step::quantize(const float* x, int64_t rows, int64_t k) {
  const int64_t blocks = k / 32;
  if (p.act2) {
    auto* xq2 = ws.act_q.as<kernels::BlockQ8A2>();
    for_rows(rows, [&](int64_t t) { kt.quantize_act2(x + t * k, xq2 + t * blocks, (int)k); });
    return;
  }
  auto* xq = ws.act_q.as<kernels::BlockQ8A>();
  for_rows(rows, [&](int64_t t) { kt.quantize_act(x + t * k, xq + t * blocks, (int)k); });
}

// matmul and matmul_multi: the output columns of all weights form one range that is
// cut into one contiguous piece per thread, so small projections (K, V) do not leave
// a core idle.
void Step::matmul(const OpDesc& op) {
  const int x_id = op.inputs[0];
  const float* x = f32(x_id);
  const int64_t k = tensor(x_id).cols;
  const int64_t r = rows(x_id);
  const size_t n_out = op.outputs.size();
  bool any_quant = false;
  int64_t total = 0;
  for (size_t j = 0; j < n_out; ++j) {
    const kernels::WeightView& w = tensor(op.inputs[1 + 2 * j]).weight;
    any_quant |= traits(w.dtype).quantized;
    total += w.rows;
  }
  if (any_quant) quantize(x, r, k);
  const int n_parts = matmul_parts(total, pool.n_threads());
  const int64_t align = split_align(total, n_parts);
  pool.parallel_for(n_parts, [&](int part, int) {
    int64_t lo = split_point(total, n_parts, part, align);
    int64_t hi = split_point(total, n_parts, part + 1, align);
    int64_t base = 0;  // first column of weight j in the joint range
    for (size_t j = 0; j < n_out && lo < hi; ++j) {
      const kernels::WeightView& w = tensor(op.inputs[1 + 2 * j]).weight;
      int64_t n0 = std::max(lo, base) - base, n1 = std::min(hi, base + w.rows) - base;
      base += w.rows;
      if (n0 >= n1) continue;
      float* y = f32(op.outputs[j]);
      mm(w, x, k, r, y, w.rows, n0, n1);
      if (op.inputs[2 + 2 * j] != -1) {
        const float* bias = f32(op.inputs[2 + 2 * j]);
        for (int64_t t = 0; t < r; ++t) {
          float* yr = y + t * w.rows + n0;
          kt.add(yr, bias + n0, yr, (int)(n1 - n0));
        }
      }
    }
  });
}

void Step::matmul_swiglu(const OpDesc& op) {
  const int x_id = op.inputs[0];
  const float* x = f32(x_id);
  const int64_t k = tensor(x_id).cols;
  const int64_t r = rows(x_id);
  const kernels::WeightView& wg = tensor(op.inputs[1]).weight;
  const kernels::WeightView& wu = tensor(op.inputs[2]).weight;
  const int64_t f = wg.rows;
  if (traits(wg.dtype).quantized || traits(wu.dtype).quantized) quantize(x, r, k);
  float* y = f32(op.outputs[0]);  // holds the gate projection until silu_mul
  float* u = ws.up.as<float>();
  auto act = op.code == OpCode::MATMUL_GEGLU ? gelu_mul : kt.silu_mul;
  const int n_parts = matmul_parts(f, pool.n_threads());
  const int64_t align = split_align(f, n_parts);
  pool.parallel_for(n_parts, [&](int part, int) {
    int64_t n0 = split_point(f, n_parts, part, align);
    int64_t n1 = split_point(f, n_parts, part + 1, align);
    if (n0 >= n1) return;
    mm(wg, x, k, r, y, f, n0, n1);
    mm(wu, x, k, r, u, f, n0, n1);
    for (int64_t t = 0; t < r; ++t)
      act(y + t * f + n0, u + t * f + n0, y + t * f + n0, (int)(n1 - n0));
  });
}

void Step::rope(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const float* table = f32(op.inputs[1]);
  float* y = f32(op.outputs[0]);
  const int64_t n_heads = op.iparams[0], head_dim = op.iparams[1], rope_dim = op.iparams[2];
  const int64_t half = rope_dim / 2, cols = n_heads * head_dim;
  for_rows(n_rows, [&](int64_t t) {
    const float* cos_p = table + row_pos[t] * rope_dim;
    const float* sin_p = cos_p + half;
    for (int64_t h = 0; h < n_heads; ++h) {
      const float* xh = x + t * cols + h * head_dim;
      float* yh = y + t * cols + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        float a = xh[i], b = xh[i + half];
        yh[i] = a * cos_p[i] - b * sin_p[i];
        yh[i + half] = b * cos_p[i] + a * sin_p[i];
      }
      if (yh != xh)
        std::memcpy(yh + rope_dim, xh + rope_dim, (size_t)(head_dim - rope_dim) * sizeof(float));
    }
  });
}

// One task per (row t, KV head) serves all the query heads of that KV head, so each
// cached K/V row is read once per group instead of once per query head. For decode
// (few tasks) the positions of each task are split into chunks whose partial softmax
// sums are merged at the end, so every thread has work even with one KV head.
// Position p lives in slot p % capacity of the layer's cache: for full layers that is p
// itself, for sliding-window layers a ring, so a range of positions is at most two runs
// of slots; scores are indexed by slot.
void Step::attention(const OpDesc& op) {
  const int layer = (int)op.iparams[0];
  const int64_t hq = op.iparams[1], hkv = op.iparams[2], dh = op.iparams[3];
  const int64_t window = op.iparams.size() > 4 ? op.iparams[4] : 0;
  const float scale = op.fparams[0];
  const float softcap = op.fparams.size() > 1 ? op.fparams[1] : 0.f;
  const float* q = f32(op.inputs[0]);
  const float* k = f32(op.inputs[1]);
  const float* v = f32(op.inputs[2]);
  float* o = f32(op.outputs[0]);
  const int64_t kv_cols = hkv * dh, q_cols = hq * dh, group = hq / hkv;
  // Append this step's rows first: a row attends to the rows before it in this step too. Each
  // row goes to its own sequence's cache, where each KV head is its own [capacity, head_dim]
  // block (kv_cache.h).
  for (int64_t t = 0; t < n_rows; ++t) {
    const KVCache& kv = *seqs[row_seq[t]].kv;
    const int64_t cap = kv.capacity(layer), slot = row_pos[t] % cap;
    const size_t eb = kv.elem_bytes();
    for (bool values : {false, true}) {
      uint8_t* cache = values ? kv.v(layer) : kv.k(layer);
      const float* x = (values ? v : k) + t * kv_cols;
      for (int64_t h = 0; h < hkv; ++h) {
        uint8_t* dst = cache + (size_t)((h * cap + slot) * dh) * eb;
        if (kv.f16()) kt.to_f16(x + h * dh, reinterpret_cast<fp16_t*>(dst), (int)dh);
        else std::memcpy(dst, x + h * dh, (size_t)dh * sizeof(float));
      }
    }
  }
  // Calls fn(s0, s1) for the runs of slots holding positions [p0, p1) in a ring of cap slots.
  auto for_slots = [](int64_t cap, int64_t p0, int64_t p1, auto&& fn) {
    if (p1 <= p0) return;
    const int64_t s0 = p0 % cap, len = p1 - p0;
    if (s0 + len <= cap) {
      fn(s0, s0 + len);
    } else {
      fn(s0, cap);
      fn(int64_t(0), s0 + len - cap);
    }
  };

  const int nt = pool.n_threads();
  const int64_t pairs = (int64_t)n_rows * hkv;
  int64_t span = 1;  // the most positions the first row of a sequence reads
  for (int i = 0; i < n_seqs; ++i)
    span = std::max(span, window > 0 ? std::min<int64_t>(seqs[i].pos0 + 1, window) : seqs[i].pos0 + 1);
  int64_t n_chunks = 1;
  if (nt > 1 && pairs < kAttnTasksPerThread * nt) {
    n_chunks = (kAttnTasksPerThread * nt + pairs - 1) / pairs;
    n_chunks = std::max<int64_t>(1, std::min<int64_t>(n_chunks, span / kAttnMinChunk));
  }
  const int64_t slot = 2 + dh;  // partial result: running max, sum, weighted V
  float* part = ws.partials.as<float>();
  float* scores_all = ws.scores.as<float>();
  const int64_t stride = ws.scores_context;  // scores of one query head: [scores_context]
  // Soft-capped scores are final logits before the exponent: scale them up front.
  const float exp_scale = softcap > 0.f ? 1.f : scale;

  pool.parallel_for((int)(pairs * n_chunks), [&](int task, int thread_id) {
    const int64_t pair = task / n_chunks, c = task % n_chunks;
    const int64_t t = pair / hkv, kvh = pair % hkv;
    const KVCache& kv = *seqs[row_seq[t]].kv;
    const int64_t cap = kv.capacity(layer), head_elems = cap * dh;
    const size_t eb = kv.elem_bytes();
    const bool kv_f16 = kv.f16();
    const uint8_t* kc = kv.k(layer);
    const uint8_t* vc = kv.v(layer);
    const int64_t hi = row_pos[t] + 1;  // causal: positions < hi
    const int64_t lo = window > 0 ? std::max<int64_t>(0, hi - window) : 0;
    const int64_t n_ctx = hi - lo;
    const int64_t p0 = lo + n_ctx * c / n_chunks, p1 = lo + n_ctx * (c + 1) / n_chunks;
    const float* qg = q + t * q_cols + kvh * group * dh;  // this group's query heads
    const uint8_t* vh = vc + (size_t)(kvh * head_elems) * eb;
    float* s = scores_all + (int64_t)thread_id * group * stride;  // [group][stride]
    // q . k for the group's heads and the slots of [p0, p1) in one call per run: the K
    // cache of this head is a contiguous f16/f32 [capacity, head_dim] matrix.
    const DType kv_dtype = kv_f16 ? DType::F16 : DType::F32;
    const kernels::WeightView keys{kv_dtype, cap, dh, kc + (size_t)(kvh * head_elems) * eb, (size_t)dh * eb,
                                   nullptr};
    for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
      kt.matmul[(int)kv_dtype](keys, qg, (size_t)dh, nullptr, (int)group, s,
                                 (size_t)stride, (int)s0, (int)s1);
    });
    // Output of query head g: the final row, or this chunk's partial [max, sum, acc].
    auto acc_of = [&](int64_t g) -> float* {
      if (n_chunks == 1) return o + t * q_cols + (kvh * group + g) * dh;
      return part + ((pair * n_chunks + c) * group + g) * slot + 2;
    };
    for (int64_t g = 0; g < group; ++g) {
      float* sg = s + g * stride;
      float m = -std::numeric_limits<float>::infinity();
      for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
        if (softcap > 0.f)
          for (int64_t p = s0; p < s1; ++p) sg[p] = softcap * std::tanh(sg[p] * scale / softcap);
        m = std::max(m, kt.max(sg + s0, (int)(s1 - s0)));
      });
      float sum = 0.f;  // exp_scale > 0: max(s * scale) = m * scale
      for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) { sum += kt.exp_sum(sg + s0, (int)(s1 - s0), m, exp_scale); });
      float* acc = acc_of(g);
      if (n_chunks == 1) {
        const float inv = 1.f / sum;
        for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) { kt.scale(inv, sg + s0, (int)(s1 - s0)); });
      } else {
        acc[-2] = m * exp_scale;
        acc[-1] = sum;
      }
      std::memset(acc, 0, (size_t)dh * sizeof(float));
    }
    // Weighted sum of V rows, each row read once for the whole group.
    const size_t acc_stride = n_chunks == 1 ? (size_t)dh : (size_t)slot;  // acc_of(g + 1) - acc_of(g)
    for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
      const uint8_t* rows = vh + (size_t)(s0 * dh) * eb;
      if (kv_f16)
        kt.weighted_sum_f16(s + s0, (size_t)stride, (int)group, reinterpret_cast<const fp16_t*>(rows),
                            (size_t)dh, (int)(s1 - s0), acc_of(0), acc_stride, (int)dh);
      else
        kt.weighted_sum(s + s0, (size_t)stride, (int)group, reinterpret_cast<const float*>(rows),
                        (size_t)dh, (int)(s1 - s0), acc_of(0), acc_stride, (int)dh);
    });
  });
  if (n_chunks == 1) return;

  // Merge the chunks of every (row, query head): rescale each to the global max.
  for (int64_t pair = 0; pair < pairs; ++pair) {
    const int64_t t = pair / hkv, kvh = pair % hkv;
    for (int64_t g = 0; g < group; ++g) {
      auto chunk = [&](int64_t c) { return part + ((pair * n_chunks + c) * group + g) * slot; };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < n_chunks; ++c) m = std::max(m, chunk(c)[0]);
      float* out = o + t * q_cols + (kvh * group + g) * dh;
      std::memset(out, 0, (size_t)dh * sizeof(float));
      float sum = 0.f;
      for (int64_t c = 0; c < n_chunks; ++c) {
        const float* pc = chunk(c);
        if (pc[1] == 0.f) continue;  // empty chunk
        const float w = std::exp(pc[0] - m);
        sum += w * pc[1];
        kt.axpy(w, pc + 2, out, (int)dh);
      }
      kt.scale(1.f / sum, out, (int)dh);
    }
  }
}

void Step::head_rms_norm(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const float* w = f32(op.inputs[1]);
  float* y = f32(op.outputs[0]);
  const int64_t n_heads = op.iparams[0], dh = op.iparams[1], d = n_heads * dh;
  const float eps = op.fparams[0];
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    for (int64_t h = 0; h < n_heads; ++h)
      kt.rms_norm(x + t * d + h * dh, w, y + t * d + h * dh, (int)dh, eps);
  });
}

void Step::scale_or_softcap(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  const float a = op.fparams[0];
  const bool cap = op.code == OpCode::SOFTCAP;
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    const float* xr = x + t * d;
    float* yr = y + t * d;
    if (cap) {
      for (int64_t i = 0; i < d; ++i) yr[i] = a * std::tanh(xr[i] / a);
    } else {
      for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * a;
    }
  });
}

void Step::layer_norm(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const float* w = f32(op.inputs[1]);
  const float* b = f32(op.inputs[2]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  const float eps = op.fparams[0];
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    const float* xr = x + t * d;
    float* yr = y + t * d;
    // Two passes in double: the mean of a residual stream can dwarf its spread.
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) sum += xr[i];
    const double mean = sum / (double)d;
    double var = 0.0;
    for (int64_t i = 0; i < d; ++i) var += ((double)xr[i] - mean) * ((double)xr[i] - mean);
    const float m = (float)mean, inv = (float)(1.0 / std::sqrt(var / (double)d + (double)eps));
    for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - m) * inv * w[i] + b[i];  // y may alias x
  });
}

void Step::pos_embed(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const kernels::WeightView& p = tensor(op.inputs[1]).weight;
  float* y = f32(op.outputs[0]);
  const int64_t d = p.cols;
  float* scratch = ws.pos_rows.as<float>();
  pool.parallel_for(n_rows, [&](int t, int thread_id) {
    const int64_t pos = row_pos[t];
    const float* pr;
    if (p.dtype == DType::F32) {
      pr = reinterpret_cast<const float*>(p.data + (size_t)pos * p.row_stride);
    } else {
      float* buf = scratch + (int64_t)thread_id * p.cols;
      weight_row(p, pos, buf);
      pr = buf;
    }
    kt.add(x + t * d, pr, y + t * d, (int)d);
  });
}

void Step::gelu(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    const float* xr = x + t * d;
    float* yr = y + t * d;
    for (int64_t i = 0; i < d; ++i) {
      const float v = xr[i];
      yr[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
  });
}

// Row i of the output is the last row of sequence i.
void Step::take_last(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  for (int i = 0; i < n_seqs; ++i)
    std::memcpy(y + i * d, x + (int64_t)(seqs[i].first_row + seqs[i].n_tokens - 1) * d, (size_t)d * sizeof(float));
}

void Step::exec(const OpDesc& op) {
  switch (op.code) {
    case OpCode::EMBED:
      embed(op);
      break;
    case OpCode::RMS_NORM: {
      const float* x = f32(op.inputs[0]);
      const float* w = f32(op.inputs[1]);
      float* y = f32(op.outputs[0]);
      const int64_t d = tensor(op.inputs[0]).cols;
      const float eps = op.fparams[0];
      for_rows(rows(op.inputs[0]), [&](int64_t t) { kt.rms_norm(x + t * d, w, y + t * d, (int)d, eps); });
      break;
    }
    case OpCode::ADD:
    case OpCode::SWIGLU:
    case OpCode::GEGLU: {
      const float* a = f32(op.inputs[0]);
      const float* b = f32(op.inputs[1]);
      float* y = f32(op.outputs[0]);
      const int64_t d = tensor(op.inputs[0]).cols;
      auto fn = op.code == OpCode::ADD      ? kt.add
                : op.code == OpCode::SWIGLU ? kt.silu_mul
                                            : gelu_mul;
      for_rows(rows(op.inputs[0]), [&](int64_t t) { fn(a + t * d, b + t * d, y + t * d, (int)d); });
      break;
    }
    case OpCode::ADD_RMS_NORM: {
      const float* a = f32(op.inputs[0]);
      const float* b = f32(op.inputs[1]);
      const float* w = f32(op.inputs[2]);
      float* s = f32(op.outputs[0]);
      float* y = f32(op.outputs[1]);
      const int64_t d = tensor(op.inputs[0]).cols;
      const float eps = op.fparams[0];
      for_rows(rows(op.inputs[0]), [&](int64_t t) {
        kt.add(a + t * d, b + t * d, s + t * d, (int)d);
        kt.rms_norm(s + t * d, w, y + t * d, (int)d, eps);
      });
      break;
    }
    case OpCode::MATMUL:
    case OpCode::MATMUL_MULTI:
      matmul(op);
      break;
    case OpCode::MATMUL_SWIGLU:
    case OpCode::MATMUL_GEGLU:
      matmul_swiglu(op);
      break;
    case OpCode::ROPE:
      rope(op);
      break;
    case OpCode::ATTENTION:
      attention(op);
      break;
    case OpCode::LAYER_NORM:
      layer_norm(op);
      break;
    case OpCode::POS_EMBED:
      pos_embed(op);
      break;
    case OpCode::GELU:
      gelu(op);
      break;
    case OpCode::HEAD_RMS_NORM:
      head_rms_norm(op);
      break;
    case OpCode::SCALE:
    case OpCode::SOFTCAP:
      scale_or_softcap(op);
      break;
    case OpCode::TAKE_LAST:
      take_last(op);
      break;
  }
}

State::State(const Program& program, int max_context, const std::string& kv_type) {
  const Program::Impl& p = *program.impl();
  if (max_context < 1) throw std::invalid_argument("max_context must be >= 1");
  if (kv_type != "f16" && kv_type != "f32")
    throw std::invalid_argument("kv_type must be 'f16' or 'f32', got '" + kv_type + "'");
  if (max_context > p.rope_positions)
    throw ContextOverflowError("max_context " + std::to_string(max_context) +
                               " exceeds the " + std::to_string(p.rope_positions) +
                               " positions of the model's rope table");
  if (max_context > p.embed_positions)
    throw ContextOverflowError("max_context " + std::to_string(max_context) +
                               " exceeds the " + std::to_string(p.embed_positions) +
                               " positions of the model's position embeddings");
  const StateSizes sizes = state_sizes(p, max_context, kv_type == "f16");  // throws on overflow
  try {
    {
      std::lock_guard<std::mutex> lock(p.step_mutex);  // no State mutex is held here
      reserve_workspace(p, max_context, sizes);
    }
    impl_ = std::make_unique<Impl>(p, max_context, kv_type == "f16", sizes);
  } catch (const std::bad_alloc&) {  // the OS refused the reservation (address space, overcommit)
    throw ReserveError("cannot reserve memory for a session of max_context " + std::to_string(max_context) +
                       ": KV cache " + std::to_string(sizes.kv) + " bytes (" + kv_type +
                       "); the engine's shared workspace: arena " + std::to_string(sizes.arena) +
                       " bytes, scratch " + std::to_string(sizes.scratch()) +
                       " bytes; a smaller max_context needs less");
  }
}

State::~State() = default;
int State::max_context() const { return impl_->max_context; }
std::vector<int64_t> State::kv_capacities() const { return impl_->kv.capacities(); }
int64_t State::kv_bytes() const { return (int64_t)impl_->kv.bytes(); }
const char* State::kv_type() const { return impl_->kv.f16() ? "f16" : "f32"; }

int64_t State::kv_used_bytes(int64_t n_positions) const {
  const KVCache& kv = impl_->kv;
  if (n_positions < 0 || n_positions > impl_->max_context)
    throw std::invalid_argument("n_positions must be in 0.." + std::to_string(impl_->max_context) +
                                " (max_context), got " + std::to_string(n_positions));
  int64_t total = 0;
  for (int l = 0; l < kv.n_layers(); ++l)
    total = checked_add(total,
                        checked_product({2, kv.used_slots(l, n_positions), kv.n_kv_heads(), kv.head_dim(),
                                         (int64_t)kv.elem_bytes()}, "KV bytes"),
                        "KV bytes");
  return total;
}

void State::copy_kv_from(const State& other, int64_t n_positions) {
  Impl& s = *impl_;
  Impl& o = *other.impl_;
  if (&s == &o) return;  // it holds them already
  const KVCache &dst = s.kv, &src = o.kv;
  auto shape = [](const KVCache& c) {
    return std::to_string(c.n_layers()) + " layers x " + std::to_string(c.n_kv_heads()) + " KV heads x head_dim " +
           std::to_string(c.head_dim());
  };
  std::string why;
  if (dst.n_layers() != src.n_layers() || dst.n_kv_heads() != src.n_kv_heads() || dst.head_dim() != src.head_dim())
    why = "KV shapes differ (" + shape(src) + " into " + shape(dst) + ")";
  else if (dst.elem_bytes() != src.elem_bytes())
    why = std::string("KV types differ (") + other.kv_type() + " into " + kv_type() + ")";
  else if (s.max_context != o.max_context)
    why = "max_context differs (" + std::to_string(o.max_context) + " into " + std::to_string(s.max_context) + ")";
  else if (dst.capacities() != src.capacities())
    why = "the layers' KV capacities differ (different attention windows or max_tokens)";
  if (!why.empty()) throw std::invalid_argument("cannot copy a KV cache between these States: " + why);
  if (n_positions < 0 || n_positions > s.max_context)
    throw std::invalid_argument("n_positions must be in 0.." + std::to_string(s.max_context) +
                                " (max_context), got " + std::to_string(n_positions));
  kv_used_bytes(n_positions);  // every size below is at most this, which is checked
  std::scoped_lock lock(s.run_mutex, o.run_mutex);
  s.kv.copy_from(o.kv, n_positions);
}

void State::run(const int32_t* tokens, int n_tokens, int pos, float* out) {
  const SeqInput one{this, tokens, n_tokens, pos};
  run_batch(*impl_->p.owner, &one, 1, out);
}

void run_batch(const Program& program, const SeqInput* seqs, int n_seqs, float* out) {
  const Program::Impl& p = *program.impl();
  if (n_seqs < 1 || n_seqs > p.max_seqs)
    throw std::invalid_argument("a step takes 1.." + std::to_string(p.max_seqs) +
                                " sequences (the program's max_seqs), got " + std::to_string(n_seqs));
  int64_t n_rows = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const SeqInput& q = seqs[i];
    const std::string which = n_seqs > 1 ? "sequence " + std::to_string(i) + ": " : "";
    if (!q.state) throw std::invalid_argument(which + "no State");
    const State::Impl& s = *q.state->impl_;
    if (&s.p != &p) throw std::invalid_argument(which + "the State belongs to another Program");
    for (int j = 0; j < i; ++j)
      if (seqs[j].state == q.state)
        throw std::invalid_argument(which + "the same State as sequence " + std::to_string(j) +
                                    " (a State runs at most once per step)");
    if (q.n_tokens < 1 || q.n_tokens > p.max_tokens)
      throw std::invalid_argument(which + "n_tokens must be in 1.." + std::to_string(p.max_tokens) +
                                  " (the program's max_tokens), got " + std::to_string(q.n_tokens));
    if (q.pos < 0) throw std::invalid_argument(which + "pos must be >= 0, got " + std::to_string(q.pos));
    if ((int64_t)q.pos + q.n_tokens > s.max_context)
      throw ContextOverflowError(which + "context overflow: positions " + std::to_string(q.pos) + ".." +
                                 std::to_string((int64_t)q.pos + q.n_tokens - 1) +
                                 " do not fit in max_context " + std::to_string(s.max_context));
    for (int t = 0; t < q.n_tokens; ++t)
      if (q.tokens[t] < 0 || q.tokens[t] >= p.vocab)
        throw std::invalid_argument(which + "token id " + std::to_string(q.tokens[t]) + " at index " +
                                    std::to_string(t) + " is outside the vocabulary of " +
                                    std::to_string(p.vocab));
    n_rows += q.n_tokens;
  }
  if (n_rows > p.max_tokens)
    throw std::invalid_argument("a step takes at most " + std::to_string(p.max_tokens) +
                                " rows (the program's max_tokens), the sequences have " + std::to_string(n_rows));

  // Lock order (executor.h): the States' mutexes, in address order, then the step mutex.
  std::mutex* order[kMaxStepSeqs];
  for (int i = 0; i < n_seqs; ++i) order[i] = &seqs[i].state->impl_->run_mutex;
  std::sort(order, order + n_seqs);
  for (int i = 0; i < n_seqs; ++i) order[i]->lock();
  struct Unlock {
    std::mutex** m;
    int n;
    ~Unlock() { for (int i = n - 1; i >= 0; --i) m[i]->unlock(); }
  } unlock{order, n_seqs};
  std::lock_guard<std::mutex> step_lock(p.step_mutex);

  Workspace& ws = *p.workspace;  // made by the first State
  int row = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const SeqInput& q = seqs[i];
    ws.seqs[(size_t)i] = SeqSlot{&q.state->impl_->kv, q.pos, q.n_tokens, row};
    for (int t = 0; t < q.n_tokens; ++t, ++row) {
      ws.tokens[(size_t)row] = q.tokens[t];
      ws.row_pos[(size_t)row] = (int64_t)q.pos + t;
      ws.row_seq[(size_t)row] = i;
    }
  }
  Step step(p, ws, (int)n_rows, n_seqs);
  for (const OpDesc& op : p.ops) step.exec(op);
  const Tensor& output = p.tensors[p.output];
  const int64_t n = p.rows_at(output, (int)n_rows, n_seqs) * output.cols;
  std::memcpy(out, step.f32(p.output), (size_t)n * sizeof(float));
}

}  // namespace plm
