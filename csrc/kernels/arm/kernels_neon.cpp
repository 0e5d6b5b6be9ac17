// NEON kernels, built once per ARM feature level (PLM_NEON_LEVEL, set by CMake's one-line wrappers
// with the matching -march):
//   0  "neon"     ARMv8.0-A: every AArch64 core. Integer dot products use vmull_s8 / vmlal_s8 (each
//                 s16 lane holds two products, |sum| <= 2*128*127 < 2^15: activations are clamped to
//                 +-127) and vpadalq_s16 into s32, so every 32-block sum is exact.
//   1  "dotprod"  ARMv8.2-A +dotprod (SDOT; every recent phone core): the same dot products with
//                 vdotq_s32, and every x16 weight type read in place (x16_idot below): one SDOT by
//                 element multiplies 4 rows' 4 codes by 4 activations, so the 64-byte units of the
//                 x16 layout feed 16 rows per 4 SDOTs, with no gather.
//   2  "i8mm"     ARMv8.6-A +i8mm (SMMLA): as dotprod, and two tokens at a time through the x16 types
//                 with SMMLA (x16_pair below): a 2x8 by 8x2 int8 product per instruction, half the
//                 multiplies of SDOT for the same 16 rows x 2 tokens (prefill, verify steps); with the
//                 zips, 1.6x fewer instructions than dotprod on Q4_0 at 8 tokens, 1.03x on Q8_0.
// Otherwise one weight row x one token at a time. matmul2 (two-level activations) reuses each
// weight block's registers for both dot products. GGUF 5-bit and K-quant blocks are decoded to
// signed int8 codes (offset removed: q-16, q-32; Q4_K/Q5_K codes 0..31 as they are) one 32-run at a
// time and go through the same dot product; K-quant scales are decoded once per super-block.
// Activation quantization (both levels), rms_norm and dequant_row reuse the scalar reference
// (identical results by construction); the softmax steps and silu_mul have their own (exp_neon).
#ifndef PLM_NEON_LEVEL
#define PLM_NEON_LEVEL 0
#endif
#if PLM_NEON_LEVEL == 0
#define PLM_NEON_TABLE neon_kernel_table
#define PLM_NEON_NAME "neon"
#elif PLM_NEON_LEVEL == 1
#define PLM_NEON_TABLE dotprod_kernel_table
#define PLM_NEON_NAME "dotprod"
#elif PLM_NEON_LEVEL == 2
#define PLM_NEON_TABLE i8mm_kernel_table
#define PLM_NEON_NAME "i8mm"
#else
#error "unknown PLM_NEON_LEVEL"
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/kernels.h"
#include "kernels/prefetch.h"

namespace plm::kernels {

#if defined(__aarch64__) && defined(__ARM_NEON)
const KernelTable* PLM_NEON_TABLE();  // this level's table (end of file), for the fallbacks that call back into it

namespace {

// Decode rows prefetch the row kPrefetchRows further on, a share per 32-element run
// (kernels/prefetch.h). Prefill (T > 1) passes no prefetch.
constexpr int kPrefetchRows = 1;

// sum_j w[j] * a[j] over 32 signed bytes held as two 16-byte halves each.
#if PLM_NEON_LEVEL >= 1
inline int32_t idot32(int8x16_t w0, int8x16_t w1, const int8_t* a) {
  return vaddvq_s32(vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(a)), w1, vld1q_s8(a + 16)));
}
#else
inline int32_t idot32(int8x16_t w0, int8x16_t w1, const int8_t* a) {
  const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
  int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(a0));
  p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(a0));
  int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(a1));
  p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(a1));
  int32x4_t acc = vpaddlq_s16(p0);
  acc = vpadalq_s16(acc, p1);
  return vaddvq_s32(acc);
}
#endif

float row_dot_q8_0(const uint8_t* row, const BlockQ8A* xq, int64_t K, Prefetch pf) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    pf.at(b);
    const int32_t d = idot32(vld1q_s8(w[b].qs), vld1q_s8(w[b].qs + 16), xq[b].qs);
    acc += fp16_to_fp32(w[b].d) * xq[b].d * (float)d;
  }
  return acc;
}

float row_dot_i8(const uint8_t* row, const BlockQ8A* xq, int64_t K, Prefetch pf) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    pf.at(b);
    acc += xq[b].d * (float)idot32(vld1q_s8(w + 32 * b), vld1q_s8(w + 32 * b + 16), xq[b].qs);
  }
  return acc;
}

// Q4 runs: low nibbles are elements 0..15, high nibbles 16..31; Q4_0 subtracts 8
// in int8 (exact: -8..7), Q4_1 keeps 0..15 and adds m * s in float.
template <int G, bool Asym>
float row_dot_q4(const uint8_t* row, const BlockQ8A* xq, int64_t K, Prefetch pf) {
  constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2;
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  const int8x16_t off = vdupq_n_s8(Asym ? 0 : 8);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const uint8_t* blk = row + b * kBlockBytes;
    fp16_t hd, hm = 0;
    std::memcpy(&hd, blk, 2);
    if (Asym) std::memcpy(&hm, blk + 2, 2);
    const float dw = fp16_to_fp32(hd), mw = fp16_to_fp32(hm);
    for (int r = 0; r < G / 32; ++r) {
      pf.at(b * (G / 32) + r);
      const BlockQ8A& a = xq[b * (G / 32) + r];
      const uint8x16_t v = vld1q_u8(blk + kHdr + 16 * r);
      const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, mask)), off);
      const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), off);
      acc += dw * a.d * (float)idot32(lo, hi, a.qs);
      if (Asym) acc += mw * a.s;
    }
  }
  return acc;
}

// Two-level activations (BlockQ8A2): the weight registers feed both dot products.
float row_dot2_q8_0(const uint8_t* row, const BlockQ8A2* xq, int64_t K, Prefetch pf) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    pf.at(b);
    const int8x16_t w0 = vld1q_s8(w[b].qs), w1 = vld1q_s8(w[b].qs + 16);
    const BlockQ8A2& a = xq[b];
    const float v = a.d * (float)idot32(w0, w1, a.qs) + a.d2 * (float)idot32(w0, w1, a.qs2);
    acc += fp16_to_fp32(w[b].d) * v;
  }
  return acc;
}

float row_dot2_i8(const uint8_t* row, const BlockQ8A2* xq, int64_t K, Prefetch pf) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    pf.at(b);
    const int8x16_t w0 = vld1q_s8(w + 32 * b), w1 = vld1q_s8(w + 32 * b + 16);
    acc += xq[b].d * (float)idot32(w0, w1, xq[b].qs) + xq[b].d2 * (float)idot32(w0, w1, xq[b].qs2);
  }
  return acc;
}

template <int G, bool Asym>
float row_dot2_q4(const uint8_t* row, const BlockQ8A2* xq, int64_t K, Prefetch pf) {
  constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + G / 2;
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  const int8x16_t off = vdupq_n_s8(Asym ? 0 : 8);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / G; ++b) {
    const uint8_t* blk = row + b * kBlockBytes;
    fp16_t hd, hm = 0;
    std::memcpy(&hd, blk, 2);
    if (Asym) std::memcpy(&hm, blk + 2, 2);
    const float dw = fp16_to_fp32(hd), mw = fp16_to_fp32(hm);
    for (int r = 0; r < G / 32; ++r) {
      pf.at(b * (G / 32) + r);
      const BlockQ8A2& a = xq[b * (G / 32) + r];
      const uint8x16_t v = vld1q_u8(blk + kHdr + 16 * r);
      const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, mask)), off);
      const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), off);
      acc += dw * (a.d * (float)idot32(lo, hi, a.qs) + a.d2 * (float)idot32(lo, hi, a.qs2));
      if (Asym) acc += mw * (a.s + a.s2);
    }
  }
  return acc;
}

