// Scalar reference kernels: the test oracle for every SIMD variant.
// Written for clarity, not speed. The integer parts (activation quantization,
// per-32-block integer dot products) define the exact results every variant must
// reproduce; only the float summation order may differ.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/kernels.h"

namespace plm::kernels {
namespace {

// ---- activations ----

// Round half away from zero; every variant must use this exact rule on x * (1/d).
inline int round_away(float v) { return (int)std::round(v); }

// One 32-block: d = amax/127, qs = round-half-away(x * (1/d)) clamped, s = d*sum(qs).
// scale < 0: the block's own, max|x| / 127; else that scale (the second level of BlockQ8A2).
void quantize_block(const float* xb, float* d_out, float* s_out, int8_t* qs, float scale = -1.0f) {
  float amax = 0.0f;
  if (scale < 0.0f)
    for (int j = 0; j < 32; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
  const float d = scale < 0.0f ? amax / 127.0f : scale;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  int sum = 0;
  for (int j = 0; j < 32; ++j) {
    int q = round_away(xb[j] * id);
    q = q < -127 ? -127 : (q > 127 ? 127 : q);
    qs[j] = (int8_t)q;
    sum += q;
  }
  *d_out = d;
  *s_out = d * (float)sum;
}

void quantize_act_ref(const float* x, BlockQ8A* out, int K) {
  for (int b = 0; b < K / 32; ++b) quantize_block(x + b * 32, &out[b].d, &out[b].s, out[b].qs);
}

// Two levels: the residual r = x - d*q is formed with one rounding (std::fma), then
// quantized by the same rule at the scale d / 256 (see kernels.h).
void quantize_act2_ref(const float* x, BlockQ8A2* out, int K) {
  for (int b = 0; b < K / 32; ++b) {
    const float* xb = x + b * 32;
    BlockQ8A2& o = out[b];
    quantize_block(xb, &o.d, &o.s, o.qs);
    float r[32];
    for (int j = 0; j < 32; ++j) r[j] = std::fma(-o.d, (float)o.qs[j], xb[j]);
    quantize_block(r, &o.d2, &o.s2, o.qs2, o.d * kLevel2Scale);
  }
}

// ---- per-row dot products, one per weight type ----

float row_dot_f32(const uint8_t* row, const float* x, int64_t K) {
  const float* w = reinterpret_cast<const float*>(row);
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) acc += w[k] * x[k];
  return acc;
}

float row_dot_f16(const uint8_t* row, const float* x, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    fp16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    acc += fp16_to_fp32(h) * x[k];
  }
  return acc;
}

float row_dot_q8_0(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t idot = 0;
    for (int j = 0; j < 32; ++j) idot += (int32_t)w[b].qs[j] * xq[b].qs[j];
    acc += fp16_to_fp32(w[b].d) * xq[b].d * (float)idot;
  }
  return acc;
}

// One 32-element nibble run: sum_j q_j * a_j with q in [0, 15] (no offset applied).
inline int32_t nibble_dot(const uint8_t* qs, const int8_t* a, int32_t* asum) {
  int32_t dot = 0, s = 0;
  for (int j = 0; j < 16; ++j) {
    dot += (int32_t)(qs[j] & 0x0f) * a[j] + (int32_t)(qs[j] >> 4) * a[j + 16];
    s += a[j] + a[j + 16];
  }
  *asum = s;
  return dot;
}

// Q4_0 family: x = d*(q-8); the -8 is applied exactly in integers.
template <int G>
float row_dot_q4_0(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const auto* w = reinterpret_cast<const BlockQ4_0G<G>*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const float dw = fp16_to_fp32(w[b].d);
    for (int r = 0; r < G / 32; ++r) {
      const BlockQ8A& a = xq[b * (G / 32) + r];
      int32_t asum;
      const int32_t idot = nibble_dot(w[b].qs + 16 * r, a.qs, &asum) - 8 * asum;
      acc += dw * a.d * (float)idot;
    }
  }
  return acc;
}

