// The executor runs a planned op list (built and memory-planned in Python by
// pocketlm.planner) with no Python between ops.
//
// A Program is immutable after construction and shared by every session of an
// Engine: weights (views into the mmapped bundle), constants, the op list and the
// arena layout. It also owns the backend that runs it (runtime/backend.h; the CPU one,
// backends/cpu/) and, through it, the one workspace its States run on: the thread pool
// (n_threads - 1 workers), the arena (activations, planned for max_tokens rows) and
// the ops' scratch (quantized activations, attention scores and partials). A State
// holds what one session owns: its KV cache and a few bytes of bookkeeping, so a new
// session costs its KV reservation and never threads.
//
// The workspace is made by the first State (a Program that is never run starts no
// threads) and its attention scores, sized by max_context, grow when a State of a
// larger max_context is made; all under the Program's step mutex, in the State
// constructor, so run() never allocates. One workspace serves one step at a time: a
// step holds the step mutex throughout, and steps from different threads take turns.
//
// A step may hold the rows of several sequences (run_batch): each row carries its token,
// its position and its sequence, so embedding, rope, position embeddings and attention
// (the KV writes and reads) are per row, every other op is row-wise, and every weight is
// read once for all rows. The output has one row per sequence ([S, cols], after
// take_last) or one per row ([T, cols]). State::run is a step of one sequence.
//
// Lock order: the run mutexes of a step's States (in address order), then the Program's
// step mutex. copy_kv_from() takes two State mutexes at once (std::scoped_lock, which
// backs off rather than wait holding one) and never the step mutex; the State
// constructor takes only the step mutex. Nothing takes a State mutex while holding the
// step mutex, so no cycle is possible.
//
// ---------------------------------------------------------------------------
// Tensors. Every tensor is 2-D [rows, cols] f32 except weights (any DType).
//   kind WEIGHT : a bundle tensor by name (shape [rows, cols]; 1-D -> [1, cols]).
//   kind CONST  : f32 data given at construction, copied into the Program.
//   kind ARENA  : f32 activations at a byte offset in the workspace's arena. rows is
//                 ROWS_T (-1: the rows of the current step), ROWS_S (-2: its
//                 sequences; planned for max_seqs rows) or a fixed count.
//   kind TOKENS : the int32 token ids of the current step, [T] (exactly one).
// The planner guarantees arena tensors that are live at the same time do not
// overlap, except where an op declares in-place use (see below).
//
// Ops (name, inputs -> outputs, int params / float params), declared in runtime/ops.def with
// their arity, in-place pairs and named params (a param in parentheses has a default and may be
// omitted). x rows are ROWS_T, ROWS_S or fixed.
// "Position" below is the row's own position in its own sequence; "the KV cache" is the cache
// of the row's sequence.
//   embed         [E(weight vocab x D), tokens] -> [x (T x D)]
//   rms_norm      [x, w(1 x D)] -> [y]                          f: [eps]
//   add           [a, b] -> [y]                                 (y may alias a or b)
//   matmul        [x (R x K), W (N x K), bias(1 x N) or -1] -> [y (R x N)]
//   matmul_multi  [x, W1, b1, W2, b2, ...] (bias -1 = none) -> [y1, y2, ...]
//                 same as several matmuls on one x: activations are quantized once.
//   matmul_swiglu [x, Wg, Wu] -> [y (R x F)]   y = silu(x Wg^T) * (x Wu^T)
//   swiglu        [g, u] -> [y]                y = silu(g) * u    (y may alias g or u)
//   add_rms_norm  [a, b, w] -> [s, y]          s = a + b; y = rms_norm(s) * w  f: [eps]
//                 (s may alias a or b; y may alias a or b too, but not s)
//   rope          [x (T x H*Dh), table (CONST max_pos x rope_dim)] -> [y]  (y may alias x)
//                 i: [n_heads, head_dim, rope_dim]
//                 table row p holds cos(p*f_0..f_{rope_dim/2-1}) then sin(...) for the same.
//                 NeoX / HF rotate_half pairing: within each head, dims i and
//                 i + rope_dim/2 rotate together for i < rope_dim/2; dims >= rope_dim pass through.
//                 rotates each row by its own position.
//   attention     [q (T x Hq*Dh), k (T x Hkv*Dh), v (T x Hkv*Dh)] -> [o (T x Hq*Dh)]
//                 i: [layer, n_heads, n_kv_heads, head_dim, (window)]  f: [scale, (softcap)]
//                 Stores each k, v row into the layer's cache of its sequence at its position
//                 p, then for each row causal softmax(s) v over positions [lo, p] where
//                 s = q k^T * scale, or softcap * tanh(q k^T * scale / softcap) if softcap > 0;
//                 lo = 0, or max(0, p-window+1) if window > 0 (sliding window: the row
//                 sees `window` positions, itself included). A layer with a window keeps a ring
//                 of min(max_context, window + max_tokens - 1) positions (position p in slot
//                 p % capacity), so its cache follows the window; every attention op of one
//                 layer must use the same window. Omitted window / softcap = 0 (none).
//                 Query head h reads KV head h / (Hq / Hkv) (grouped-query attention).
//   take_last     [x (T x D)] -> [y (S x D)]   the last row of each sequence ([1 x D]
//                 allowed in a program of max_seqs 1)
//   head_rms_norm [x (R x H*Dh), w (1 x Dh)] -> [y]   i: [n_heads, head_dim]  f: [eps]
//                 rms_norm of every head's Dh slice of each row (Qwen3 / Gemma 3 q and k
//                 norms), all heads sharing w.                      (y may alias x)
//   geglu         [g, u] -> [y]                y = gelu_tanh(g) * u  (y may alias g or u)
//                 gelu_tanh(v) = 0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3)))
//   matmul_geglu  [x, Wg, Wu] -> [y (R x F)]   y = gelu_tanh(x Wg^T) * (x Wu^T)
//   scale         [x] -> [y]                   y = x * s          f: [s]   (y may alias x)
//   softcap       [x] -> [y]                   y = cap * tanh(x / cap)  f: [cap > 0]
//                                                                        (y may alias x)
//   layer_norm    [x, w(1 x D), b(1 x D)] -> [y]                f: [eps]   (y may alias x)
//                 y = (x - mean(x)) / sqrt(var(x) + eps) * w + b, per row (biased variance).
//   pos_embed     [x (T x D), P (weight or const max_pos x D)] -> [y]    (y may alias x)
//                 y[t] = x[t] + P[position of row t]: learned absolute positions (GPT-2). P may have
//                 any dtype; its rows are dequantized like embed's. Caps max_context at max_pos.
//   gelu          [x] -> [y]                   tanh approximation ("gelu_new"):  (y may alias x)
//                 y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// ---------------------------------------------------------------------------
#pragma once
#include <memory>
#include <string>
#include <vector>
#include "common.h"
#include "format/bundle_reader.h"
#include "kernels/kernels.h"
#include "runtime/ops.h"

