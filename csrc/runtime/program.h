// What a program means, apart from how it runs: the resolved tensor table, the op list, the facts
// validation found (windows, vocabulary, position limits), and the backend chosen to run it.
// Shared by the validation (program.cpp), the scheduling of steps (executor.cpp) and the backends.
#pragma once
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/executor.h"
#include "runtime/kv_cache.h"

namespace plm {

// Most sequences one step may hold (Program's max_seqs; vLLM's default max_num_seqs).
constexpr int kMaxStepSeqs = 256;

// A tensor of the table, resolved to what the ops need at run time.
struct Tensor {
  TensorKind kind;
  int64_t rows = 0, cols = 0;        // ARENA rows may be ROWS_T or ROWS_S
  int64_t arena_offset = 0;
  const float* f32 = nullptr;        // CONST data, or the data of an F32 WEIGHT
  kernels::WeightView weight{};      // WEIGHT, and CONST seen as an f32 weight
  std::string label;                 // for messages: "tensor 3 ('blk.0.wq')"
};

// One sequence of a batched step: its KV cache and its rows.
struct SeqSlot {
  KVCache* kv = nullptr;
  int64_t pos0 = 0;    // position of its first row
  int n_tokens = 0;
  int first_row = 0;   // its first row in the step
  int n_out = 1;       // its last rows that an [S, cols] tensor holds
};

// The rows of one step (run_batch): the sequences' tokens one after another; each row carries its
// position and its sequence. Buffers sized [max_tokens] and [max_seqs], owned by the Program and
// filled under its step mutex.
struct StepRows {
  int n_rows = 0;            // ROWS_T
  int n_seqs = 0;            // sequences
  int n_out = 0;             // ROWS_S: output rows, the sum of the sequences' n_out
  std::vector<int32_t> tokens;
  std::vector<int64_t> row_pos;
  std::vector<int32_t> row_seq;
  std::vector<SeqSlot> seqs;
};

struct Program::Impl {
  const Program* owner = nullptr;
  std::shared_ptr<Bundle> bundle;
  BackendOptions options;
  std::unique_ptr<Backend> backend;
  std::vector<TensorDesc> descs;     // owns CONST and inline WEIGHT bytes
  // Sparse weights expanded into dense Q4_0_X16 / I8_X16 / I8 at load (Backend::sparse_in_place; 64-byte aligned)
  std::vector<std::unique_ptr<uint8_t, void (*)(void*)>> expanded;
  std::vector<Tensor> tensors;
  std::vector<OpDesc> ops;           // validated; every op holds all its params (defaults filled)
  int64_t arena_bytes = 0;
  int max_tokens = 0;
  int max_seqs = 1;
  KVConfig kv;
  int output = -1;
  int n_threads = 1;

  // Found while validating.
  bool has_attention = false;
  std::vector<int64_t> layer_window; // per KV layer: the attention window, 0 = full, -1 = unused
  // Per KV layer: how its cached keys were rotated (the rope op that made its attention's k input),
  // which State::kv_shift needs to move them to other positions. table < 0: no rope.
  struct KeyRope {
    int table = -1;         // the rope table (a CONST tensor)
    int64_t rope_dim = 0;
  };
  std::vector<KeyRope> layer_rope;
  std::string shift_unsupported;     // why kv_shift cannot run ("" = it can)
  std::vector<int> last_writer;      // while validating: per tensor, the op that last wrote it
  std::vector<bool> seen_rope_;      // while validating: per KV layer, whether layer_rope is set
  int64_t vocab = std::numeric_limits<int64_t>::max();           // smallest embedding table
  int64_t rope_positions = std::numeric_limits<int64_t>::max();  // smallest rope table
  int64_t embed_positions = std::numeric_limits<int64_t>::max(); // smallest pos_embed table

  // The lock of a step on the backend's workspace and on `step` (see executor.h: lock order).
  // Mutable: a Program is const to the States that run it.
  mutable std::mutex step_mutex;
  mutable StepRows step;

  Impl();
  ~Impl();

  int64_t rows_at(const Tensor& t, int n_rows, int n_out) const {
    return t.rows == ROWS_T ? n_rows : t.rows == ROWS_S ? n_out : t.rows;
  }
  int64_t max_rows(const Tensor& t) const {
    return t.rows == ROWS_T ? max_tokens : t.rows == ROWS_S ? max_seqs : t.rows;
  }

  void resolve_tensor(size_t id);
  void validate_op(size_t index);
};

// Shape for messages: "[T, 64]".
std::string shape_str(const Tensor& t);

}  // namespace plm