// Q4_1 family: x = d*q + m; sum_k m * xa_k = m * s of each activation block.
template <int G>
float row_dot_q4_1(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const auto* w = reinterpret_cast<const BlockQ4_1G<G>*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const float dw = fp16_to_fp32(w[b].d), mw = fp16_to_fp32(w[b].m);
    for (int r = 0; r < G / 32; ++r) {
      const BlockQ8A& a = xq[b * (G / 32) + r];
      int32_t asum;
      const int32_t idot = nibble_dot(w[b].qs + 16 * r, a.qs, &asum);
      acc += dw * a.d * (float)idot + mw * a.s;
    }
  }
  return acc;
}

float row_dot_i8(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    int32_t idot = 0;
    for (int j = 0; j < 32; ++j) idot += (int32_t)w[b * 32 + j] * xq[b].qs[j];
    acc += xq[b].d * (float)idot;
  }
  return acc;  // the row scale is applied by the caller
}

// ---- the same, for two-level activations (BlockQ8A2) ----

inline int32_t idot32(const int8_t* w, const int8_t* a) {
  int32_t dot = 0;
  for (int j = 0; j < 32; ++j) dot += (int32_t)w[j] * a[j];
  return dot;
}

float row_dot2_q8_0(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const BlockQ8A2& a = xq[b];
    const float v = a.d * (float)idot32(w[b].qs, a.qs) + a.d2 * (float)idot32(w[b].qs, a.qs2);
    acc += fp16_to_fp32(w[b].d) * v;
  }
  return acc;
}

template <int G>
float row_dot2_q4_0(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const auto* w = reinterpret_cast<const BlockQ4_0G<G>*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const float dw = fp16_to_fp32(w[b].d);
    for (int r = 0; r < G / 32; ++r) {
      const BlockQ8A2& a = xq[b * (G / 32) + r];
      int32_t asum, asum2;
      const int32_t i1 = nibble_dot(w[b].qs + 16 * r, a.qs, &asum) - 8 * asum;
      const int32_t i2 = nibble_dot(w[b].qs + 16 * r, a.qs2, &asum2) - 8 * asum2;
      acc += dw * (a.d * (float)i1 + a.d2 * (float)i2);
    }
  }
  return acc;
}

template <int G>
float row_dot2_q4_1(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const auto* w = reinterpret_cast<const BlockQ4_1G<G>*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const float dw = fp16_to_fp32(w[b].d), mw = fp16_to_fp32(w[b].m);
    for (int r = 0; r < G / 32; ++r) {
      const BlockQ8A2& a = xq[b * (G / 32) + r];
      int32_t asum;
      const int32_t i1 = nibble_dot(w[b].qs + 16 * r, a.qs, &asum);
      const int32_t i2 = nibble_dot(w[b].qs + 16 * r, a.qs2, &asum);
      acc += dw * (a.d * (float)i1 + a.d2 * (float)i2) + mw * (a.s + a.s2);
    }
  }
  return acc;
}

float row_dot2_i8(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b)
    acc += xq[b].d * (float)idot32(w + 32 * b, xq[b].qs) + xq[b].d2 * (float)idot32(w + 32 * b, xq[b].qs2);
  return acc;  // the row scale is applied by the caller
}

// ---- GGUF 5-bit and K-quant types (any activation level count) ----
// Integer codes are decoded to bytes first; every dot product over a 32-run (or a
// 16-half of one for Q6_K) is exact in int32, then scaled in float:
//   one level:  a.d * idot;   two levels: a.d * idot(q) + a.d2 * idot(q2).
// The asymmetric types' zero points use the activation sums (s, or s + s2).