// ---- GGUF 5-bit and K-quant types ----

// sum over one or two activation levels of d * idot (see kernels.h).
inline float level_dot(int8x16_t w0, int8x16_t w1, const BlockQ8A& a) {
  return a.d * (float)idot32(w0, w1, a.qs);
}
inline float level_dot(int8x16_t w0, int8x16_t w1, const BlockQ8A2& a) {
  return a.d * (float)idot32(w0, w1, a.qs) + a.d2 * (float)idot32(w0, w1, a.qs2);
}
inline float act_sum(const BlockQ8A& a) { return a.s; }
inline float act_sum(const BlockQ8A2& a) { return a.s + a.s2; }

// 16 elements of a Q6_K sub-block.
inline int32_t idot16(int8x16_t w, const int8_t* a) {
  const int8x16_t av = vld1q_s8(a);
  int16x8_t p = vmull_s8(vget_low_s8(w), vget_low_s8(av));
  p = vmlal_s8(p, vget_high_s8(w), vget_high_s8(av));
  return vaddvq_s32(vpaddlq_s16(p));
}
inline float level_dot6(int8x16_t w0, int8x16_t w1, int sc0, int sc1, const BlockQ8A& a) {
  return a.d * (float)(sc0 * idot16(w0, a.qs) + sc1 * idot16(w1, a.qs + 16));
}
inline float level_dot6(int8x16_t w0, int8x16_t w1, int sc0, int sc1, const BlockQ8A2& a) {
  return a.d * (float)(sc0 * idot16(w0, a.qs) + sc1 * idot16(w1, a.qs + 16)) +
         a.d2 * (float)(sc0 * idot16(w0, a.qs2) + sc1 * idot16(w1, a.qs2 + 16));
}

// 0x10 in byte i where bit i of the 16-bit value `bits` is set.
inline uint8x16_t bit4_from(uint32_t bits) {
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t spread = vcombine_u8(vdup_n_u8((uint8_t)(bits & 0xff)), vdup_n_u8((uint8_t)(bits >> 8 & 0xff)));
  return vandq_u8(vtstq_u8(spread, vld1q_u8(kBit)), vdupq_n_u8(0x10));
}

template <class Act, bool Asym>
float row_dot_q5(const uint8_t* row, const Act* xq, int64_t K, Prefetch pf) {
  constexpr int kHdr = Asym ? 4 : 2, kBlockBytes = kHdr + 4 + 16;
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  const int8x16_t off = vdupq_n_s8(Asym ? 0 : 16);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    pf.at(b);
    const uint8_t* blk = row + b * kBlockBytes;
    fp16_t hd, hm = 0;
    uint32_t qh;
    std::memcpy(&hd, blk, 2);
    if (Asym) std::memcpy(&hm, blk + 2, 2);
    std::memcpy(&qh, blk + kHdr, 4);
    const uint8x16_t v = vld1q_u8(blk + kHdr + 4);
    const uint8x16_t lo = vorrq_u8(vandq_u8(v, mask), bit4_from(qh & 0xffff));
    const uint8x16_t hi = vorrq_u8(vshrq_n_u8(v, 4), bit4_from(qh >> 16));
    const int8x16_t w0 = vsubq_s8(vreinterpretq_s8_u8(lo), off), w1 = vsubq_s8(vreinterpretq_s8_u8(hi), off);
    acc += fp16_to_fp32(hd) * level_dot(w0, w1, xq[b]);
    if (Asym) acc += fp16_to_fp32(hm) * act_sum(xq[b]);
  }
  return acc;
}

// Q4_K (Q5 = false) and Q5_K.
template <class Act, bool Q5>
float row_dot_qk(const uint8_t* row, const Act* xq, int64_t K, Prefetch pf) {
  constexpr int kBlockBytes = Q5 ? 176 : 144, kQs = Q5 ? 48 : 16;
  const uint8x16_t mask = vdupq_n_u8(0x0f);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const uint8_t* blk = row + b * kBlockBytes;
    fp16_t hd, hdmin;
    std::memcpy(&hd, blk, 2);
    std::memcpy(&hdmin, blk + 2, 2);
    uint8_t sc[8], mn[8];
    kquant_scales_mins(blk + 4, sc, mn);
    const float d = fp16_to_fp32(hd), dmin = fp16_to_fp32(hdmin);
    for (int s = 0; s < 8; ++s) {
      pf.at(8 * b + s);
      const uint8_t* qs = blk + kQs + 32 * (s / 2);
      const int8x16_t shift = vdupq_n_s8((int8_t)(-4 * (s & 1)));
      uint8x16_t w0 = vandq_u8(vshlq_u8(vld1q_u8(qs), shift), mask);
      uint8x16_t w1 = vandq_u8(vshlq_u8(vld1q_u8(qs + 16), shift), mask);
      if constexpr (Q5) {
        const uint8x16_t bit = vdupq_n_u8((uint8_t)(1 << s)), b4 = vdupq_n_u8(0x10);
        w0 = vorrq_u8(w0, vandq_u8(vtstq_u8(vld1q_u8(blk + 16), bit), b4));
        w1 = vorrq_u8(w1, vandq_u8(vtstq_u8(vld1q_u8(blk + 32), bit), b4));
      }
      const Act& a = xq[8 * b + s];
      acc += d * (float)sc[s] * level_dot(vreinterpretq_s8_u8(w0), vreinterpretq_s8_u8(w1), a) -
             dmin * (float)mn[s] * act_sum(a);
    }
  }
  return acc;
}

template <class Act>
float row_dot_q6_k(const uint8_t* row, const Act* xq, int64_t K, Prefetch pf) {
  const uint8x16_t mask = vdupq_n_u8(0x0f), mask2 = vdupq_n_u8(3);
  const int8x16_t off = vdupq_n_s8(32);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 256; ++b) {
    const BlockQ6_K& w = reinterpret_cast<const BlockQ6_K*>(row)[b];
    float v = 0.0f;
    for (int r = 0; r < 8; ++r) {  // run r = elements 32r..32r+31 (layout: common.h)
      pf.at(8 * b + r);
      const int h = r / 4, q = r % 4;
      const uint8_t* ql = w.ql + 64 * h + 32 * (r % 2);
      const uint8_t* qh = w.qh + 32 * h;
      const int8x16_t lsh = vdupq_n_s8((int8_t)(-4 * (q / 2))), hsh = vdupq_n_s8((int8_t)(-2 * q));
      const uint8x16_t l0 = vandq_u8(vshlq_u8(vld1q_u8(ql), lsh), mask);
      const uint8x16_t l1 = vandq_u8(vshlq_u8(vld1q_u8(ql + 16), lsh), mask);
      const uint8x16_t h0 = vshlq_n_u8(vandq_u8(vshlq_u8(vld1q_u8(qh), hsh), mask2), 4);
      const uint8x16_t h1 = vshlq_n_u8(vandq_u8(vshlq_u8(vld1q_u8(qh + 16), hsh), mask2), 4);
      const int8x16_t w0 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l0, h0)), off);
      const int8x16_t w1 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(l1, h1)), off);
      v += level_dot6(w0, w1, w.scales[2 * r], w.scales[2 * r + 1], xq[8 * b + r]);
    }
    acc += fp16_to_fp32(w.d) * v;
  }
  return acc;
}

