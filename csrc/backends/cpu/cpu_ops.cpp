// The CPU backend's maths: one implementation per op, over the rows of a step. Op semantics:
// runtime/executor.h; params by name from the schema (runtime/ops.def).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "backends/cpu/cpu_backend.h"

namespace plm::cpu {

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

}  // namespace

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
  if (is_sparse(dt)) {  // expanded into a dense Q4_0 / I8 row first (an I8 row's scale stays in row_scales)
    thread_local std::vector<uint8_t> dense;
    const size_t rb = row_bytes(sparse_dense(dt), d);
    if (dense.size() < rb) dense.resize(rb);
    sparse_gather_row(dt, w.data, w.rows, d, r, dense.data());
    row = dense.data();
    dt = sparse_dense(dt);
  } else if (is_x16(dt)) {  // gathered back into row-major bytes first
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

bool Step::two_level(const OpDesc& op) const {
  const int64_t levels = param(op, act_levels_param(op.code));  // validated 0..2
  return levels == 0 ? act2 : levels == 2;
}

void Step::quantize(const float* x, int64_t rows, int64_t k, bool two) {
  const int64_t blocks = k / 32;
  if (two) {
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
  const bool two = two_level(op);
  if (any_quant) quantize(x, r, k, two);
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
      mm(w, x, k, r, y, w.rows, n0, n1, two);
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
  const bool two = two_level(op);
  if (traits(wg.dtype).quantized || traits(wu.dtype).quantized) quantize(x, r, k, two);
  float* y = f32(op.outputs[0]);  // holds the gate projection until silu_mul
  float* u = ws.up.as<float>();
  auto act = op.code == OpCode::matmul_geglu ? gelu_mul : kt.silu_mul;
  const int n_parts = matmul_parts(f, pool.n_threads());
  const int64_t align = split_align(f, n_parts);
  pool.parallel_for(n_parts, [&](int part, int) {
    int64_t n0 = split_point(f, n_parts, part, align);
    int64_t n1 = split_point(f, n_parts, part + 1, align);
    if (n0 >= n1) return;
    mm(wg, x, k, r, y, f, n0, n1, two);
    mm(wu, x, k, r, u, f, n0, n1, two);
    for (int64_t t = 0; t < r; ++t)
      act(y + t * f + n0, u + t * f + n0, y + t * f + n0, (int)(n1 - n0));
  });
}

void Step::rope(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const float* table = f32(op.inputs[1]);
  float* y = f32(op.outputs[0]);
  const int64_t n_heads = param(op, params::rope::n_heads), head_dim = param(op, params::rope::head_dim),
                rope_dim = param(op, params::rope::rope_dim);
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
  namespace a = params::attention;
  const int layer = (int)param(op, a::layer);
  const int64_t hq = param(op, a::n_heads), hkv = param(op, a::n_kv_heads), dh = param(op, a::head_dim);
  const int64_t window = param(op, a::window);
  const bool causal = param(op, a::causal) != 0;
  const float scale = param(op, a::scale);
  const float softcap = param(op, a::softcap);
  const float* q = f32(op.inputs[0]);
  const float* k = f32(op.inputs[1]);
  const float* v = f32(op.inputs[2]);
  float* o = f32(op.outputs[0]);
  const int64_t kv_cols = hkv * dh, q_cols = hq * dh, group = hq / hkv;
  // Append this step's rows first: a row attends to the rows before it in this step too. Each
  // row goes to its own sequence's cache, where each KV head is its own [capacity, head_dim]
  // block (kv_cache.h).
  thread_local std::vector<float> key_row;  // a key being rotated for a Q8_0 cache
  for (int64_t t = 0; t < n_rows; ++t) {
    const KVCache& kv = *seqs[row_seq[t]].kv;
    const int64_t cap = kv.capacity(layer), slot = row_pos[t] % cap;
    for (bool values : {false, true}) {
      uint8_t* cache = values ? kv.v(layer) : kv.k(layer);
      const KVType type = values ? kv.value_type() : kv.key_type(layer);
      const size_t rb = values ? kv.value_row_bytes() : kv.key_row_bytes(layer);
      const float* x = (values ? v : k) + t * kv_cols;
      for (int64_t h = 0; h < hkv; ++h) {
        uint8_t* dst = cache + (size_t)(h * cap + slot) * rb;
        switch (type) {
          case KVType::F16: kt.to_f16(x + h * dh, reinterpret_cast<fp16_t*>(dst), (int)dh); break;
          case KVType::F32: std::memcpy(dst, x + h * dh, (size_t)dh * sizeof(float)); break;
          case KVType::Q8_0:
            if (values) {
              kv.store_value(x + h * dh, dst);
            } else {  // keys Hadamard-rotated (kv_cache.h)
              key_row.assign(x + h * dh, x + (h + 1) * dh);
              kv.store_key(layer, key_row.data(), dst);
            }
            break;
        }
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

  // Positions are cut into chunks at fixed absolute boundaries (multiples of kAttnChunk), and each
  // (row, KV head, chunk) gives a partial result [max, sum, unnormalised weighted V] that one
  // function merges in chunk order. So a row's output depends on its own positions only, never on
  // the other rows of the step or on how tasks fall on threads: a token verified in a step of
  // several rows (speculative decoding) gets exactly the output a step of one gives it.
  const int nt = pool.n_threads();
  const int64_t pairs = (int64_t)n_rows * hkv;
  // Not causal (an encoder): a row sees its sequence's positions up to the last row of the step.
  int64_t seq_end[kMaxStepSeqs];
  if (!causal) {
    for (int i = 0; i < n_seqs; ++i) seq_end[i] = 0;
    for (int64_t t = 0; t < n_rows; ++t) seq_end[row_seq[t]] = std::max(seq_end[row_seq[t]], row_pos[t] + 1);
  }
  auto bounds = [&](int64_t t) {  // positions [lo, hi) of row t
    const int64_t hi = causal ? row_pos[t] + 1 : seq_end[row_seq[t]];
    return std::pair<int64_t, int64_t>{window > 0 ? std::max<int64_t>(0, hi - window) : 0, hi};
  };
  auto first_chunk = [&](int64_t t) { return bounds(t).first / kAttnChunk; };
  auto n_chunks_of = [&](int64_t t) {
    const auto [lo, hi] = bounds(t);
    return (hi - 1) / kAttnChunk - lo / kAttnChunk + 1;
  };
  const int64_t slot = 2 + dh;  // partial result: running max, sum, weighted V
  float* part = ws.partials.as<float>();
  const int64_t part_capacity = ws.partial_slots;  // partials (of `group` heads each) the buffer holds
  float* scores_all = ws.scores.as<float>();
  const int64_t stride = ws.scores_context;  // scores of one query head: [scores_context]
  // Soft-capped scores are final logits before the exponent: scale them up front.
  const float exp_scale = softcap > 0.f ? 1.f : scale;

  // Partial of (row t, KV head kvh, chunk j) into dst[g * slot ..] for the group's query heads.
  auto partial = [&](int64_t t, int64_t kvh, int64_t j, int thread_id, float* dst) {
    const KVCache& kv = *seqs[row_seq[t]].kv;
    const int64_t cap = kv.capacity(layer);
    const size_t krb = kv.key_row_bytes(layer), vrb = kv.value_row_bytes();
    const KVType k_type = kv.key_type(layer), v_type = kv.value_type();
    const auto [lo, hi] = bounds(t);
    const int64_t p0 = std::max(lo, j * kAttnChunk), p1 = std::min(hi, (j + 1) * kAttnChunk);
    const float* qg = q + t * q_cols + kvh * group * dh;  // this group's query heads
    const uint8_t* kh = kv.k(layer) + (size_t)(kvh * cap) * krb;
    const uint8_t* vh = kv.v(layer) + (size_t)(kvh * cap) * vrb;
    float* s = scores_all + (int64_t)thread_id * group * stride;  // [group][stride]
    // q . k for the group's heads and the slots of [p0, p1) in one call per run: the K
    // cache of this head is a contiguous [capacity, head_dim] matrix (f16, f32 or Q8_0 rows).
    if (k_type == KVType::Q8_0) {  // its keys are H k: the queries turn alike, H q
      thread_local std::vector<float> qrot;
      qrot.assign(qg, qg + group * dh);
      kv_hadamard(qrot.data(), group * dh, kv_hadamard_block(dh));
      for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
        kt.scores_q8_0(kh, krb, qrot.data(), (size_t)dh, (int)group, s, (size_t)stride, (int)s0, (int)s1, (int)dh);
      });
    } else {
      const DType kv_dtype = k_type == KVType::F16 ? DType::F16 : DType::F32;
      kernels::WeightView keys{kv_dtype, cap, dh, kh, krb, nullptr};
      keys.kv_rows = true;
      for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
        kt.matmul[(int)kv_dtype](keys, qg, (size_t)dh, nullptr, (int)group, s, (size_t)stride, (int)s0, (int)s1);
      });
    }
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
      float* acc = dst + g * slot;
      acc[0] = m * exp_scale;
      acc[1] = sum;
      std::memset(acc + 2, 0, (size_t)dh * sizeof(float));
    }
    // Weighted sum of V rows, each row read once for the whole group.
    for_slots(cap, p0, p1, [&](int64_t s0, int64_t s1) {
      const uint8_t* rows = vh + (size_t)s0 * vrb;
      switch (v_type) {
        case KVType::F16:
          kt.weighted_sum_f16(s + s0, (size_t)stride, (int)group, reinterpret_cast<const fp16_t*>(rows),
                              (size_t)dh, (int)(s1 - s0), dst + 2, (size_t)slot, (int)dh);
          break;
        case KVType::F32:
          kt.weighted_sum(s + s0, (size_t)stride, (int)group, reinterpret_cast<const float*>(rows),
                          (size_t)dh, (int)(s1 - s0), dst + 2, (size_t)slot, (int)dh);
          break;
        case KVType::Q8_0:
          kt.weighted_sum_q8_0(s + s0, (size_t)stride, (int)group, rows, vrb, (int)(s1 - s0), dst + 2, (size_t)slot,
                               (int)dh);
          break;
      }
    });
  };
  // Output of (row t, KV head kvh) from its n partials at src (chunk order): rescaled to their max.
  auto merge = [&](int64_t t, int64_t kvh, const float* src, int64_t n) {
    for (int64_t g = 0; g < group; ++g) {
      auto chunk = [&](int64_t c) { return src + (c * group + g) * slot; };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < n; ++c) m = std::max(m, chunk(c)[0]);
      float* out = o + t * q_cols + (kvh * group + g) * dh;
      std::memset(out, 0, (size_t)dh * sizeof(float));
      float sum = 0.f;
      for (int64_t c = 0; c < n; ++c) {
        const float* pc = chunk(c);
        if (pc[1] == 0.f) continue;  // empty chunk
        const float w = std::exp(pc[0] - m);
        sum += w * pc[1];
        kt.axpy(w, pc + 2, out, (int)dh);
      }
      kt.scale(1.f / sum, out, (int)dh);
    }
  };

  // Every chunk its own task when the step's partials fit the buffer and there are few pairs (decode:
  // the threads share a row's positions), else one task per (row, KV head) computing its chunks in
  // turn into its thread's region. Either way the same partials, merged alike.
  std::vector<int64_t>& first = ws.attn_first;  // per pair: index of its first partial
  first.resize((size_t)pairs + 1);
  first[0] = 0;
  for (int64_t pr = 0; pr < pairs; ++pr) first[(size_t)pr + 1] = first[(size_t)pr] + n_chunks_of(pr / hkv);
  const int64_t total = first[(size_t)pairs];
  if (pairs < kAttnTasksPerThread * nt && total <= part_capacity) {
    pool.parallel_for((int)total, [&](int task, int thread_id) {
      const int64_t pr = std::upper_bound(first.begin(), first.end(), (int64_t)task) - first.begin() - 1;
      const int64_t t = pr / hkv, kvh = pr % hkv;
      partial(t, kvh, first_chunk(t) + (task - first[(size_t)pr]), thread_id, part + (int64_t)task * group * slot);
    });
    // A few pairs (decode) merge on this thread: less than a parallel region's hand-off.
    auto merge_pair = [&](int64_t pr) {
      merge(pr / hkv, pr % hkv, part + first[(size_t)pr] * group * slot, first[(size_t)pr + 1] - first[(size_t)pr]);
    };
    if (pairs <= kAttnTasksPerThread * nt) {
      for (int64_t pr = 0; pr < pairs; ++pr) merge_pair(pr);
    } else {
      pool.parallel_for((int)pairs, [&](int pr, int) { merge_pair(pr); });
    }
    return;
  }
  const int64_t region = part_capacity / nt;  // partials per thread: a row's chunks at most
  pool.parallel_for((int)pairs, [&](int pr, int thread_id) {
    const int64_t t = pr / hkv, kvh = pr % hkv, n = n_chunks_of(t);
    float* mine = part + (int64_t)thread_id * region * group * slot;
    for (int64_t c = 0; c < n; ++c) partial(t, kvh, first_chunk(t) + c, thread_id, mine + c * group * slot);
    merge(t, kvh, mine, n);
  });
}