inline int32_t idot_codes(const uint8_t* q, const int8_t* a, int n, int off) {
  int32_t dot = 0;
  for (int j = 0; j < n; ++j) dot += ((int32_t)q[j] - off) * a[j];
  return dot;
}
inline float level_dot(const uint8_t* q, const BlockQ8A& a, int off) {
  return a.d * (float)idot_codes(q, a.qs, 32, off);
}
inline float level_dot(const uint8_t* q, const BlockQ8A2& a, int off) {
  return a.d * (float)idot_codes(q, a.qs, 32, off) + a.d2 * (float)idot_codes(q, a.qs2, 32, off);
}
// Q6_K: two 16-element sub-blocks with their own integer scales share one activation block.
inline int32_t idot_halves(const uint8_t* q, const int8_t* a, int sc0, int sc1) {
  return sc0 * idot_codes(q, a, 16, 32) + sc1 * idot_codes(q + 16, a + 16, 16, 32);
}
inline float level_dot6(const uint8_t* q, const BlockQ8A& a, int sc0, int sc1) {
  return a.d * (float)idot_halves(q, a.qs, sc0, sc1);
}
inline float level_dot6(const uint8_t* q, const BlockQ8A2& a, int sc0, int sc1) {
  return a.d * (float)idot_halves(q, a.qs, sc0, sc1) + a.d2 * (float)idot_halves(q, a.qs2, sc0, sc1);
}
inline float act_sum(const BlockQ8A& a) { return a.s; }
inline float act_sum(const BlockQ8A2& a) { return a.s + a.s2; }

// 32 five-bit codes (0..31) of a Q5_0/Q5_1 block.
inline void q5_codes(const uint8_t* qh4, const uint8_t* qs, uint8_t* q) {
  uint32_t qh;
  std::memcpy(&qh, qh4, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (uint8_t)((qs[j] & 0x0f) | ((qh >> j) & 1) << 4);
    q[j + 16] = (uint8_t)((qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4);
  }
}
// Codes of sub-block s (32 elements) of a Q4_K (qh == nullptr) or Q5_K block.
inline void k_codes(const uint8_t* qs, const uint8_t* qh, int s, uint8_t* q) {
  const int shift = 4 * (s & 1);
  for (int j = 0; j < 32; ++j) {
    q[j] = (uint8_t)((qs[32 * (s / 2) + j] >> shift) & 0x0f);
    if (qh) q[j] |= (uint8_t)(((qh[j] >> s) & 1) << 4);
  }
}
// All 256 codes (0..63) of a Q6_K block.
inline void q6_codes(const BlockQ6_K& b, uint8_t* q) {
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, r = e % 128;
    const int lo = (b.ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0f;
    const int hi = (b.qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
    q[e] = (uint8_t)(lo | hi << 4);
  }
}

template <class Act, bool Asym>
float row_dot_q5(const uint8_t* row, const Act* xq, int64_t K) {
  float acc = 0.0f;
  uint8_t q[32];
  for (int64_t b = 0; b < K / 32; ++b) {
    if constexpr (Asym) {
      const BlockQ5_1& w = reinterpret_cast<const BlockQ5_1*>(row)[b];
      q5_codes(w.qh, w.qs, q);
      acc += fp16_to_fp32(w.d) * level_dot(q, xq[b], 0) + fp16_to_fp32(w.m) * act_sum(xq[b]);
    } else {
      const BlockQ5_0& w = reinterpret_cast<const BlockQ5_0*>(row)[b];
      q5_codes(w.qh, w.qs, q);
      acc += fp16_to_fp32(w.d) * level_dot(q, xq[b], 16);
    }
  }
  return acc;
}

// Q4_K (Q5 = false) and Q5_K: per sub-block, (d*sc) * dot - (dmin*mn) * sum(activations).
template <class Act, bool Q5>
float row_dot_qk(const uint8_t* row, const Act* xq, int64_t K) {
  float acc = 0.0f;
  uint8_t q[32], sc[8], mn[8];
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t *scales, *qs, *qh = nullptr;
    fp16_t hd, hdmin;
    if constexpr (Q5) {
      const BlockQ5_K& w = reinterpret_cast<const BlockQ5_K*>(row)[b];
      hd = w.d, hdmin = w.dmin, scales = w.scales, qs = w.qs, qh = w.qh;
    } else {
      const BlockQ4_K& w = reinterpret_cast<const BlockQ4_K*>(row)[b];
      hd = w.d, hdmin = w.dmin, scales = w.scales, qs = w.qs;
    }
    const float d = fp16_to_fp32(hd), dmin = fp16_to_fp32(hdmin);
    kquant_scales_mins(scales, sc, mn);
    for (int s = 0; s < 8; ++s) {
      const Act& a = xq[8 * b + s];
      k_codes(qs, qh, s, q);
      acc += d * (float)sc[s] * level_dot(q, a, 0) - dmin * (float)mn[s] * act_sum(a);
    }
  }
  return acc;
}

template <class Act>
float row_dot_q6_k(const uint8_t* row, const Act* xq, int64_t K) {
  float acc = 0.0f;
  uint8_t q[256];
  for (int64_t b = 0; b < K / 256; ++b) {
    const BlockQ6_K& w = reinterpret_cast<const BlockQ6_K*>(row)[b];
    q6_codes(w, q);
    float v = 0.0f;
    for (int r = 0; r < 8; ++r) v += level_dot6(q + 32 * r, xq[8 * b + r], w.scales[2 * r], w.scales[2 * r + 1]);
    acc += fp16_to_fp32(w.d) * v;
  }
  return acc;
}

float row_dot_bf16(const uint8_t* row, const float* x, int64_t K) {
  float acc = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    acc += bf16_to_fp32(h) * x[k];
  }
  return acc;
}