float row_dot_bf16(const uint8_t* row, const float* x, int64_t K) {
  float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const uint16x8_t h = vreinterpretq_u16_u8(vld1q_u8(row + 2 * k));
    s0 = vfmaq_f32(s0, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vld1q_f32(x + k));
    s1 = vfmaq_f32(s1, vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16)), vld1q_f32(x + k + 4));
  }
  float acc = vaddvq_f32(vaddq_f32(s0, s1));
  for (; k < K; ++k) {
    uint16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    acc += bf16_to_fp32(h) * x[k];
  }
  return acc;
}

float row_dot_f32(const uint8_t* row, const float* x, int64_t K) {
  const float* w = reinterpret_cast<const float*>(row);
  float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    s0 = vfmaq_f32(s0, vld1q_f32(w + k), vld1q_f32(x + k));
    s1 = vfmaq_f32(s1, vld1q_f32(w + k + 4), vld1q_f32(x + k + 4));
  }
  float acc = vaddvq_f32(vaddq_f32(s0, s1));
  for (; k < K; ++k) acc += w[k] * x[k];
  return acc;
}

float row_dot_f16(const uint8_t* row, const float* x, int64_t K) {
  float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(row + 2 * k));
    s0 = vfmaq_f32(s0, vcvt_f32_f16(vget_low_f16(h)), vld1q_f32(x + k));
    s1 = vfmaq_f32(s1, vcvt_f32_f16(vget_high_f16(h)), vld1q_f32(x + k + 4));
  }
  float acc = vaddvq_f32(vaddq_f32(s0, s1));
  for (; k < K; ++k) {
    fp16_t h;
    std::memcpy(&h, row + 2 * k, 2);
    acc += fp16_to_fp32(h) * x[k];
  }
  return acc;
}

template <float (*RowDot)(const uint8_t*, const float*, int64_t)>
void matmul_float(const WeightView& w, const float* x, size_t ldx, const BlockQ8A*, int T, float* y, size_t ldy,
                  int n0, int n1) {
  for (int n = n0; n < n1; ++n)
    for (int t = 0; t < T; ++t) y[t * ldy + n] = RowDot(w.data + (size_t)n * w.row_stride, x + t * ldx, w.cols);
}

template <class Act, float (*RowDot)(const uint8_t*, const Act*, int64_t, Prefetch)>
void matmul_quant_t(const WeightView& w, const float*, size_t, const Act* xq, int T, float* y, size_t ldy,
                    int n0, int n1) {
  const int64_t nb = w.cols / 32;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = w.data + (size_t)n * w.row_stride;
    const Prefetch pf = T == 1 ? decode_prefetch(row, w.row_stride, nb, kPrefetchRows) : Prefetch{};
    for (int t = 0; t < T; ++t) {
      float v = RowDot(row, xq + t * nb, w.cols, pf);
      if (w.dtype == DType::I8) v *= w.row_scales[n];
      y[t * ldy + n] = v;
    }
  }
}

template <float (*RowDot)(const uint8_t*, const BlockQ8A*, int64_t, Prefetch)>
constexpr MatmulFn matmul_quant = matmul_quant_t<BlockQ8A, RowDot>;
template <float (*RowDot)(const uint8_t*, const BlockQ8A2*, int64_t, Prefetch)>
constexpr MatmulFn2 matmul2_quant = matmul_quant_t<BlockQ8A2, RowDot>;

float dot_neon(const float* a, const float* b, int n) {
  return row_dot_f32(reinterpret_cast<const uint8_t*>(a), b, n);
}
void axpy_neon(float a, const float* x, float* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
  for (; i < n; ++i) y[i] += a * x[i];
}
// The f16 KV cache: vcvt rounds to nearest even under the default FPCR, as fp32_to_fp16.
void to_f16_neon(const float* x, fp16_t* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(x + i))));
  for (; i < n; ++i) y[i] = fp32_to_fp16(x[i]);
}
// P.V over f16 rows: each row converted once, then one axpy per weight row.
void weighted_sum_f16_neon(const float* w, size_t ldw, int G, const fp16_t* rows, size_t ldr, int n, float* out,
                           size_t ldo, int dh) {
  constexpr int kMaxDh = 512;
  if (dh > kMaxDh) return ref_kernels().weighted_sum_f16(w, ldw, G, rows, ldr, n, out, ldo, dh);
  float x[kMaxDh];
  for (int p = 0; p < n; ++p) {
    const fp16_t* r = rows + (size_t)p * ldr;
    int i = 0;
    for (; i + 4 <= dh; i += 4) vst1q_f32(x + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(r + i))));
    for (; i < dh; ++i) x[i] = fp16_to_fp32(r[i]);
    for (int g = 0; g < G; ++g) axpy_neon(w[g * ldw + p], x, out + g * ldo, dh);
  }
}
// The Q8_0 KV cache: a row of dh / 32 blocks {f16 d; int8 q[32]} decoded into x (d * q as floats).
inline void q8_0_decode_row_neon(const uint8_t* r, float* x, int dh) {
  for (int b = 0; b < dh / 32; ++b, r += 34, x += 32) {
    fp16_t h;
    std::memcpy(&h, r, 2);
    const float d = fp16_to_fp32(h);
    for (int c = 0; c < 32; c += 8) {
      const int16x8_t v = vmovl_s8(vld1_s8(reinterpret_cast<const int8_t*>(r + 2 + c)));
      vst1q_f32(x + c, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(v))), d));
      vst1q_f32(x + c + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_high_s16(v))), d));
    }
  }
}
// Scores of G float queries against Q8_0 key rows: each row decoded once, then G dot products.
void scores_q8_0_neon(const uint8_t* rows, size_t ldr, const float* q, size_t ldq, int G, float* s, size_t lds,
                      int p0, int p1, int dh) {
  constexpr int kMaxDh = 512;
  if (dh > kMaxDh) return ref_kernels().scores_q8_0(rows, ldr, q, ldq, G, s, lds, p0, p1, dh);
  float x[kMaxDh];
  for (int p = p0; p < p1; ++p) {
    q8_0_decode_row_neon(rows + (size_t)p * ldr, x, dh);
    for (int g = 0; g < G; ++g) s[(size_t)g * lds + p] = dot_neon(x, q + (size_t)g * ldq, dh);
  }
}
// P.V over Q8_0 rows: each row decoded once, then one axpy per weight row.
void weighted_sum_q8_0_neon(const float* w, size_t ldw, int G, const uint8_t* rows, size_t ldr, int n, float* out,
                            size_t ldo, int dh) {
  constexpr int kMaxDh = 512;
  if (dh > kMaxDh) return ref_kernels().weighted_sum_q8_0(w, ldw, G, rows, ldr, n, out, ldo, dh);
  float x[kMaxDh];
  for (int p = 0; p < n; ++p) {
    q8_0_decode_row_neon(rows + (size_t)p * ldr, x, dh);
    for (int g = 0; g < G; ++g) axpy_neon(w[g * ldw + p], x, out + g * ldo, dh);
  }
}
// exp(x) for 4 floats: x = n ln2 + r (Cody-Waite, two constants), exp(r) by its degree-6 Taylor
// polynomial, times 2^n built in the exponent bits. The same steps as exp_avx2 (kernels_avx2.cpp):
// clamped at -87 (below, ~1.6e-38 instead of less: no softmax sum can see it) and 88.
inline float32x4_t exp_neon(float32x4_t x) {
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
  const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.0f / 720.0f);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vmulq_f32(p, vreinterpretq_f32_s32(e));
}
// vmaxnm: a NaN loses to a number, as std::max(m, NaN) keeps m in the reference.
float max_neon(const float* s, int n) {
  float m = -std::numeric_limits<float>::infinity();
  int i = 0;
  if (n >= 4) {
    float32x4_t mv = vld1q_f32(s);
    for (i = 4; i + 4 <= n; i += 4) mv = vmaxnmq_f32(mv, vld1q_f32(s + i));
    m = vmaxnmvq_f32(mv);
  }
  for (; i < n; ++i) m = std::max(m, s[i]);
  return m;
}
float exp_sum_neon(float* s, int n, float m, float scale) {
  const float32x4_t mv = vdupq_n_f32(m);
  float32x4_t sum = vdupq_n_f32(0.0f);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t e = exp_neon(vmulq_n_f32(vsubq_f32(vld1q_f32(s + i), mv), scale));
    vst1q_f32(s + i, e);
    sum = vaddq_f32(sum, e);
  }
  float total = vaddvq_f32(sum);
  for (; i < n; ++i) {
    s[i] = std::exp((s[i] - m) * scale);
    total += s[i];
  }
  return total;
}
void silu_mul_neon(const float* g, const float* u, float* y, int n) {
  const float32x4_t one = vdupq_n_f32(1.0f);
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float32x4_t gv = vld1q_f32(g + i);
    const float32x4_t e = exp_neon(vnegq_f32(gv));
    vst1q_f32(y + i, vmulq_f32(vdivq_f32(gv, vaddq_f32(one, e)), vld1q_f32(u + i)));
  }
  for (; i < n; ++i) y[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}