void Step::head_rms_norm(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  const float* w = f32(op.inputs[1]);
  float* y = f32(op.outputs[0]);
  const int64_t n_heads = param(op, params::head_rms_norm::n_heads),
                dh = param(op, params::head_rms_norm::head_dim), d = n_heads * dh;
  const float eps = param(op, params::head_rms_norm::eps);
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    for (int64_t h = 0; h < n_heads; ++h)
      kt.rms_norm(x + t * d + h * dh, w, y + t * d + h * dh, (int)dh, eps);
  });
}

void Step::scale_or_softcap(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  const bool cap = op.code == OpCode::softcap;
  const float a = cap ? param(op, params::softcap::cap) : param(op, params::scale::s);
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
  const float eps = param(op, params::layer_norm::eps);
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
  const bool exact = param(op, params::gelu::exact) != 0;
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  const float inv_sqrt2 = 0.7071067811865476f;
  for_rows(rows(op.inputs[0]), [&](int64_t t) {
    const float* xr = x + t * d;
    float* yr = y + t * d;
    if (exact) {
      for (int64_t i = 0; i < d; ++i) yr[i] = 0.5f * xr[i] * (1.f + std::erf(xr[i] * inv_sqrt2));
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const float v = xr[i];
        yr[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
      }
    }
  });
}

