// Scheduling of steps: a State (one sequence's KV cache) and run_batch, which checks a step's
// sequences, lays out its rows and runs it on the Program's backend. What the ops mean:
// executor.h and program.cpp; how they run: backends/.
#include "runtime/executor.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/checked.h"
#include "runtime/kv_cache.h"
#include "runtime/program.h"

namespace plm {

namespace {

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

// Bytes a State (its KV cache) and the workspace it runs on reserve, in checked arithmetic.
struct StateSizes {
  std::vector<int64_t> kv_capacities;
  WorkspaceBytes workspace;
  int64_t kv = 0;
};

StateSizes state_sizes(const Program::Impl& p, int max_context, KVType kv_type) {
  StateSizes z;
  z.kv_capacities = layer_kv_capacities(p, max_context);
  z.workspace = p.backend->workspace_bytes(max_context);
  checked_mul(p.kv.head_dim, 4, "KV row bytes");  // kv_row_bytes below cannot overflow
  for (size_t l = 0; l < z.kv_capacities.size(); ++l) {
    const int64_t rows = (int64_t)(kv_row_bytes(kv_key_type(kv_type, (int)l), p.kv.head_dim) +
                                   kv_row_bytes(kv_type, p.kv.head_dim));
    const int64_t row = checked_mul(p.kv.n_kv_heads, rows, "KV row bytes");
    z.kv = checked_add(z.kv, checked_mul(z.kv_capacities[l], row, "KV cache bytes"), "KV cache bytes");
  }
  int64_t total = 0;
  for (int64_t b : {z.workspace.arena, z.workspace.scratch, z.kv}) total = checked_add(total, b, "session bytes");
  return z;
}

}  // namespace

struct State::Impl {
  const Program::Impl& p;
  int max_context;
  KVCache kv;
  std::mutex run_mutex;  // one step or copy_kv_from() at a time per State