void scale_neon(float a, float* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vmulq_n_f32(vld1q_f32(y + i), a));
  for (; i < n; ++i) y[i] *= a;
}
void add_neon(const float* a, const float* b, float* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vaddq_f32(vld1q_f32(a + i), vld1q_f32(b + i)));
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

#if PLM_NEON_LEVEL >= 1
// ---- x16 weights read in place (csrc/common.h "x16 interleaving") ----
// A record holds one 32-block of 16 rows: each header field for the 16 rows, then the codes in
// 64-byte units, unit u = 4 bytes of each row (row i at 4i). vdotq_laneq_s32(acc, unit quarter r,
// act, lane) adds to rows 4r..4r+3 their 4 codes times the 4 activations in `lane`: 4 SDOTs per
// unit for 16 rows, all exact in int32, then one float multiply-add per row and block.
enum class X16Kind { Q8_0, Q4_0, Q4_1, I8, Q4_0_G64, Q4_0_G128, Q4_1_G64, Q4_1_G128, Q5_0, Q5_1 };

// The Q4 types of groups of 64 and 128: a record is one G-block of 16 rows (d, and m for Q4_1,
// per row, then G/2 code bytes per row in G/8 units). Each 32-element sub-block j is 16 code bytes
// laid out as a group-32 block's (byte k: element 32j + k low, 32j + 16 + k high), i.e. units
// 4j..4j+3: the group-32 dots apply to it with activation block j, one activation scale each.
template <X16Kind K>
constexpr int x16_group() {
  return K == X16Kind::Q4_0_G64 || K == X16Kind::Q4_1_G64 ? 64 : K == X16Kind::Q4_0_G128 || K == X16Kind::Q4_1_G128 ? 128 : 32;
}
template <X16Kind K>
constexpr bool x16_asym() {
  return K == X16Kind::Q4_1 || K == X16Kind::Q4_1_G64 || K == X16Kind::Q4_1_G128 || K == X16Kind::Q5_1;
}

template <X16Kind K>
constexpr bool x16_q4() {
  return K != X16Kind::Q8_0 && K != X16Kind::I8;
}
template <X16Kind K>
constexpr int x16_header_bytes() {  // per row
  return K == X16Kind::I8 ? 0 : K == X16Kind::Q5_0 ? 6 : K == X16Kind::Q5_1 ? 8 : x16_asym<K>() ? 4 : 2;
}
// Q5_0/Q5_1: the header's last field is qh (4 bytes per row: bit e = the fifth bit of element e),
// after d (and m); the codes are nibbles as Q4's, each widened by its fifth bit.
template <X16Kind K>
constexpr bool x16_q5() {
  return K == X16Kind::Q5_0 || K == X16Kind::Q5_1;
}

// Byte k of each 32-bit lane of `bits` (4 rows' qh, shifted so that the wanted bits are 0..3):
// 0x10 if bit k is set, else 0.
inline uint8x16_t x16_fifth_bits(uint32x4_t bits) {
  static const uint8_t kSpread[16] = {0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12};
  static const uint8_t kBit[16] = {1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
  const uint8x16_t b = vqtbl1q_u8(vreinterpretq_u8_u32(bits), vld1q_u8(kSpread));
  return vandq_u8(vtstq_u8(b, vld1q_u8(kBit)), vdupq_n_u8(0x10));
}

// acc[t][r] (rows 4r..4r+3, token t) += the int32 dots of one 32-element sub-block's codes (4 units
// of a Q4 type, 8 of Q8_0/I8) with each token's 32 activations q[t]. Each weight register is loaded
// (and, for Q4, unpacked) once for the NT tokens; SDOT by element takes its lane as a constant,
// hence the unrolled lanes.
template <X16Kind K, int NT>
inline void x16_idot(const uint8_t* codes, const int8_t* const q[NT], int32x4_t acc[NT][4],
                     const uint8_t* qh = nullptr) {
#define PLM_SDOT_LANE(w, a, lane) \
  for (int t = 0; t < NT; ++t) acc[t][r] = vdotq_laneq_s32(acc[t][r], (w), (a)[t], lane)
  if constexpr (!x16_q4<K>()) {
    for (int h = 0; h < 2; ++h) {  // activations 16h..16h+15 = units 4h..4h+3
      int8x16_t a[NT];
      for (int t = 0; t < NT; ++t) a[t] = vld1q_s8(q[t] + 16 * h);
      const int8_t* u = reinterpret_cast<const int8_t*>(codes) + 256 * h;
      for (int r = 0; r < 4; ++r) {
        PLM_SDOT_LANE(vld1q_s8(u + 16 * r), a, 0);
        PLM_SDOT_LANE(vld1q_s8(u + 64 + 16 * r), a, 1);
        PLM_SDOT_LANE(vld1q_s8(u + 128 + 16 * r), a, 2);
        PLM_SDOT_LANE(vld1q_s8(u + 192 + 16 * r), a, 3);
      }
    }
  } else {  // Q4: unit u's low nibbles are elements 4u..4u+3, its high nibbles 16+4u..16+4u+3
    int8x16_t lo_a[NT], hi_a[NT];
    for (int t = 0; t < NT; ++t) lo_a[t] = vld1q_s8(q[t]), hi_a[t] = vld1q_s8(q[t] + 16);
    const uint8x16_t mask = vdupq_n_u8(0x0f);
    const int8x16_t off = vdupq_n_s8(x16_asym<K>() ? 0 : x16_q5<K>() ? 16 : 8);
    for (int r = 0; r < 4; ++r) {
      int8x16_t lo[4], hi[4];
      uint32x4_t h = vdupq_n_u32(0);
      if constexpr (x16_q5<K>()) h = vreinterpretq_u32_u8(vld1q_u8(qh + 16 * r));  // rows 4r..4r+3
      for (int u = 0; u < 4; ++u) {
        const uint8x16_t v = vld1q_u8(codes + 64 * u + 16 * r);
        uint8x16_t l = vandq_u8(v, mask), m = vshrq_n_u8(v, 4);
        if constexpr (x16_q5<K>()) {  // elements 4u..4u+3 and 16+4u..16+4u+3
          l = vorrq_u8(l, x16_fifth_bits(vshlq_u32(h, vdupq_n_s32(-4 * u))));
          m = vorrq_u8(m, x16_fifth_bits(vshlq_u32(h, vdupq_n_s32(-16 - 4 * u))));
        }
        lo[u] = vsubq_s8(vreinterpretq_s8_u8(l), off);
        hi[u] = vsubq_s8(vreinterpretq_s8_u8(m), off);
      }
      PLM_SDOT_LANE(lo[0], lo_a, 0);
      PLM_SDOT_LANE(lo[1], lo_a, 1);
      PLM_SDOT_LANE(lo[2], lo_a, 2);
      PLM_SDOT_LANE(lo[3], lo_a, 3);
      PLM_SDOT_LANE(hi[0], hi_a, 0);
      PLM_SDOT_LANE(hi[1], hi_a, 1);
      PLM_SDOT_LANE(hi[2], hi_a, 2);
      PLM_SDOT_LANE(hi[3], hi_a, 3);
    }
  }
#undef PLM_SDOT_LANE
}

inline float32x4_t f16x4(const uint8_t* p) { return vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(p))); }