// Row i of the output is the last row of sequence i.
void Step::take_last(const OpDesc& op) {
  const float* x = f32(op.inputs[0]);
  float* y = f32(op.outputs[0]);
  const int64_t d = tensor(op.inputs[0]).cols;
  int64_t r = 0;  // each sequence's last n_out rows, in order
  for (int i = 0; i < n_seqs; ++i) {
    const int64_t first = seqs[i].first_row + seqs[i].n_tokens - seqs[i].n_out;
    std::memcpy(y + r * d, x + first * d, (size_t)(seqs[i].n_out * d) * sizeof(float));
    r += seqs[i].n_out;
  }
}

void Step::exec(const OpDesc& op) {
  switch (op.code) {
    case OpCode::embed:
      embed(op);
      break;
    case OpCode::rms_norm: {
      const float* x = f32(op.inputs[0]);
      const float* w = f32(op.inputs[1]);
      float* y = f32(op.outputs[0]);
      const int64_t d = tensor(op.inputs[0]).cols;
      const float eps = param(op, params::rms_norm::eps);
      for_rows(rows(op.inputs[0]), [&](int64_t t) { kt.rms_norm(x + t * d, w, y + t * d, (int)d, eps); });
      break;
    }
    case OpCode::add:
    case OpCode::swiglu:
    case OpCode::geglu: {
      const float* a = f32(op.inputs[0]);
      const float* b = f32(op.inputs[1]);
      float* y = f32(op.outputs[0]);
      const int64_t d = tensor(op.inputs[0]).cols;
      auto fn = op.code == OpCode::add      ? kt.add
                : op.code == OpCode::swiglu ? kt.silu_mul
                                            : gelu_mul;
      for_rows(rows(op.inputs[0]), [&](int64_t t) { fn(a + t * d, b + t * d, y + t * d, (int)d); });
      break;
    }
    case OpCode::add_rms_norm: {
      const float* a = f32(op.inputs[0]);
      const float* b = f32(op.inputs[1]);
      const float* w = f32(op.inputs[2]);
      float* s = f32(op.outputs[0]);
      float* y = f32(op.outputs[1]);
      const int64_t d = tensor(op.inputs[0]).cols;
      const float eps = param(op, params::add_rms_norm::eps);
      for_rows(rows(op.inputs[0]), [&](int64_t t) {
        kt.add(a + t * d, b + t * d, s + t * d, (int)d);
        kt.rms_norm(s + t * d, w, y + t * d, (int)d, eps);
      });
      break;
    }
    case OpCode::matmul:
    case OpCode::matmul_multi:
      matmul(op);
      break;
    case OpCode::matmul_swiglu:
    case OpCode::matmul_geglu:
      matmul_swiglu(op);
      break;
    case OpCode::rope:
      rope(op);
      break;
    case OpCode::attention:
      attention(op);
      break;
    case OpCode::layer_norm:
      layer_norm(op);
      break;
    case OpCode::pos_embed:
      pos_embed(op);
      break;
    case OpCode::gelu:
      gelu(op);
      break;
    case OpCode::head_rms_norm:
      head_rms_norm(op);
      break;
    case OpCode::scale:
    case OpCode::softcap:
      scale_or_softcap(op);
      break;
    case OpCode::take_last:
      take_last(op);
      break;
  }
}

}  // namespace plm::cpu