// ---- matmul wrappers ----

template <float (*RowDot)(const uint8_t*, const float*, int64_t)>
void matmul_float(const WeightView& w, const float* x, size_t ldx, const BlockQ8A*, int T,
                  float* y, size_t ldy, int n0, int n1) {
  for (int t = 0; t < T; ++t)
    for (int n = n0; n < n1; ++n)
      y[t * ldy + n] = RowDot(w.data + (size_t)n * w.row_stride, x + t * ldx, w.cols);
}

template <class Act, float (*RowDot)(const uint8_t*, const Act*, int64_t)>
void matmul_quant_t(const WeightView& w, const float*, size_t, const Act* xq, int T,
                  float* y, size_t ldy, int n0, int n1) {
  const int64_t nb = w.cols / 32;
  for (int t = 0; t < T; ++t)
    for (int n = n0; n < n1; ++n) {
      float v = RowDot(w.data + (size_t)n * w.row_stride, xq + t * nb, w.cols);
      if (w.row_scales) v *= w.row_scales[n];  // I8
      y[t * ldy + n] = v;
    }
}

template <float (*RowDot)(const uint8_t*, const BlockQ8A*, int64_t)>
constexpr MatmulFn matmul_quant = matmul_quant_t<BlockQ8A, RowDot>;
template <float (*RowDot)(const uint8_t*, const BlockQ8A2*, int64_t)>
constexpr MatmulFn2 matmul2_quant = matmul_quant_t<BlockQ8A2, RowDot>;

// ---- dequantization (embeddings) ----

template <int G>
void dequant_q4_0(const uint8_t* row, float* out, int64_t cols) {
  const auto* w = reinterpret_cast<const BlockQ4_0G<G>*>(row);
  for (int64_t b = 0; b < cols / G; ++b) {
    const float d = fp16_to_fp32(w[b].d);
    for (int r = 0; r < G / 32; ++r)
      for (int j = 0; j < 16; ++j) {
        const uint8_t v = w[b].qs[16 * r + j];
        out[b * G + 32 * r + j] = d * (float)((v & 0x0f) - 8);
        out[b * G + 32 * r + j + 16] = d * (float)((v >> 4) - 8);
      }
  }
}

template <int G>
void dequant_q4_1(const uint8_t* row, float* out, int64_t cols) {
  const auto* w = reinterpret_cast<const BlockQ4_1G<G>*>(row);
  for (int64_t b = 0; b < cols / G; ++b) {
    const float d = fp16_to_fp32(w[b].d), m = fp16_to_fp32(w[b].m);
    for (int r = 0; r < G / 32; ++r)
      for (int j = 0; j < 16; ++j) {
        const uint8_t v = w[b].qs[16 * r + j];
        out[b * G + 32 * r + j] = d * (float)(v & 0x0f) + m;
        out[b * G + 32 * r + j + 16] = d * (float)(v >> 4) + m;
      }
  }
}