// y of the 16 rows of one group for NT tokens (xa[t]: token t's cols/32 activation blocks): over the
// records (one G-block of 16 rows each), d_w * the sum over its 32-element sub-blocks of
// (d_a idot + d2_a idot2) (+ m_w s_a for Q4_1). Sub-block j of a Q4 record is its units 4j..4j+3.
template <X16Kind K, class Act, int NT>
inline void x16_group_tokens(const uint8_t* group, int64_t n_act, const Act* const xa[NT], float out[NT][16]) {
  constexpr int G = x16_group<K>(), S = G / 32, hb = x16_header_bytes<K>();
  constexpr size_t rec_bytes = 16 * (hb + (x16_q4<K>() ? G / 2 : 32));
  float32x4_t sum[NT][4];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < 4; ++r) sum[t][r] = vdupq_n_f32(0);
  const int64_t n_rec = n_act / S;
  for (int64_t b = 0; b < n_rec; ++b) {
    const uint8_t* rec = group + (size_t)b * rec_bytes;
    if (b + 2 < n_rec) __builtin_prefetch(rec + 2 * rec_bytes);
    float32x4_t v[NT][4];
    float sa[NT] = {};
    for (int t = 0; t < NT; ++t)
      for (int r = 0; r < 4; ++r) v[t][r] = vdupq_n_f32(0);
    for (int j = 0; j < S; ++j) {
      const int8_t* q[NT];
      int32x4_t acc[NT][4];
      for (int t = 0; t < NT; ++t) {
        q[t] = xa[t][b * S + j].qs;
        for (int r = 0; r < 4; ++r) acc[t][r] = vdupq_n_s32(0);
      }
      x16_idot<K, NT>(rec + 16 * hb + 256 * j, q, acc, x16_q5<K>() ? rec + 16 * (hb - 4) : nullptr);
      for (int t = 0; t < NT; ++t) {
        const Act& a = xa[t][b * S + j];
        for (int r = 0; r < 4; ++r) v[t][r] = vfmaq_n_f32(v[t][r], vcvtq_f32_s32(acc[t][r]), a.d);
        sa[t] += act_sum(a);
      }
      if constexpr (std::is_same_v<Act, BlockQ8A2>) {
        for (int t = 0; t < NT; ++t) {
          q[t] = xa[t][b * S + j].qs2;
          for (int r = 0; r < 4; ++r) acc[t][r] = vdupq_n_s32(0);
        }
        x16_idot<K, NT>(rec + 16 * hb + 256 * j, q, acc, x16_q5<K>() ? rec + 16 * (hb - 4) : nullptr);
        for (int t = 0; t < NT; ++t)
          for (int r = 0; r < 4; ++r) v[t][r] = vfmaq_n_f32(v[t][r], vcvtq_f32_s32(acc[t][r]), xa[t][b * S + j].d2);
      }
    }
    for (int r = 0; r < 4; ++r) {
      if constexpr (K == X16Kind::I8) {
        for (int t = 0; t < NT; ++t) sum[t][r] = vaddq_f32(sum[t][r], v[t][r]);
      } else {
        const float32x4_t dw = f16x4(rec + 8 * r);  // d of rows 4r..4r+3
        for (int t = 0; t < NT; ++t) sum[t][r] = vfmaq_f32(sum[t][r], dw, v[t][r]);
        if constexpr (x16_asym<K>()) {
          const float32x4_t mw = f16x4(rec + 32 + 8 * r);
          for (int t = 0; t < NT; ++t) sum[t][r] = vfmaq_n_f32(sum[t][r], mw, sa[t]);
        }
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < 4; ++r) vst1q_f32(out[t] + 4 * r, sum[t][r]);
}

#if PLM_NEON_LEVEL >= 2
// The 16 rows x 2 tokens int32 dots of one record with one activation level: acc[k] holds the 2x2
// tile [row a t0, row a t1, row b t0, row b t1] of rows (a, b) = (2k, 2k+1). SMMLA multiplies a 2x8
// (two rows' 8 codes) by an 8x2 (two tokens' 8 activations): zipping the 4-byte lanes of units u
// and u+1 of rows 4r..4r+3 gives rows (4r, 4r+1) and (4r+2, 4r+3) their 8 codes 4u..4u+7.
template <X16Kind K>
inline void x16_pair_idot(const uint8_t* codes, const int8_t* q0, const int8_t* q1, int32x4_t acc[8]) {
  for (int k = 0; k < 8; ++k) acc[k] = vdupq_n_s32(0);
  auto tile = [&](int8x16_t wu, int8x16_t wv, int8x16_t a, int r) {
    const int32x4_t u = vreinterpretq_s32_s8(wu), v = vreinterpretq_s32_s8(wv);
    acc[2 * r] = vmmlaq_s32(acc[2 * r], vreinterpretq_s8_s32(vzip1q_s32(u, v)), a);
    acc[2 * r + 1] = vmmlaq_s32(acc[2 * r + 1], vreinterpretq_s8_s32(vzip2q_s32(u, v)), a);
  };
  if constexpr (K == X16Kind::Q8_0 || K == X16Kind::I8) {
    const int8_t* c = reinterpret_cast<const int8_t*>(codes);
    for (int u = 0; u < 8; u += 2) {  // activations 4u..4u+7 of both tokens
      const int8x16_t a = vcombine_s8(vld1_s8(q0 + 4 * u), vld1_s8(q1 + 4 * u));
      for (int r = 0; r < 4; ++r) tile(vld1q_s8(c + 64 * u + 16 * r), vld1q_s8(c + 64 * (u + 1) + 16 * r), a, r);
    }
  } else {  // Q4: low nibbles of units u, u+1 are elements 4u..4u+7; high nibbles 16+4u..16+4u+7
    const uint8x16_t mask = vdupq_n_u8(0x0f);
    const int8x16_t off = vdupq_n_s8(K == X16Kind::Q4_0 ? 8 : 0);
    for (int u = 0; u < 4; u += 2) {
      const int8x16_t alo = vcombine_s8(vld1_s8(q0 + 4 * u), vld1_s8(q1 + 4 * u));
      const int8x16_t ahi = vcombine_s8(vld1_s8(q0 + 16 + 4 * u), vld1_s8(q1 + 16 + 4 * u));
      for (int r = 0; r < 4; ++r) {
        const uint8x16_t v0 = vld1q_u8(codes + 64 * u + 16 * r), v1 = vld1q_u8(codes + 64 * (u + 1) + 16 * r);
        tile(vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v0, mask)), off),
             vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v1, mask)), off), alo, r);
        tile(vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v0, 4)), off),
             vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v1, 4)), off), ahi, r);
      }
    }
  }
}

