// The CPU backend: the ops of a Program run by the SIMD kernels (kernels/, variant picked at run
// time from CPU features) on a thread pool, with no allocation per step.
//
// Its workspace is what one step needs besides the sequences' KV caches: the thread pool
// (n_threads - 1 workers), the arena (activations, planned for max_tokens rows) and the ops'
// scratch (quantized activations, attention scores and partials). One per Program, shared by its
// States and used by one step at a time (the Program's step mutex); made by the first State (a
// Program that never runs starts no threads); its attention scores, sized by max_context, grow when
// a State of a larger max_context is made.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/kernels.h"
#include "runtime/backend.h"
#include "runtime/kv_cache.h"
#include "runtime/program.h"
#include "runtime/threadpool.h"

namespace plm::cpu {

// Attention cuts each row's positions into chunks at multiples of kAttnChunk and merges their
// partial results; with fewer than kAttnTasksPerThread (row, KV head) pairs per thread (decode),
// each chunk is its own task.
constexpr int kAttnTasksPerThread = 4;
constexpr int64_t kAttnChunk = 512;

// Chunks a row of a context of max_context positions spans at most.
inline int64_t attn_max_chunks(int64_t max_context) { return max_context / kAttnChunk + 2; }

struct Workspace {
  ThreadPool pool;
  LazyBuffer arena;
  LazyBuffer act_q;      // [max_tokens][max_quant_k / 32] BlockQ8A, or BlockQ8A2 if an op has two levels
  LazyBuffer up;         // [max_tokens][max_swiglu_f] f32: matmul_swiglu's up projection
  LazyBuffer scores;     // [n_threads][max_group][scores_context] f32: attention scores
  LazyBuffer partials;   // attention chunks: [partial_slots][max_group][2 + head_dim] f32
  int64_t partial_slots = 0;          // n_threads x the chunks of a row of scores_context positions
  std::vector<int64_t> attn_first;    // attention: each (row, KV head)'s first partial (grows, then reused)
  LazyBuffer pos_rows;   // [n_threads][max_pos_cols] f32: pos_embed's dequantized rows
  int scores_context = 0;  // the largest max_context of the States made so far
  explicit Workspace(int n_threads) : pool(n_threads) {}
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const Program::Impl& program, const BackendOptions& options);
  const char* name() const override { return "cpu"; }
  const char* variant() const override { return kt_->name; }
  bool sparse_in_place(DType t) const override { return t == DType::I8_BITMASK ? bitmask_in_place_ : sparse_in_place_; }
  std::string supports(OpCode op, const std::vector<const Tensor*>& inputs) const override;
  void prepare() override;
  WorkspaceBytes workspace_bytes(int max_context) const override;
  void reserve(int max_context, const WorkspaceBytes& bytes) override;
  KVCache allocate_kv(const KVConfig& kv, std::vector<int64_t> capacities, KVType type) const override;
  void run(const StepRows& rows, float* out) override;

 private:
  bool sparse_in_place_ = false, bitmask_in_place_ = false;
  // Bytes of each scratch buffer for a State of max_context (checked arithmetic).
  struct Scratch {
    int64_t act_q = 0, up = 0, scores = 0, partials = 0, pos_rows = 0;
  };
  Scratch scratch_bytes(int max_context) const;

  const Program::Impl& p_;
  const kernels::KernelTable* kt_ = nullptr;
  bool act2_ = true;                 // two-level activations (BlockQ8A2) where an op does not say, see executor.h
  bool any_act2_ = false;            // some matmul with quantized weights runs two levels (act_q's block)
  // Scratch sizes, found by prepare().
  int64_t max_quant_k_ = 0;          // largest K of a matmul with quantized activations
  int64_t max_swiglu_f_ = 0;         // largest F of a matmul_swiglu (its "up" half)
  int64_t max_group_ = 0;            // largest n_heads / n_kv_heads of an attention op
  int64_t max_pos_cols_ = 0;         // widest pos_embed table (per-thread dequant scratch)
  std::unique_ptr<Workspace> ws_;    // made by the first reserve()
};

// One forward pass over the rows of a step: the ops' implementations (cpu_ops.cpp). Each row
// carries its position (row_pos) and its sequence (row_seq), so rope, position embeddings and
// attention (the KV writes and reads) are per row and every other op is row-wise.
struct Step {
  const Program::Impl& p;
  const kernels::KernelTable& kt;
  const bool act2;  // the program's default for matmuls whose act_levels is 0
  Workspace& ws;
  ThreadPool& pool;
  int n_rows = 0;            // rows of this step (ROWS_T)
  int n_seqs = 0;            // sequences of this step
  int n_out = 0;             // output rows of this step (ROWS_S)
  bool verifying = false;    // a sequence wants several output rows: every row as a step of one computes it
  const SeqSlot* seqs;       // [n_seqs]
  const int32_t* tokens;     // [n_rows]
  const int64_t* row_pos;    // [n_rows]
  const int32_t* row_seq;    // [n_rows]

  Step(const Program::Impl& program, const kernels::KernelTable& kernels, bool act2_, Workspace& w,
       const StepRows& rows)
      : p(program), kt(kernels), act2(act2_), ws(w), pool(w.pool), n_rows(rows.n_rows), n_seqs(rows.n_seqs), n_out(rows.n_out),
        verifying(rows.n_out > rows.n_seqs),
        seqs(rows.seqs.data()), tokens(rows.tokens.data()), row_pos(rows.row_pos.data()),
        row_seq(rows.row_seq.data()) {}

  float* f32(int id) const {
    const Tensor& t = p.tensors[id];
    if (t.kind == TensorKind::ARENA) return reinterpret_cast<float*>(ws.arena.as<uint8_t>() + t.arena_offset);
    return const_cast<float*>(t.f32);
  }
  int64_t rows(int id) const { return p.rows_at(p.tensors[id], n_rows, n_out); }
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
  // Whether matmul op `op` quantizes its input to two levels (its act_levels, else the default).
  bool two_level(const OpDesc& op) const;
  void quantize(const float* x, int64_t rows, int64_t k, bool two);
  // One weight's columns [n0, n1) for r rows, reading the activations quantize() prepared (`two`:
  // as quantize was told).
  void mm(const kernels::WeightView& weight, const float* x, int64_t k, int64_t r, float* y, int64_t ldy,
          int64_t n0, int64_t n1, bool two) const {
    kernels::WeightView w = weight;
    w.row_invariant = verifying;
    if (two)
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

}  // namespace plm::cpu