// Same float operations as gguf's numpy dequantizers, so the values are bit-identical.
template <bool Asym>
void dequant_q5(const uint8_t* row, float* out, int64_t cols) {
  uint8_t q[32];
  for (int64_t b = 0; b < cols / 32; ++b) {
    float d, m = 0.0f;
    if constexpr (Asym) {
      const BlockQ5_1& w = reinterpret_cast<const BlockQ5_1*>(row)[b];
      q5_codes(w.qh, w.qs, q);
      d = fp16_to_fp32(w.d), m = fp16_to_fp32(w.m);
    } else {
      const BlockQ5_0& w = reinterpret_cast<const BlockQ5_0*>(row)[b];
      q5_codes(w.qh, w.qs, q);
      d = fp16_to_fp32(w.d);
    }
    for (int j = 0; j < 32; ++j) {
      if constexpr (Asym) {
        const volatile float dq = d * (float)q[j];  // no fused multiply-add: gguf rounds twice
        out[b * 32 + j] = dq + m;
      } else {
        out[b * 32 + j] = d * (float)((int)q[j] - 16);
      }
    }
  }
}

template <bool Q5>
void dequant_qk(const uint8_t* row, float* out, int64_t cols) {
  uint8_t q[32], sc[8], mn[8];
  for (int64_t b = 0; b < cols / 256; ++b) {
    const uint8_t *scales, *qs, *qh = nullptr;
    fp16_t hd, hdmin;
    if constexpr (Q5) {
      const BlockQ5_K& w = reinterpret_cast<const BlockQ5_K*>(row)[b];
      hd = w.d, hdmin = w.dmin, scales = w.scales, qs = w.qs, qh = w.qh;
    } else {
      const BlockQ4_K& w = reinterpret_cast<const BlockQ4_K*>(row)[b];
      hd = w.d, hdmin = w.dmin, scales = w.scales, qs = w.qs;
    }
    kquant_scales_mins(scales, sc, mn);
    for (int s = 0; s < 8; ++s) {
      k_codes(qs, qh, s, q);
      const float ds = fp16_to_fp32(hd) * (float)sc[s], dm = fp16_to_fp32(hdmin) * (float)mn[s];
      for (int j = 0; j < 32; ++j) {
        const volatile float dq = ds * (float)q[j];
        out[b * 256 + 32 * s + j] = dq - dm;
      }
    }
  }
}

void dequant_q6_k(const uint8_t* row, float* out, int64_t cols) {
  uint8_t q[256];
  for (int64_t b = 0; b < cols / 256; ++b) {
    const BlockQ6_K& w = reinterpret_cast<const BlockQ6_K*>(row)[b];
    q6_codes(w, q);
    const float d = fp16_to_fp32(w.d);
    for (int e = 0; e < 256; ++e) out[b * 256 + e] = d * (float)w.scales[e / 16] * (float)((int)q[e] - 32);
  }
}

// I8 rows carry no scale of their own: the caller multiplies by the row scale.
void dequant_row_ref(DType t, const void* rowp, float* out, int64_t cols) {
  const uint8_t* row = static_cast<const uint8_t*>(rowp);
  switch (t) {
    case DType::F32: std::memcpy(out, row, (size_t)cols * 4); break;
    case DType::F16:
      for (int64_t k = 0; k < cols; ++k) {
        fp16_t h;
        std::memcpy(&h, row + 2 * k, 2);
        out[k] = fp16_to_fp32(h);
      }
      break;
    case DType::Q8_0: {
      const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
      for (int64_t b = 0; b < cols / 32; ++b) {
        const float d = fp16_to_fp32(w[b].d);
        for (int j = 0; j < 32; ++j) out[b * 32 + j] = d * (float)w[b].qs[j];
      }
      break;
    }
    case DType::Q4_0: dequant_q4_0<32>(row, out, cols); break;
    case DType::Q4_0_G64: dequant_q4_0<64>(row, out, cols); break;
    case DType::Q4_0_G128: dequant_q4_0<128>(row, out, cols); break;
    case DType::Q4_1: dequant_q4_1<32>(row, out, cols); break;
    case DType::Q4_1_G64: dequant_q4_1<64>(row, out, cols); break;
    case DType::Q4_1_G128: dequant_q4_1<128>(row, out, cols); break;
    case DType::I8:
      for (int64_t k = 0; k < cols; ++k) out[k] = (float)reinterpret_cast<const int8_t*>(row)[k];
      break;
    case DType::Q5_0: dequant_q5<false>(row, out, cols); break;
    case DType::Q5_1: dequant_q5<true>(row, out, cols); break;
    case DType::Q4_K: dequant_qk<false>(row, out, cols); break;
    case DType::Q5_K: dequant_qk<true>(row, out, cols); break;
    case DType::Q6_K: dequant_q6_k(row, out, cols); break;
    case DType::BF16:
      for (int64_t k = 0; k < cols; ++k) {
        uint16_t h;
        std::memcpy(&h, row + 2 * k, 2);
        out[k] = bf16_to_fp32(h);
      }
      break;
    default: throw UnsupportedError("dequant_row: unknown tensor type");
  }
}