// [x[2k], x[2k], x[2k+1], x[2k+1]] for the tiles' rows, from 4 rows' values v (rows 4r..4r+3).
inline float32x4_t rows_of_tile(float32x4_t v, int half) {
  return half == 0 ? vzip1q_f32(v, v) : vzip2q_f32(v, v);
}

// y of 16 rows x tokens (t0, t0+1): as x16_group_tokens, two tokens per SMMLA.
template <X16Kind K, class Act>
inline void x16_group_pair(const uint8_t* group, int64_t nb, const Act* x0, const Act* x1, float out[2][16]) {
  constexpr int hb = x16_header_bytes<K>();
  constexpr size_t rec_bytes = 16 * (hb + (K == X16Kind::Q4_0 || K == X16Kind::Q4_1 ? 16 : 32));
  float32x4_t sum[8];
  for (int k = 0; k < 8; ++k) sum[k] = vdupq_n_f32(0);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = group + (size_t)b * rec_bytes;
    if (b + 2 < nb) __builtin_prefetch(rec + 2 * rec_bytes);
    const Act &a0 = x0[b], &a1 = x1[b];
    const float32x4_t da = {a0.d, a1.d, a0.d, a1.d};  // per tile lane: the token's scale
    int32x4_t acc[8];
    x16_pair_idot<K>(rec + 16 * hb, a0.qs, a1.qs, acc);
    float32x4_t v[8];
    for (int k = 0; k < 8; ++k) v[k] = vmulq_f32(vcvtq_f32_s32(acc[k]), da);
    if constexpr (std::is_same_v<Act, BlockQ8A2>) {
      const float32x4_t da2 = {a0.d2, a1.d2, a0.d2, a1.d2};
      x16_pair_idot<K>(rec + 16 * hb, a0.qs2, a1.qs2, acc);
      for (int k = 0; k < 8; ++k) v[k] = vfmaq_f32(v[k], vcvtq_f32_s32(acc[k]), da2);
    }
    for (int r = 0; r < 4; ++r) {
      for (int half = 0; half < 2; ++half) {
        const int k = 2 * r + half;
        if constexpr (K == X16Kind::I8) {
          sum[k] = vaddq_f32(sum[k], v[k]);
        } else {
          sum[k] = vfmaq_f32(sum[k], rows_of_tile(f16x4(rec + 8 * r), half), v[k]);
          if constexpr (K == X16Kind::Q4_1) {
            const float32x4_t sa = {act_sum(a0), act_sum(a1), act_sum(a0), act_sum(a1)};
            sum[k] = vfmaq_f32(sum[k], rows_of_tile(f16x4(rec + 32 + 8 * r), half), sa);
          }
        }
      }
    }
  }
  for (int k = 0; k < 8; ++k) {  // tile k: rows 2k, 2k+1
    out[0][2 * k] = vgetq_lane_f32(sum[k], 0), out[1][2 * k] = vgetq_lane_f32(sum[k], 1);
    out[0][2 * k + 1] = vgetq_lane_f32(sum[k], 2), out[1][2 * k + 1] = vgetq_lane_f32(sum[k], 3);
  }
}
#endif

// Tokens per pass over a group's weights (dotprod; i8mm takes group-32 types in SMMLA pairs). Each
// token holds 4 int32 and 8 float accumulators per 16 rows. Executed instructions for 8 tokens of
// [512 x 512] (bench/arm_insn.py): Q4_0 1.41 M one token at a time, 1.01 M two at a time (the nibbles
// unpacked once for both), 1.63 M four (registers spill); Q8_0, with nothing to unpack, 0.92 M one at
// a time, 0.97 M two.
template <X16Kind K>
constexpr int x16_tokens() {
  return x16_q4<K>() ? 2 : 1;
}

template <X16Kind K, class Act>
void matmul_x16_t(const WeightView& w, const float*, size_t, const Act* xq, int T, float* y, size_t ldy, int n0,
                  int n1) {
  const int64_t nb = w.cols / 32;
  const size_t group_bytes = (size_t)kX16Rows * row_bytes(w.dtype, w.cols);
  float out[16];
  for (int g = n0 / kX16Rows; g * kX16Rows < n1; ++g) {
    const uint8_t* group = w.data + (size_t)g * group_bytes;
    const int lo = std::max(n0 - g * kX16Rows, 0), hi = std::min(n1 - g * kX16Rows, kX16Rows);
    int t = 0;
#if PLM_NEON_LEVEL >= 2
    for (; x16_group<K>() == 32 && !x16_q5<K>() && t + 2 <= T; t += 2) {
      float pair[2][16];
      x16_group_pair<K, Act>(group, nb, xq + (size_t)t * nb, xq + (size_t)(t + 1) * nb, pair);
      for (int j = 0; j < 2; ++j)
        for (int i = lo; i < hi; ++i) {
          const int n = g * kX16Rows + i;
          y[(size_t)(t + j) * ldy + n] = K == X16Kind::I8 ? pair[j][i] * w.row_scales[n] : pair[j][i];
        }
    }
#endif
    for (; t + x16_tokens<K>() <= T; t += x16_tokens<K>()) {  // several tokens per weight load (prefill, verify)
      float several[x16_tokens<K>()][16];
      const Act* xa[x16_tokens<K>()];
      for (int j = 0; j < x16_tokens<K>(); ++j) xa[j] = xq + (size_t)(t + j) * nb;
      x16_group_tokens<K, Act, x16_tokens<K>()>(group, nb, xa, several);
      for (int j = 0; j < x16_tokens<K>(); ++j)
        for (int i = lo; i < hi; ++i) {
          const int n = g * kX16Rows + i;
          y[(size_t)(t + j) * ldy + n] = K == X16Kind::I8 ? several[j][i] * w.row_scales[n] : several[j][i];
        }
    }
    for (; t < T; ++t) {
      const Act* xa[1] = {xq + (size_t)t * nb};
      float one[1][16];
      x16_group_tokens<K, Act, 1>(group, nb, xa, one);
      std::memcpy(out, one[0], sizeof out);
      for (int i = lo; i < hi; ++i) {
        const int n = g * kX16Rows + i;
        y[(size_t)t * ldy + n] = K == X16Kind::I8 ? out[i] * w.row_scales[n] : out[i];
      }
    }
  }
}
#define PLM_X16(kind, act) matmul_x16_t<X16Kind::kind, act>

