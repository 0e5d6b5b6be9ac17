// NEON kernels (baseline AArch64 only: no dotprod / i8mm / fp16 arithmetic, so
// they run on every ARMv8-A core). Kept deliberately simple: one weight row x one
// token at a time. Integer dot products use vmull_s8 / vmlal_s8 (each s16 lane
// holds two products, |sum| <= 2*128*127 < 2^15) and vpadalq_s16 into s32, so
// every 32-block sum is exact. matmul2 (two-level activations) reuses each weight
// block's registers for both dot products. Activation quantization (both levels),
// rms_norm, silu_mul and dequant_row reuse the scalar reference (identical results
// by construction).
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include "kernels/kernels.h"

namespace plm::kernels {

#if defined(__aarch64__) && defined(__ARM_NEON)
namespace {

// sum_j w[j] * a[j] over 32 signed bytes held as two 16-byte halves each.
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

float row_dot_q8_0(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const int32_t d = idot32(vld1q_s8(w[b].qs), vld1q_s8(w[b].qs + 16), xq[b].qs);
    acc += fp16_to_fp32(w[b].d) * xq[b].d * (float)d;
  }
  return acc;
}

float row_dot_i8(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b)
    acc += xq[b].d * (float)idot32(vld1q_s8(w + 32 * b), vld1q_s8(w + 32 * b + 16), xq[b].qs);
  return acc;
}

// Q4 runs: low nibbles are elements 0..15, high nibbles 16..31; Q4_0 subtracts 8
// in int8 (exact: -8..7), Q4_1 keeps 0..15 and adds m * s in float.
template <int G, bool Asym>
float row_dot_q4(const uint8_t* row, const BlockQ8A* xq, int64_t K) {
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
float row_dot2_q8_0(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const BlockQ8_0* w = reinterpret_cast<const BlockQ8_0*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const int8x16_t w0 = vld1q_s8(w[b].qs), w1 = vld1q_s8(w[b].qs + 16);
    const BlockQ8A2& a = xq[b];
    const float v = a.d * (float)idot32(w0, w1, a.qs) + a.d2 * (float)idot32(w0, w1, a.qs2);
    acc += fp16_to_fp32(w[b].d) * v;
  }
  return acc;
}

float row_dot2_i8(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
  const int8_t* w = reinterpret_cast<const int8_t*>(row);
  float acc = 0.0f;
  for (int64_t b = 0; b < K / 32; ++b) {
    const int8x16_t w0 = vld1q_s8(w + 32 * b), w1 = vld1q_s8(w + 32 * b + 16);
    acc += xq[b].d * (float)idot32(w0, w1, xq[b].qs) + xq[b].d2 * (float)idot32(w0, w1, xq[b].qs2);
  }
  return acc;
}

template <int G, bool Asym>
float row_dot2_q4(const uint8_t* row, const BlockQ8A2* xq, int64_t K) {
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

template <class Act, float (*RowDot)(const uint8_t*, const Act*, int64_t)>
void matmul_quant_t(const WeightView& w, const float*, size_t, const Act* xq, int T, float* y, size_t ldy,
                    int n0, int n1) {
  const int64_t nb = w.cols / 32;
  for (int n = n0; n < n1; ++n)
    for (int t = 0; t < T; ++t) {
      float v = RowDot(w.data + (size_t)n * w.row_stride, xq + t * nb, w.cols);
      if (w.dtype == DType::I8) v *= w.row_scales[n];
      y[t * ldy + n] = v;
    }
}

template <float (*RowDot)(const uint8_t*, const BlockQ8A*, int64_t)>
constexpr MatmulFn matmul_quant = matmul_quant_t<BlockQ8A, RowDot>;
template <float (*RowDot)(const uint8_t*, const BlockQ8A2*, int64_t)>
constexpr MatmulFn2 matmul2_quant = matmul_quant_t<BlockQ8A2, RowDot>;

float dot_neon(const float* a, const float* b, int n) {
  return row_dot_f32(reinterpret_cast<const uint8_t*>(a), b, n);
}
void axpy_neon(float a, const float* x, float* y, int n) {
  int i = 0;
  for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
  for (; i < n; ++i) y[i] += a * x[i];
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

}  // namespace

const KernelTable* neon_kernel_table() {
  static const KernelTable table = {
      "neon",
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
      },
      ref_kernels().quantize_act,
      ref_kernels().dequant_row,
      dot_neon,
      axpy_neon,
      scale_neon,
      ref_kernels().rms_norm,
      ref_kernels().silu_mul,
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
      },
      ref_kernels().quantize_act2,
  };
  return &table;
}

#else  // not AArch64 NEON: the variant is not offered

const KernelTable* neon_kernel_table() { return nullptr; }

#endif

}  // namespace plm::kernels