  Impl(const Program::Impl& program, int max_context_, KVType kv_type, const StateSizes& z)
      : p(program),
        max_context(max_context_),
        kv(program.backend->allocate_kv(program.kv, z.kv_capacities, kv_type)) {}
};

State::State(const Program& program, int max_context, const std::string& kv_type) {
  const Program::Impl& p = *program.impl();
  if (max_context < 1) throw std::invalid_argument("max_context must be >= 1");
  if (kv_type != "f16" && kv_type != "f32" && kv_type != "q8_0")
    throw std::invalid_argument("kv_type must be 'f16', 'f32' or 'q8_0', got '" + kv_type + "'");
  const KVType type = kv_type == "f32" ? KVType::F32 : kv_type == "f16" ? KVType::F16 : KVType::Q8_0;
  if (type == KVType::Q8_0 && p.kv.head_dim % 32 != 0)
    throw UnsupportedError("kv_type 'q8_0' needs a head_dim that is a multiple of 32 (its blocks), this model's is " +
                           std::to_string(p.kv.head_dim) + ": use 'f16'");
  if (max_context > p.rope_positions)
    throw ContextOverflowError("max_context " + std::to_string(max_context) +
                               " exceeds the " + std::to_string(p.rope_positions) +
                               " positions of the model's rope table");
  if (max_context > p.embed_positions)
    throw ContextOverflowError("max_context " + std::to_string(max_context) +
                               " exceeds the " + std::to_string(p.embed_positions) +
                               " positions of the model's position embeddings");
  const StateSizes sizes = state_sizes(p, max_context, type);  // throws on overflow
  try {
    {
      std::lock_guard<std::mutex> lock(p.step_mutex);  // no State mutex is held here
      p.backend->reserve(max_context, sizes.workspace);
    }
    impl_ = std::make_unique<Impl>(p, max_context, type, sizes);
  } catch (const std::bad_alloc&) {  // the OS refused the reservation (address space, overcommit)
    throw ReserveError("cannot reserve memory for a session of max_context " + std::to_string(max_context) +
                       ": KV cache " + std::to_string(sizes.kv) + " bytes (" + kv_type +
                       "); the engine's shared workspace: arena " + std::to_string(sizes.workspace.arena) +
                       " bytes, scratch " + std::to_string(sizes.workspace.scratch) +
                       " bytes; a smaller max_context needs less");
  }
}

State::~State() = default;
int State::max_context() const { return impl_->max_context; }
std::vector<int64_t> State::kv_capacities() const { return impl_->kv.capacities(); }
int64_t State::kv_bytes() const { return (int64_t)impl_->kv.bytes(); }
const char* State::kv_type() const { return kv_type_name(impl_->kv.type()); }

int64_t State::kv_used_bytes(int64_t n_positions) const {
  const KVCache& kv = impl_->kv;
  if (n_positions < 0 || n_positions > impl_->max_context)
    throw std::invalid_argument("n_positions must be in 0.." + std::to_string(impl_->max_context) +
                                " (max_context), got " + std::to_string(n_positions));
  int64_t total = 0;
  for (int l = 0; l < kv.n_layers(); ++l)
    total = checked_add(total,
                        checked_product({kv.used_slots(l, n_positions), (int64_t)kv.position_bytes(l)}, "KV bytes"),
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
  else if (dst.type() != src.type())
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

void State::kv_export(int64_t n_positions, uint8_t* out, int64_t bytes) const {
  if (bytes != kv_used_bytes(n_positions))  // checks n_positions too
    throw std::invalid_argument("the KV of " + std::to_string(n_positions) + " positions is " +
                                std::to_string(kv_used_bytes(n_positions)) + " bytes, not " + std::to_string(bytes));
  std::lock_guard<std::mutex> lock(impl_->run_mutex);
  impl_->kv.pack(n_positions, out);
}

int64_t State::kv_range_bytes(int64_t p0, int64_t p1) const {
  const KVCache& kv = impl_->kv;
  if (p0 < 0 || p1 < p0 || p1 > impl_->max_context)
    throw std::invalid_argument("KV range [" + std::to_string(p0) + ", " + std::to_string(p1) + ") outside 0.." +
                                std::to_string(impl_->max_context) + " (max_context)");
  int64_t per_position = 0;
  for (int l = 0; l < kv.n_layers(); ++l) {
    if (kv.capacity(l) < p1)
      throw std::invalid_argument("layer " + std::to_string(l) + " keeps a ring of " + std::to_string(kv.capacity(l)) +
                                  " positions: its positions up to " + std::to_string(p1) + " are not all held");
    per_position = checked_add(per_position, (int64_t)kv.position_bytes(l), "KV bytes");
  }
  return checked_mul(p1 - p0, per_position, "KV bytes");
}

void State::kv_export_range(int64_t p0, int64_t p1, uint8_t* out, int64_t bytes) const {
  if (bytes != kv_range_bytes(p0, p1))
    throw std::invalid_argument("the KV of positions [" + std::to_string(p0) + ", " + std::to_string(p1) + ") is " +
                                std::to_string(kv_range_bytes(p0, p1)) + " bytes, not " + std::to_string(bytes));
  std::lock_guard<std::mutex> lock(impl_->run_mutex);
  impl_->kv.pack_range(p0, p1, out);
}

void State::kv_import_range(int64_t p0, int64_t p1, const uint8_t* in, int64_t bytes) {
  if (bytes != kv_range_bytes(p0, p1))
    throw std::invalid_argument("the KV of positions [" + std::to_string(p0) + ", " + std::to_string(p1) + ") is " +
                                std::to_string(kv_range_bytes(p0, p1)) + " bytes, not " + std::to_string(bytes));
  std::lock_guard<std::mutex> lock(impl_->run_mutex);
  impl_->kv.unpack_range(p0, p1, in);
}

void State::kv_import(int64_t n_positions, const uint8_t* in, int64_t bytes) {
  if (bytes != kv_used_bytes(n_positions))
    throw std::invalid_argument("the KV of " + std::to_string(n_positions) + " positions is " +
                                std::to_string(kv_used_bytes(n_positions)) + " bytes, not " + std::to_string(bytes));
  std::lock_guard<std::mutex> lock(impl_->run_mutex);
  impl_->kv.unpack(n_positions, in);
}

namespace {

// Rotates `row` (one KV head's key, head_dim values) from position `from` to position `to` of a rope
// table ([positions][rope_dim]: cos then sin of each pair's angle, NeoX pairing: i with i + half).
// The key was stored as R(from) k; it becomes R(to) k = R(to) R(from)^-1 (stored). Read from the
// table, so a table with any scaling (a magnitude factor too, as YaRN's) is inverted exactly.
void rerotate(float* row, const float* table, int64_t rope_dim, int64_t from, int64_t to) {
  const int64_t half = rope_dim / 2;
  const float *cf = table + from * rope_dim, *sf = cf + half;
  const float *ct = table + to * rope_dim, *st = ct + half;
  for (int64_t i = 0; i < half; ++i) {
    const double inv = 1.0 / ((double)cf[i] * cf[i] + (double)sf[i] * sf[i]);
    const double c = ((double)ct[i] * cf[i] + (double)st[i] * sf[i]) * inv;  // cos(to - from)
    const double s = ((double)st[i] * cf[i] - (double)ct[i] * sf[i]) * inv;  // sin(to - from)
    const double a = row[i], b = row[i + half];
    row[i] = (float)(a * c - b * s);
    row[i + half] = (float)(b * c + a * s);
  }
}

}  // namespace

void State::kv_shift(int64_t keep, int64_t n_discard, int64_t n_positions, int64_t end) {
  Impl& s = *impl_;
  const Program::Impl& p = s.p;
  if (!p.shift_unsupported.empty()) throw UnsupportedError("cannot shift the KV cache: " + p.shift_unsupported);
  if (keep < 0 || n_discard < 1 || n_positions > s.max_context || keep > n_positions - n_discard ||
      end < n_positions || end > s.max_context)
    throw std::invalid_argument("kv_shift: need 0 <= keep, 1 <= n_discard, keep + n_discard <= n_positions <= end "
                                "<= max_context (" + std::to_string(s.max_context) + "); got keep " +
                                std::to_string(keep) + ", n_discard " + std::to_string(n_discard) + ", n_positions " +
                                std::to_string(n_positions) + ", end " + std::to_string(end));
  std::lock_guard<std::mutex> lock(s.run_mutex);
  KVCache& kv = s.kv;
  const int64_t dh = kv.head_dim(), d = n_discard;
  std::vector<float> row((size_t)dh);
  std::vector<uint8_t> ring;  // a wrapped ring's head block, copied before its rows move
  for (int l = 0; l < kv.n_layers(); ++l) {
    if (p.layer_window[(size_t)l] < 0) continue;  // no attention: nothing cached
    const int64_t cap = kv.capacity(l), lo = std::max<int64_t>(0, end - cap);
    const Program::Impl::KeyRope& rope = p.layer_rope[(size_t)l];
    const float* table = p.tensors[(size_t)rope.table].f32;
    // Moved positions: [first, n_positions) -> minus d. A cache that has not wrapped (slot = position)
    // moves them in place, in one memmove per head; a wrapped ring through a copy of its block.
    const int64_t first = std::max(lo, keep + d);
    if (first >= n_positions) continue;
    const bool wrapped = end > cap;
    for (bool values : {false, true}) {
      uint8_t* block = values ? kv.v(l) : kv.k(l);
      const size_t rb = values ? kv.value_row_bytes() : kv.key_row_bytes(l);  // bytes of one head's row
      for (int64_t h = 0; h < kv.n_kv_heads(); ++h) {
        uint8_t* head = block + (size_t)(h * cap) * rb;
        if (!wrapped) {
          std::memmove(head + (size_t)(first - d) * rb, head + (size_t)first * rb, (size_t)(n_positions - first) * rb);
        } else {
          ring.assign(head, head + (size_t)cap * rb);
          for (int64_t q = first; q < n_positions; ++q)
            std::memcpy(head + (size_t)((q - d) % cap) * rb, ring.data() + (size_t)(q % cap) * rb, rb);
        }
        if (values) continue;
        for (int64_t q = first; q < n_positions; ++q) {  // keys: rotate to the new positions
          uint8_t* slot = head + (size_t)((q - d) % cap) * rb;
          kv.load_key(l, slot, row.data());
          rerotate(row.data(), table, rope.rope_dim, q, q - d);
          kv.store_key(l, row.data(), slot);
        }
      }
    }
  }
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
  int64_t n_rows = 0, n_out = 0;
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
    if (q.n_out < 1 || q.n_out > q.n_tokens)
      throw std::invalid_argument(which + "n_out must be in 1..n_tokens (" + std::to_string(q.n_tokens) + "), got " +
                                  std::to_string(q.n_out));
    n_rows += q.n_tokens;
    n_out += q.n_out;
  }
  if (n_out > p.max_seqs)
    throw std::invalid_argument("a step has at most " + std::to_string(p.max_seqs) +
                                " output rows (the program's max_seqs), the sequences ask for " + std::to_string(n_out));
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

  StepRows& step = p.step;
  step.n_rows = (int)n_rows;
  step.n_seqs = n_seqs;
  step.n_out = (int)n_out;
  int row = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const SeqInput& q = seqs[i];
    step.seqs[(size_t)i] = SeqSlot{&q.state->impl_->kv, q.pos, q.n_tokens, row, q.n_out};
    for (int t = 0; t < q.n_tokens; ++t, ++row) {
      step.tokens[(size_t)row] = q.tokens[t];
      step.row_pos[(size_t)row] = (int64_t)q.pos + t;
      step.row_seq[(size_t)row] = i;
    }
  }
  p.backend->run(step, out);
}

}  // namespace plm