// ---- 2:4-sparse weights read in place (Q4_0_24_X16, I8_24_X16; layouts in common.h) ----
// A 16-byte slice of a unit holds 4 values of rows 4r..4r+3. Their columns come from the pattern
// codes: one TBL gathers the two pattern bytes of each (row, slot) code into a u16 lane, USHL by
// minus its bit offset and AND 7 leave the code, a TBL spreads each code to its row's values, and a
// TBL looks up the kept column of the group (kSparse24Pairs), plus the group's base column. A TBL of
// the 64 activations of the record's columns then gathers each value's activation, and SDOT
// multiplies: 16 values (32 weights) per SDOT and five TBLs, where dense Q4_0 reads 4.5 bits per
// weight and this 3.0 (I8_24_X16: 4.75 where I8 reads 8). One token at a time (decode, verifying
// steps); prefill expands the rows into dense ones (matmul_sparse_expand).
struct S24Neon {
  uint8x16_t gather[4][2];  // [slice r][half h]: pattern byte indices of each (row, slot 2h + k) code, as u16 lanes
  int16x8_t shift[4][2];    // minus each code's bit offset within its u16 lane
  uint8x16_t spread, pick, lut, base[4][2];  // base[unit][half]: the columns of each value's group
};

S24Neon make_s24() {
  S24Neon k;
  uint8_t g[16], sp[16], pk[16], lut[16], bs[16];
  int16_t sh[8];
  for (int r = 0; r < 4; ++r)
    for (int h = 0; h < 2; ++h) {
      for (int lane = 0; lane < 8; ++lane) {  // lane: row 4r + lane / 2, slot 2h + lane % 2
        const int bit = 12 * (4 * r + lane / 2) + 3 * (2 * h + lane % 2);
        g[2 * lane] = (uint8_t)(bit / 8);
        g[2 * lane + 1] = (uint8_t)(bit / 8 + 1 < 24 ? bit / 8 + 1 : 0xFF);  // past the 24 bytes: 0
        sh[lane] = (int16_t)-(bit % 8);
      }
      k.gather[r][h] = vld1q_u8(g);
      k.shift[r][h] = vld1q_s16(sh);
    }
  for (int b = 0; b < 16; ++b) {  // byte b of a slice: row 4r + b / 4, value b % 4 (slot b % 4 / 2)
    sp[b] = (uint8_t)(2 * (2 * (b / 4) + (b % 4) / 2));
    pk[b] = (uint8_t)(8 * (b % 2));
    lut[b] = (uint8_t)kSparse24Pairs[b % 8][b / 8];
  }
  k.spread = vld1q_u8(sp);
  k.pick = vld1q_u8(pk);
  k.lut = vld1q_u8(lut);
  for (int u = 0; u < 4; ++u)
    for (int h = 0; h < 2; ++h) {
      for (int b = 0; b < 16; ++b) bs[b] = (uint8_t)(32 * h + 8 * u + 4 * ((b % 4) / 2));
      k.base[u][h] = vld1q_u8(bs);
    }
  return k;
}

// The columns (0..63) of a slice's 16 values: slice r of a unit whose codes are slots 2h, 2h + 1 of
// pattern unit u (`pat`: its 24 bytes, then zeros).
inline uint8x16_t s24_columns(const uint8x16x2_t& pat, int u, int r, int h, const S24Neon& k) {
  const uint16x8_t w = vreinterpretq_u16_u8(vqtbl2q_u8(pat, k.gather[r][h]));
  const uint8x16_t code = vandq_u8(vreinterpretq_u8_u16(vshlq_u16(w, k.shift[r][h])), vdupq_n_u8(7));
  return vaddq_u8(vqtbl1q_u8(k.lut, vorrq_u8(vqtbl1q_u8(code, k.spread), k.pick)), k.base[u][h]);
}

// The 16 rows of one record group for one token (I8_24_X16: before the row scales).
template <class Act, bool I8>
void s24_group(const uint8_t* rec, int64_t nb, const Act* xq, const S24Neon& k, float out[16]) {
  constexpr bool kTwo = std::is_same_v<Act, BlockQ8A2>;
  constexpr size_t kRec = I8 ? kSparse24I8Record : kSparse24Record, kPat = I8 ? 512 : 288;
  float32x4_t sum[4];
  for (int r = 0; r < 4; ++r) sum[r] = vdupq_n_f32(0);
  for (int64_t b = 0; b < nb; ++b, rec += kRec) {
    if (b + 2 < nb) __builtin_prefetch(rec + 2 * kRec);
    const Act &x0 = xq[2 * b], &x1 = xq[2 * b + 1];
    const int8x16x4_t xa = {{vld1q_s8(x0.qs), vld1q_s8(x0.qs + 16), vld1q_s8(x1.qs), vld1q_s8(x1.qs + 16)}};
    int8x16x4_t xa2 = xa;
    if constexpr (kTwo) xa2 = {{vld1q_s8(x0.qs2), vld1q_s8(x0.qs2 + 16), vld1q_s8(x1.qs2), vld1q_s8(x1.qs2 + 16)}};
    int32x4_t acc[2][4], acc2[2][4];  // [half: columns 0..31, 32..63][slice]
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 4; ++r) acc[h][r] = acc2[h][r] = vdupq_n_s32(0);
    for (int u = 0; u < 4; ++u) {
      const uint8_t* p = rec + kPat + 24 * u;
      const uint8x16x2_t pat = {{vld1q_u8(p), vcombine_u8(vld1_u8(p + 16), vdup_n_u8(0))}};
      for (int r = 0; r < 4; ++r) {
        int8x16_t w[2];
        if constexpr (I8) {
          w[0] = vld1q_s8(reinterpret_cast<const int8_t*>(rec) + 64 * u + 16 * r);
          w[1] = vld1q_s8(reinterpret_cast<const int8_t*>(rec) + 64 * (4 + u) + 16 * r);
        } else {  // signed codes q - 8
          const uint8x16_t c = vld1q_u8(rec + 32 + 64 * u + 16 * r);
          w[0] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(c, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
          w[1] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(c, 4)), vdupq_n_s8(8));
        }
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t cols = s24_columns(pat, u, r, h, k);
          acc[h][r] = vdotq_s32(acc[h][r], w[h], vqtbl4q_s8(xa, cols));
          if constexpr (kTwo) acc2[h][r] = vdotq_s32(acc2[h][r], w[h], vqtbl4q_s8(xa2, cols));
        }
      }
    }
    for (int r = 0; r < 4; ++r) {
      float32x4_t v = vfmaq_n_f32(vmulq_n_f32(vcvtq_f32_s32(acc[0][r]), x0.d), vcvtq_f32_s32(acc[1][r]), x1.d);
      if constexpr (kTwo) {
        v = vfmaq_n_f32(v, vcvtq_f32_s32(acc2[0][r]), x0.d2);
        v = vfmaq_n_f32(v, vcvtq_f32_s32(acc2[1][r]), x1.d2);
      }
      sum[r] = I8 ? vaddq_f32(sum[r], v) : vfmaq_f32(sum[r], f16x4(rec + 8 * r), v);
    }
  }
  for (int r = 0; r < 4; ++r) vst1q_f32(out + 4 * r, sum[r]);
}

