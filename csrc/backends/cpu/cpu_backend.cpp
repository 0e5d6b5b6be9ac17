// The CPU backend: what it supports, the workspace it reserves, and a step's run (cpu_ops.cpp
// holds the ops' maths).
#include "backends/cpu/cpu_backend.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "runtime/checked.h"

namespace plm::cpu {

CpuBackend::CpuBackend(const Program::Impl& program, const BackendOptions& options) : p_(program) {
  if (options.activations == "int8x2") act2_ = true;
  else if (options.activations == "int8") act2_ = false;
  else throw std::invalid_argument("activations must be 'int8' or 'int8x2', got '" + options.activations + "'");
  if (options.kernels.empty()) {
    kt_ = &kernels::best_kernels();
  } else {
    kt_ = kernels::kernels_by_name(options.kernels);
    if (!kt_) throw UnsupportedError("kernels '" + options.kernels + "' are not available on this CPU");
  }
  auto keep = [&](int (*kernel)()) {
    const int k = kernel ? kernel() : kernels::kSparse24None;
    if (options.sparse_layout == "auto") return k == kernels::kSparse24Faster;
    if (options.sparse_layout == "in-place") return k != kernels::kSparse24None;
    if (options.sparse_layout == "dense") return false;
    throw std::invalid_argument("sparse_layout must be 'auto', 'in-place' or 'dense', got '" + options.sparse_layout + "'");
  };
  sparse_in_place_ = keep(kt_->sparse24);
  bitmask_in_place_ = keep(kt_->bitmask);
}

std::string CpuBackend::supports(OpCode op, const std::vector<const Tensor*>& inputs) const {
  const std::string kernels = std::string("kernels '") + kt_->name + "'";
  // Rows of a table read one at a time (embed, pos_embed): f32 and i8 directly, others dequantized.
  auto rows_readable = [&](const Tensor& t) {
    const DType dt = t.weight.dtype;
    return dt == DType::F32 || dt == DType::I8 || kt_->dequant_row != nullptr;
  };
  // A matmul weight against x [R, K].
  auto matmul_weight = [&](const Tensor& w, int64_t k) -> std::string {
    const DType dt = w.weight.dtype;
    if (!kt_->matmul[(int)dt]) return kernels + " have no " + traits(dt).name + " matmul";
    if (traits(dt).quantized && k % 32 != 0)
      return w.label + " is " + traits(dt).name + " with K = " + std::to_string(k) +
             "; quantized matmuls need K % 32 == 0";
    return "";
  };
  switch (op) {
    case OpCode::embed:
      return rows_readable(*inputs[0]) ? "" : kernels + " cannot dequantize embeddings";
    case OpCode::pos_embed:
      return rows_readable(*inputs[1]) ? "" : kernels + " cannot dequantize position rows";
    case OpCode::matmul:
    case OpCode::matmul_multi:
      for (size_t j = 1; j < inputs.size(); j += 2) {
        const std::string why = matmul_weight(*inputs[j], inputs[0]->cols);
        if (!why.empty()) return why;
      }
      return "";
    case OpCode::matmul_swiglu:
    case OpCode::matmul_geglu:
      for (size_t j = 1; j < 3; ++j) {
        const std::string why = matmul_weight(*inputs[j], inputs[0]->cols);
        if (!why.empty()) return why;
      }
      return "";
    case OpCode::attention:  // scores and weighted sums over an f32 or f16 cache
      if (!kt_->matmul[(int)DType::F32] || !kt_->matmul[(int)DType::F16])
        return kernels + " have no f32/f16 matmul (attention scores)";
      return "";
    default:
      return "";
  }
}

void CpuBackend::prepare() {
  for (const OpDesc& op : p_.ops) {
    const Tensor& x = p_.tensors[(size_t)op.inputs[0]];
    switch (op.code) {
      case OpCode::matmul:
      case OpCode::matmul_multi:
      case OpCode::matmul_swiglu:
      case OpCode::matmul_geglu: {
        const size_t step = op.code == OpCode::matmul || op.code == OpCode::matmul_multi ? 2 : 1;
        const size_t n_weights = step == 2 ? op.outputs.size() : 2;
        const int64_t levels = param(op, act_levels_param(op.code));
        for (size_t j = 0; j < n_weights; ++j) {
          const Tensor& w = p_.tensors[(size_t)op.inputs[1 + step * j]];
          if (!traits(w.weight.dtype).quantized) continue;
          max_quant_k_ = std::max(max_quant_k_, x.cols);
          any_act2_ |= levels == 2 || (levels == 0 && act2_);
        }
        if (step == 1) max_swiglu_f_ = std::max(max_swiglu_f_, p_.tensors[(size_t)op.inputs[1]].rows);
        break;
      }
      case OpCode::attention:
        max_group_ = std::max(max_group_, param(op, params::attention::n_heads) /
                                              param(op, params::attention::n_kv_heads));
        break;
      case OpCode::pos_embed:
        max_pos_cols_ = std::max(max_pos_cols_, p_.tensors[(size_t)op.inputs[1]].cols);
        break;
      default:
        break;
    }
  }
}

CpuBackend::Scratch CpuBackend::scratch_bytes(int max_context) const {
  const Program::Impl& p = p_;
  const int64_t block = any_act2_ ? sizeof(kernels::BlockQ8A2) : sizeof(kernels::BlockQ8A);
  Scratch z;
  z.act_q = checked_product({p.max_tokens, max_quant_k_ / 32, block}, "activation scratch bytes");
  z.up = checked_product({p.max_tokens, max_swiglu_f_, (int64_t)sizeof(float)}, "up-projection scratch bytes");
  z.scores = p.has_attention ? checked_product({p.n_threads, max_group_, max_context, (int64_t)sizeof(float)},
                                               "attention score bytes")
                             : 0;
  z.partials = p.has_attention ? checked_product({p.n_threads, attn_max_chunks(max_context), max_group_,
                                                  checked_add(2, p.kv.head_dim, "attention partials"),
                                                  (int64_t)sizeof(float)},
                                                 "attention partial bytes")
                               : 0;
  z.pos_rows = checked_product({p.n_threads, max_pos_cols_, (int64_t)sizeof(float)}, "position scratch bytes");
  return z;
}

WorkspaceBytes CpuBackend::workspace_bytes(int max_context) const {
  const Scratch z = scratch_bytes(max_context);
  WorkspaceBytes bytes;
  bytes.arena = p_.arena_bytes;
  for (int64_t b : {z.act_q, z.up, z.scores, z.partials, z.pos_rows})
    bytes.scratch = checked_add(bytes.scratch, b, "scratch bytes");
  return bytes;
}

void CpuBackend::reserve(int max_context, const WorkspaceBytes& bytes) {
  const Scratch z = scratch_bytes(max_context);  // checked by workspace_bytes already
  if (!ws_) {
    auto made = std::make_unique<Workspace>(p_.n_threads);
    made->arena = LazyBuffer((size_t)bytes.arena);
    made->act_q = LazyBuffer((size_t)z.act_q);
    made->up = LazyBuffer((size_t)z.up);
    made->pos_rows = LazyBuffer((size_t)z.pos_rows);
    ws_ = std::move(made);
  }
  if (max_context > ws_->scores_context) {  // both sized by the largest context: the smaller ones are released
    ws_->scores = LazyBuffer((size_t)z.scores);
    ws_->partials = LazyBuffer((size_t)z.partials);
    ws_->partial_slots = (int64_t)p_.n_threads * attn_max_chunks(max_context);
    ws_->scores_context = max_context;
  }
}

KVCache CpuBackend::allocate_kv(const KVConfig& kv, std::vector<int64_t> capacities, KVType type) const {
  return KVCache(kv.n_layers, kv.n_kv_heads, kv.head_dim, std::move(capacities), type);
}

void CpuBackend::run(const StepRows& rows, float* out) {
  Step step(p_, *kt_, act2_, *ws_, rows);  // ws_: made by the first State
  for (const OpDesc& op : p_.ops) step.exec(op);
  const Tensor& output = p_.tensors[(size_t)p_.output];
  const int64_t n = p_.rows_at(output, rows.n_rows, rows.n_out) * output.cols;
  std::memcpy(out, step.f32(p_.output), (size_t)n * sizeof(float));
}

}  // namespace plm::cpu