namespace plm {

constexpr int64_t ROWS_T = -1;  // rows: the tokens of the current step
constexpr int64_t ROWS_S = -2;  // rows: the sequences of the current step

enum class TensorKind : int { WEIGHT = 0, CONST = 1, ARENA = 2, TOKENS = 3 };

struct TensorDesc {
  TensorKind kind;
  int64_t rows = 0, cols = 0;   // ARENA: rows may be ROWS_T
  std::string weight_name;      // WEIGHT
  std::vector<float> const_data;// CONST (rows*cols values)
  int64_t arena_offset = 0;     // ARENA, bytes, multiple of 64
  // WEIGHT without a bundle (tests, tiny programs): raw bytes in the bundle's layout
  // (tensor_bytes(inline_dtype, rows, cols)); copied into the Program. -1 = from the bundle.
  int inline_dtype = -1;
  std::vector<uint8_t> inline_data;
};

struct KVConfig {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

class Program {
 public:
  // Validates every op against the tensor table (arity, shapes, dtypes, arena bounds)
  // and throws UnsupportedError / std::invalid_argument with the op index on failure.
  Program(std::shared_ptr<Bundle> bundle, std::vector<TensorDesc> tensors,
          std::vector<OpDesc> ops, int64_t arena_bytes, int max_tokens, KVConfig kv,
          int output_tensor, int n_threads, const std::string& kernels = "",
          const std::string& activations = "int8x2", int max_seqs = 1,
          const std::string& sparse_layout = "auto");
  // activations: how matmuls with quantized weights see their input rows. "int8": one int8
  // level per block of 32 (kernels::BlockQ8A, fastest). "int8x2": a second int8 level holds
  // the residual (kernels::BlockQ8A2, ~15-bit precision), which keeps outlier-heavy models
  // (SmolLM2) on their float answers for one extra integer dot product per block.
  // kernels: a variant name for kernels::kernels_by_name ("" = best_kernels()).
  // sparse_layout: the 2:4-sparse weights kept in place or expanded at load (BackendOptions).
  ~Program();
  int max_tokens() const;   // rows per step, over all its sequences
  int max_seqs() const;     // sequences per step (1..min(max_tokens, 256))
  int n_threads() const;
  int64_t arena_bytes() const;
  const char* kernel_name() const;
  const char* activations() const;
  int sparse_expanded() const;  // 2:4-sparse weight tensors expanded into dense ones at load
  int64_t output_cols() const;
  // Per KV layer: its attention window (0 = full attention, -1 = the layer has no attention op).
  const std::vector<int64_t>& layer_windows() const;
  // Why State::kv_shift cannot move this program's KV cache ("" when it can): a layer whose keys
  // are not rotated by a rope op (learned positions, GPT-2), or an encoder.
  const std::string& shift_unsupported() const;
  // Rows of the output of a step of n_rows rows with n_out output rows (ROWS_T, ROWS_S or fixed).
  int64_t output_rows(int n_rows, int n_out = 1) const;
  struct Impl;
  Impl* impl() const { return impl_.get(); }
 private:
  std::unique_ptr<Impl> impl_;
};

struct SeqInput;

// Memory is reserved for the worst case (max_context, max_tokens) but committed by the
// OS only as it is touched. run() calls on one Program are serialised (one shared
// workspace and thread pool, see the top of this file); distinct States may be made,
// copied and destroyed while another State of the same Program runs.
class State {
 public:
  // kv_type: the KV cache's element type, "f32" or "f16" (half the memory and the attention's
  // reads; llama.cpp's default, and the Python Engine's).
  State(const Program& program, int max_context, const std::string& kv_type = "f32");
  ~State();
  int max_context() const;
  // Runs T = n_tokens (1..max_tokens) tokens at positions pos..pos+T-1 and writes the
  // output tensor (rows x output_cols f32) to out. Throws ContextOverflowError if
  // pos + T > max_context.
  void run(const int32_t* tokens, int n_tokens, int pos, float* out);
  // Positions the KV cache of each layer holds (max_context, or less for a window), and
  // the bytes reserved for all of them.
  std::vector<int64_t> kv_capacities() const;
  int64_t kv_bytes() const;
  const char* kv_type() const;  // "f16" or "f32"
  // Bytes of K and V that positions [0, n_positions) occupy: per layer min(n_positions,
  // capacity) x 2 x n_kv_heads x head_dim x element size (a ring holds at most its capacity).
  int64_t kv_used_bytes(int64_t n_positions) const;
  // Makes this State's KV cache hold what `other`'s holds for positions [0, n_positions): every
  // layer's slots of those positions (a ring's last min(n_positions, capacity) positions, i.e.
  // the whole ring once it has wrapped). Slots past them are left as they are. Both States must
  // have the same KV shape (layers, KV heads, head_dim), KV type, capacities and max_context
  // (std::invalid_argument otherwise). Waits for a run() on either State to finish.
  void copy_kv_from(const State& other, int64_t n_positions);
  // The KV slots of positions [0, n_positions) packed into `out` (kv_used_bytes(n_positions) bytes:
  // KVCache::pack's layout), and back. `bytes` must be exactly that size (std::invalid_argument
  // otherwise). Each waits for a run() on this State to finish.
  void kv_export(int64_t n_positions, uint8_t* out, int64_t bytes) const;
  void kv_import(int64_t n_positions, const uint8_t* in, int64_t bytes);
  // The KV of positions [p0, p1) alone, packed the same way (per layer K then V, per KV head its rows),
  // kv_range_bytes(p0, p1) bytes; every layer must hold a slot per position up to p1 (no ring wrap:
  // std::invalid_argument otherwise, and for a bad range or size). Each waits for a run().
  int64_t kv_range_bytes(int64_t p0, int64_t p1) const;
  void kv_export_range(int64_t p0, int64_t p1, uint8_t* out, int64_t bytes) const;
  void kv_import_range(int64_t p0, int64_t p1, const uint8_t* in, int64_t bytes);
  // Context shift: drops positions [keep, keep + n_discard) and moves [keep + n_discard, n_positions)
  // down by n_discard, so that the cache holds the same keys and values as if those tokens had run at
  // their new positions: each moved key is rotated from its old position's rope angles to its new
  // one's (with the table its rope op used: R(new) R(old)^-1, any scaling included), values are
  // copied. Positions [0, keep) stay. A sliding-window ring holds the positions
  // [max(0, end - capacity), n_positions) (`end`: the highest position written + 1, >= n_positions,
  // as kv_cache.py tracks it); each moves to its new slot (position % capacity) or is dropped.
  // Afterwards the cache holds n_positions - n_discard positions. UnsupportedError when the program
  // cannot (Program::shift_unsupported()); std::invalid_argument for bad positions. Waits for a run().
  void kv_shift(int64_t keep, int64_t n_discard, int64_t n_positions, int64_t end);
  struct Impl;
 private:
  friend void run_batch(const Program&, const SeqInput*, int, float*);
  std::unique_ptr<Impl> impl_;
};

// One sequence's rows of a batched step: n_tokens tokens at positions pos..pos+n_tokens-1 of
// the sequence whose KV cache `state` holds. n_out: how many of its last rows an [S, cols] output
// (the logits) holds, 1..n_tokens: 1 for generation, more to verify drafted tokens.
struct SeqInput {
  State* state;
  const int32_t* tokens;
  int n_tokens;
  int pos;
  int n_out = 1;
};

// Runs one forward pass over the rows of n_seqs sequences (1..max_seqs States of `program`, each
// at most once, n_tokens >= 1 each, max_tokens rows in all): each row is embedded, rotated and
// attends at its own position in its own sequence's KV cache, and every weight is read once for
// all rows. Writes the output tensor: for an [S, cols] output (the logits) the last n_out rows of
// each sequence (max_seqs output rows in all), for [T, cols] every row (in the order of `seqs`). Same errors
// as State::run, naming the sequence; nothing runs if any input is bad. State::run is a batch of one.
void run_batch(const Program& program, const SeqInput* seqs, int n_seqs, float* out);

}  // namespace plm