template <class Act>
void matmul_sparse24_neon(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y,
                          size_t ldy, int n0, int n1) {
  if (T > 1 && !w.row_invariant) {  // prefill: dense rows through the GEMM
    matmul_sparse_expand<Act, PLM_NEON_TABLE>(w, x, ldx, xq, T, y, ldy, n0, n1);
    return;
  }
  static const S24Neon k = make_s24();
  const bool i8 = w.dtype == DType::I8_24_X16;
  const int64_t nb = w.cols / 64, kb = w.cols / 32;
  const size_t group_bytes = (size_t)nb * sparse24_record(w.dtype);
  float out[16];
  for (int t = 0; t < T; ++t)
    for (int g = n0 / 16; g * 16 < n1; ++g) {
      const uint8_t* rec = w.data + (size_t)g * group_bytes;
      if (i8) s24_group<Act, true>(rec, nb, xq + (size_t)t * kb, k, out);
      else s24_group<Act, false>(rec, nb, xq + (size_t)t * kb, k, out);
      for (int i = std::max(n0 - g * 16, 0); i < std::min(n1 - g * 16, 16); ++i) {
        const int n = g * 16 + i;
        y[(size_t)t * ldy + n] = i8 ? out[i] * w.row_scales[n] : out[i];
      }
    }
}
// In place at 1.79x the dense kernel's executed instructions for 2/3 of its bytes (bench/arm_insn.py,
// [4864 x 896], one token: 5.28 M vs 2.95 M): speed not measured (no ARM hardware here), and the
// x86 kernel of the same scheme (sparse_avx2.cpp) is slower than dense: "auto" expands.
int sparse24_in_place() { return kSparse24Slower; }
#define PLM_SPARSE24(act) matmul_sparse24_neon<act>
#define PLM_SPARSE24_NATIVE sparse24_in_place
#else
#define PLM_X16(kind, act) matmul_x16_gather<act, PLM_NEON_TABLE>
#define PLM_SPARSE24(act) matmul_sparse_expand<act, PLM_NEON_TABLE>
#define PLM_SPARSE24_NATIVE nullptr
#endif

}  // namespace

const KernelTable* PLM_NEON_TABLE() {
  static const KernelTable table = {
      PLM_NEON_NAME,
      {
          matmul_float<row_dot_f32>,
          matmul_float<row_dot_f16>,
          matmul_quant<row_dot_q8_0>,
          matmul_quant<row_dot_q4<32, false>>,
          matmul_quant<row_dot_q4<32, true>>,
          matmul_quant<row_dot_q4<64, false>>,
          matmul_quant<row_dot_q4<128, false>>,
          matmul_quant<row_dot_q4<64, true>>,
          matmul_quant<row_dot_q4<128, true>>,
          matmul_quant<row_dot_i8>,
          matmul_quant<row_dot_q5<BlockQ8A, false>>,   // Q5_0
          matmul_quant<row_dot_q5<BlockQ8A, true>>,    // Q5_1
          matmul_quant<row_dot_qk<BlockQ8A, false>>,   // Q4_K
          matmul_quant<row_dot_qk<BlockQ8A, true>>,    // Q5_K
          matmul_quant<row_dot_q6_k<BlockQ8A>>,        // Q6_K
          matmul_float<row_dot_bf16>,                  // BF16
          PLM_X16(Q8_0, BlockQ8A),    // Q8_0_X16
          PLM_X16(Q4_0, BlockQ8A),    // Q4_0_X16
          PLM_X16(Q4_1, BlockQ8A),    // Q4_1_X16
          PLM_X16(I8, BlockQ8A),    // I8_X16
          PLM_X16(Q5_0, BlockQ8A),    // Q5_0_X16
          PLM_X16(Q5_1, BlockQ8A),    // Q5_1_X16
          PLM_X16(Q4_0_G64, BlockQ8A),    // Q4_0_G64_X16
          PLM_X16(Q4_0_G128, BlockQ8A),    // Q4_0_G128_X16
          PLM_X16(Q4_1_G64, BlockQ8A),    // Q4_1_G64_X16
          PLM_X16(Q4_1_G128, BlockQ8A),    // Q4_1_G128_X16
          PLM_SPARSE24(BlockQ8A),  // Q4_0_24_X16
          PLM_SPARSE24(BlockQ8A),  // I8_24_X16
          matmul_sparse_expand<BlockQ8A, PLM_NEON_TABLE>,  // I8_BITMASK
      },
      ref_kernels().quantize_act,
      ref_kernels().dequant_row,
      dot_neon,
      axpy_neon,
      scale_neon,
      ref_kernels().rms_norm,
      silu_mul_neon,
      add_neon,
      {
          matmul2_float<matmul_float<row_dot_f32>>,
          matmul2_float<matmul_float<row_dot_f16>>,
          matmul2_quant<row_dot2_q8_0>,
          matmul2_quant<row_dot2_q4<32, false>>,
          matmul2_quant<row_dot2_q4<32, true>>,
          matmul2_quant<row_dot2_q4<64, false>>,
          matmul2_quant<row_dot2_q4<128, false>>,
          matmul2_quant<row_dot2_q4<64, true>>,
          matmul2_quant<row_dot2_q4<128, true>>,
          matmul2_quant<row_dot2_i8>,
          matmul2_quant<row_dot_q5<BlockQ8A2, false>>,  // Q5_0
          matmul2_quant<row_dot_q5<BlockQ8A2, true>>,   // Q5_1
          matmul2_quant<row_dot_qk<BlockQ8A2, false>>,  // Q4_K
          matmul2_quant<row_dot_qk<BlockQ8A2, true>>,   // Q5_K
          matmul2_quant<row_dot_q6_k<BlockQ8A2>>,       // Q6_K
          matmul2_float<matmul_float<row_dot_bf16>>,    // BF16
          PLM_X16(Q8_0, BlockQ8A2),   // Q8_0_X16
          PLM_X16(Q4_0, BlockQ8A2),   // Q4_0_X16
          PLM_X16(Q4_1, BlockQ8A2),   // Q4_1_X16
          PLM_X16(I8, BlockQ8A2),   // I8_X16
          PLM_X16(Q5_0, BlockQ8A2),   // Q5_0_X16
          PLM_X16(Q5_1, BlockQ8A2),   // Q5_1_X16
          PLM_X16(Q4_0_G64, BlockQ8A2),   // Q4_0_G64_X16
          PLM_X16(Q4_0_G128, BlockQ8A2),   // Q4_0_G128_X16
          PLM_X16(Q4_1_G64, BlockQ8A2),   // Q4_1_G64_X16
          PLM_X16(Q4_1_G128, BlockQ8A2),   // Q4_1_G128_X16
          PLM_SPARSE24(BlockQ8A2),  // Q4_0_24_X16
          PLM_SPARSE24(BlockQ8A2),  // I8_24_X16
          matmul_sparse_expand<BlockQ8A2, PLM_NEON_TABLE>,  // I8_BITMASK
      },
      ref_kernels().quantize_act2,
      weighted_sum_by_axpy<axpy_neon>,
      max_neon,
      exp_sum_neon,
      to_f16_neon,
      weighted_sum_f16_neon,
      scores_q8_0_neon,
      weighted_sum_q8_0_neon,
      PLM_SPARSE24_NATIVE,
  };
  return &table;
}

#else  // not AArch64 NEON: the variant is not offered

const KernelTable* PLM_NEON_TABLE() { return nullptr; }

#endif

}  // namespace plm::kernels