// ---- elementwise ----

float dot_ref(const float* a, const float* b, int n) {
  float acc = 0.0f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}
void axpy_ref(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}
void weighted_sum_ref(const float* w, size_t ldw, int G, const float* rows, size_t ldr, int n, float* out,
                      size_t ldo, int dh) {
  for (int g = 0; g < G; ++g)
    for (int p = 0; p < n; ++p)
      for (int i = 0; i < dh; ++i) out[g * ldo + i] += w[g * ldw + p] * rows[(size_t)p * ldr + i];
}
void scale_ref(float a, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] *= a;
}
void rms_norm_ref(const float* x, const float* w, float* y, int n, float eps) {
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += (double)x[i] * x[i];
  const float r = (float)(1.0 / std::sqrt(ss / n + eps));
  for (int i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}
void weighted_sum_f16_ref(const float* w, size_t ldw, int G, const fp16_t* rows, size_t ldr, int n,
                          float* out, size_t ldo, int dh) {
  for (int g = 0; g < G; ++g)
    for (int p = 0; p < n; ++p)
      for (int i = 0; i < dh; ++i) out[g * ldo + i] += w[g * ldw + p] * fp16_to_fp32(rows[(size_t)p * ldr + i]);
}
// Q8_0 KV rows: block b of a row is {f16 d; int8 q[32]} at byte 34 b.
inline float q8_0_scale(const uint8_t* block) {
  fp16_t h;
  std::memcpy(&h, block, 2);
  return fp16_to_fp32(h);
}
void scores_q8_0_ref(const uint8_t* rows, size_t ldr, const float* q, size_t ldq, int G, float* s, size_t lds,
                     int p0, int p1, int dh) {
  for (int g = 0; g < G; ++g)
    for (int p = p0; p < p1; ++p) {
      const uint8_t* r = rows + (size_t)p * ldr;
      float sum = 0.f;
      for (int b = 0; b < dh / 32; ++b, r += 34) {
        float part = 0.f;  // within a block: the integer values times the float query
        for (int i = 0; i < 32; ++i) part += q[g * ldq + b * 32 + i] * (float)(int8_t)r[2 + i];
        sum += q8_0_scale(r) * part;
      }
      s[g * lds + p] = sum;
    }
}
void weighted_sum_q8_0_ref(const float* w, size_t ldw, int G, const uint8_t* rows, size_t ldr, int n,
                           float* out, size_t ldo, int dh) {
  for (int g = 0; g < G; ++g)
    for (int p = 0; p < n; ++p) {
      const uint8_t* r = rows + (size_t)p * ldr;
      for (int b = 0; b < dh / 32; ++b, r += 34) {
        const float a = w[g * ldw + p] * q8_0_scale(r);
        for (int i = 0; i < 32; ++i) out[g * ldo + b * 32 + i] += a * (float)(int8_t)r[2 + i];
      }
    }
}
void to_f16_ref(const float* x, fp16_t* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}
float max_ref(const float* s, int n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < n; ++i) m = std::max(m, s[i]);
  return m;
}
float exp_sum_ref(float* s, int n, float m, float scale) {
  float sum = 0.f;
  for (int i = 0; i < n; ++i) {
    s[i] = std::exp((s[i] - m) * scale);
    sum += s[i];
  }
  return sum;
}
void silu_mul_ref(const float* g, const float* u, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
void add_ref(const float* a, const float* b, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

}  // namespace

const KernelTable& ref_kernels() {
  static const KernelTable table = {
      "ref",
      {
          matmul_float<row_dot_f32>,           // F32
          matmul_float<row_dot_f16>,           // F16
          matmul_quant<row_dot_q8_0>,          // Q8_0
          matmul_quant<row_dot_q4_0<32>>,      // Q4_0
          matmul_quant<row_dot_q4_1<32>>,      // Q4_1
          matmul_quant<row_dot_q4_0<64>>,      // Q4_0_G64
          matmul_quant<row_dot_q4_0<128>>,     // Q4_0_G128
          matmul_quant<row_dot_q4_1<64>>,      // Q4_1_G64
          matmul_quant<row_dot_q4_1<128>>,     // Q4_1_G128
          matmul_quant<row_dot_i8>,            // I8
          matmul_quant<row_dot_q5<BlockQ8A, false>>,   // Q5_0
          matmul_quant<row_dot_q5<BlockQ8A, true>>,    // Q5_1
          matmul_quant<row_dot_qk<BlockQ8A, false>>,   // Q4_K
          matmul_quant<row_dot_qk<BlockQ8A, true>>,    // Q5_K
          matmul_quant<row_dot_q6_k<BlockQ8A>>,        // Q6_K
          matmul_float<row_dot_bf16>,                  // BF16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q8_0_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_0_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_1_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // I8_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q5_0_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q5_1_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_0_G64_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_0_G128_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_1_G64_X16
          matmul_x16_gather<BlockQ8A, ref_kernel_table>,     // Q4_1_G128_X16
          matmul_sparse_expand<BlockQ8A, ref_kernel_table>,  // Q4_0_24_X16
          matmul_sparse_expand<BlockQ8A, ref_kernel_table>,  // I8_24_X16
          matmul_sparse_expand<BlockQ8A, ref_kernel_table>,  // I8_BITMASK
      },
      quantize_act_ref,
      dequant_row_ref,
      dot_ref,
      axpy_ref,
      scale_ref,
      rms_norm_ref,
      silu_mul_ref,
      add_ref,
      {
          matmul2_float<matmul_float<row_dot_f32>>,   // F32
          matmul2_float<matmul_float<row_dot_f16>>,   // F16
          matmul2_quant<row_dot2_q8_0>,               // Q8_0
          matmul2_quant<row_dot2_q4_0<32>>,           // Q4_0
          matmul2_quant<row_dot2_q4_1<32>>,           // Q4_1
          matmul2_quant<row_dot2_q4_0<64>>,           // Q4_0_G64
          matmul2_quant<row_dot2_q4_0<128>>,          // Q4_0_G128
          matmul2_quant<row_dot2_q4_1<64>>,           // Q4_1_G64
          matmul2_quant<row_dot2_q4_1<128>>,          // Q4_1_G128
          matmul2_quant<row_dot2_i8>,                 // I8
          matmul2_quant<row_dot_q5<BlockQ8A2, false>>,  // Q5_0
          matmul2_quant<row_dot_q5<BlockQ8A2, true>>,   // Q5_1
          matmul2_quant<row_dot_qk<BlockQ8A2, false>>,  // Q4_K
          matmul2_quant<row_dot_qk<BlockQ8A2, true>>,   // Q5_K
          matmul2_quant<row_dot_q6_k<BlockQ8A2>>,       // Q6_K
          matmul2_float<matmul_float<row_dot_bf16>>,    // BF16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q8_0_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_0_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_1_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // I8_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q5_0_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q5_1_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_0_G64_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_0_G128_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_1_G64_X16
          matmul_x16_gather<BlockQ8A2, ref_kernel_table>,    // Q4_1_G128_X16
          matmul_sparse_expand<BlockQ8A2, ref_kernel_table>,  // Q4_0_24_X16
          matmul_sparse_expand<BlockQ8A2, ref_kernel_table>,  // I8_24_X16
          matmul_sparse_expand<BlockQ8A2, ref_kernel_table>,  // I8_BITMASK
      },
      quantize_act2_ref,
      weighted_sum_ref,
      max_ref,
      exp_sum_ref,
      to_f16_ref,
      weighted_sum_f16_ref,
      scores_q8_0_ref,
      weighted_sum_q8_0_ref,
  };
  return table;
}

}  // namespace plm::kernels
