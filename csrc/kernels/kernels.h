// Kernel table: one instance per CPU variant (scalar reference, AVX2+FMA,
// AVX2 with AVX-VNNI, AVX-512+VNNI, NEON). The scalar reference is the test oracle for every other
// variant. The executor calls kernels through best_kernels(); tests may ask for
// a specific variant by name.
#pragma once
#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>
#include "common.h"

namespace plm::kernels {

// Activations quantized on the fly for integer matmuls: blocks of 32 values.
//   d = max|x| / 127 (0 if all zero), q = round-half-away(x / d) clamped to [-127, 127],
//   s = d * sum(q)  (used by the asymmetric Q4_1 types: sum_k m * x_k ~= m * s).
struct BlockQ8A { float d; float s; int8_t qs[32]; };
static_assert(sizeof(BlockQ8A) == 40, "BlockQ8A size");

// Two-level activations (BlockQ8A plus an int8 residual), for blocks where one
// outlier makes d large and rounds the other values to ~0: x ~= d*q + d2*q2.
//   d, q, s        exactly as BlockQ8A (same bits as quantize_act);
//   r  = fmaf(-d, (float)q, x)   i.e. x - d*q rounded ONCE (every variant uses a
//        fused multiply-subtract: std::fma / vfnmadd / vfms, never a separate
//        product and subtraction, so FMA contraction cannot change it). In practice
//        the residual is exact: |r| <= ~d/2 and it fits in 24 bits;
//   d2 = d / 256 (exact: a power of two), q2 = round-half-away(r * (1/d2)) clamped to
//        [-127, 127] (the BlockQ8A rule applied to r at that scale), s2 = d2 * sum(q2).
// So |x - d*q - d2*q2| <= d2/2 = max|x| / 127 / 512, but where |r| rounds to 128 d2
// (within d/512 of d/2) and is clamped: there d2 (up to float rounding).
// Because d = 256 d2 exactly, x ~= d2 * (256 q + q2): one 16-bit integer per element,
// which AVX2 without VNNI multiplies with 8-bit weights in half the instructions of
// two int8 dot products (vpmaddwd, x16_avx2.cpp); the integer sums are the same.
// Every variant produces bit-identical blocks.
struct BlockQ8A2 { float d; float s; float d2; float s2; int8_t qs[32]; int8_t qs2[32]; };
static_assert(sizeof(BlockQ8A2) == 80, "BlockQ8A2 size");
constexpr float kLevel2Scale = 1.0f / 256.0f;  // d2 = d * kLevel2Scale

// A weight matrix [rows=N, cols=K] in any DType, row-major by output channel.
struct WeightView {
  DType dtype;
  int64_t rows, cols;
  const uint8_t* data;        // start of row 0
  size_t row_stride;          // bytes between rows (== row_bytes(dtype, cols) for bundle tensors)
  const float* row_scales;    // I8 only: [rows] per-channel scales; else nullptr
  // Compute every token's outputs with the arithmetic of a one-token call, whatever T (no prefill
  // GEMM, whose sums run in another order): what a step that verifies drafted tokens needs, so
  // that each verified token gets the logits decoding it alone would give.
  bool row_invariant = false;
  // Attention's KV cache rows (one head's keys): short rows read once per step, which the float
  // kernels prefetch kKvRowsAhead rows ahead (kv_prefetch.h); weights are streams the hardware
  // prefetchers follow.
  bool kv_rows = false;
};

// y[t*ldy + n] = sum_k W[n,k] * x[t,k]  for t in [0,T), n in [n0,n1).
// F32/F16 weights read x (f32, row stride ldx elements); quantized weights read
// xq ([T][K/32] BlockQ8A, row stride K/32 blocks) and ignore x.
// Integer sums inside a 32-block are exact, so every variant agrees with the
// reference up to float summation order.
using MatmulFn = void (*)(const WeightView& w, const float* x, size_t ldx,
                          const BlockQ8A* xq, int T, float* y, size_t ldy, int n0, int n1);

// Same contract as MatmulFn, reading BlockQ8A2 activations for quantized weights:
// per 32-block, y += wscale * (d * idot(w, q) + d2 * idot(w, q2)) (+ Q4_1:
// m * (s + s2); Q4_0's -8 and the I8 row scale as in MatmulFn). Each weight block
// is decoded once and used for both integer dot products. F32/F16 entries read
// float x exactly like matmul (they may be the same function).
using MatmulFn2 = void (*)(const WeightView& w, const float* x, size_t ldx,
                           const BlockQ8A2* xq, int T, float* y, size_t ldy, int n0, int n1);

// matmul2 entry for the float weight types: forwards to a MatmulFn (which ignores xq).
template <MatmulFn F>
void matmul2_float(const WeightView& w, const float* x, size_t ldx, const BlockQ8A2*, int T, float* y,
                   size_t ldy, int n0, int n1) {
  F(w, x, ldx, nullptr, T, y, ldy, n0, n1);
}

// KernelTable::sparse24: a variant's 2:4-sparse kernels on this CPU.
enum Sparse24Kernel : int {
  kSparse24None = 0,    // none: the matmul entries expand the rows at every call (the reference's way)
  kSparse24Slower = 1,  // in place, but slower than the dense kernel on the expanded weights (measured)
  kSparse24Faster = 2,  // in place and faster: fewer bytes at the dense kernel's rate
};

struct KernelTable {
  const char* name;                          // "ref", "avx2", "avxvnni", "avxvnni-evex", "avx512", "neon"
  MatmulFn matmul[kNumDTypes];               // indexed by DType
  void (*quantize_act)(const float* x, BlockQ8A* out, int K);   // K % 32 == 0
  void (*dequant_row)(DType t, const void* row, float* out, int64_t cols);  // embeddings
  float (*dot)(const float* a, const float* b, int n);
  void (*axpy)(float a, const float* x, float* y, int n);       // y += a*x
  void (*scale)(float a, float* y, int n);                      // y *= a
  void (*rms_norm)(const float* x, const float* w, float* y, int n, float eps);
  void (*silu_mul)(const float* g, const float* u, float* y, int n);   // y = silu(g)*u
  void (*add)(const float* a, const float* b, float* y, int n);        // y = a+b
  // Two-level activations (BlockQ8A2): higher-precision integer matmuls.
  MatmulFn2 matmul2[kNumDTypes];             // indexed by DType
  void (*quantize_act2)(const float* x, BlockQ8A2* out, int K);  // K % 32 == 0
  // Attention's P.V: out[g*ldo + i] += sum_{p < n} w[g*ldw + p] * rows[p*ldr + i] for g < G,
  // i < dh; each row is read once for all G weight rows (the query heads of a KV head).
  void (*weighted_sum)(const float* w, size_t ldw, int G, const float* rows, size_t ldr, int n,
                       float* out, size_t ldo, int dh);
  // Attention's softmax: the largest of s[0..n) (-inf for n == 0), and s[i] = exp((s[i] - m) * scale)
  // for i < n, returning their sum (m is that max, scale > 0, so every exponent is <= 0).
  float (*max)(const float* s, int n);
  float (*exp_sum)(float* s, int n, float m, float scale);
  // The f16 KV cache: y[i] = x[i] rounded to half (to nearest even), and weighted_sum over f16 rows.
  void (*to_f16)(const float* x, fp16_t* y, int n);
  void (*weighted_sum_f16)(const float* w, size_t ldw, int G, const fp16_t* rows, size_t ldr, int n,
                           float* out, size_t ldo, int dh);
  // The Q8_0 KV cache (runtime/kv_cache.h): rows of dh / 32 blocks {f16 d; int8 q[32]}, ldr bytes apart
  // (dh % 32 == 0). Attention's scores against float queries (no activation quantization):
  // s[g*lds + p] = sum_i q[g*ldq + i] * d_b(p) q_b(p)[i] for p in [p0, p1), g < G; and its P.V:
  // out[g*ldo + i] += sum_{p < n} w[g*ldw + p] * row_p[i], each row decoded once for all G.
  void (*scores_q8_0)(const uint8_t* rows, size_t ldr, const float* q, size_t ldq, int G, float* s, size_t lds,
                      int p0, int p1, int dh);
  void (*weighted_sum_q8_0)(const float* w, size_t ldw, int G, const uint8_t* rows, size_t ldr, int n,
                            float* out, size_t ldo, int dh);
  // How this variant reads the 2:4-sparse weights on this CPU (nullptr: kSparse24None). A Program
  // expands them into dense x16 weights when it loads them unless it keeps them in place (the
  // bundle's bytes, mmapped): where the kernel is kSparse24Faster, or on request where it is
  // kSparse24Slower; never where there is none (matmul_sparse_expand would expand every row at
  // every step).
  int (*sparse24)() = nullptr;
  // The same for I8_BITMASK (unstructured-sparse int8, common.h).
  int (*bitmask)() = nullptr;
};

// Per-thread scratch bytes that grow. Each file gets its own copy (an unnamed namespace): the files
// are compiled with different CPU flags, and a std::vector<uint8_t> member instantiated in an
// AVX-512 file could be the one the linker keeps for every file, AVX2-only CPUs included.
namespace {
struct ScratchBytes {
  uint8_t* p = nullptr;
  size_t n = 0;
  ~ScratchBytes() { delete[] p; }
  uint8_t* get(size_t need) {
    if (need > n) {
      delete[] p;
      p = new uint8_t[need];
      n = need;
    }
    return p;
  }
};
}  // namespace

// weighted_sum from an axpy, for variants without a blocked one.
template <void (*Axpy)(float, const float*, float*, int)>
void weighted_sum_by_axpy(const float* w, size_t ldw, int G, const float* rows, size_t ldr, int n,
                          float* out, size_t ldo, int dh) {
  for (int p = 0; p < n; ++p)
    for (int g = 0; g < G; ++g) Axpy(w[g * ldw + p], rows + (size_t)p * ldr, out + g * ldo, dh);
}

const KernelTable& ref_kernels();
inline const KernelTable* ref_kernel_table() { return &ref_kernels(); }  // for matmul_x16_gather

// x16 weights (common.h) through a variant's own row-major kernel of their base type
// (Table()->matmul, or matmul2 for two-level activations, at x16_base): each row is gathered back
// into its row-major bytes and multiplied alone. Correct for every variant and T, and for every x16
// type the variant's base kernels cover; the variants' own x16 kernels are what makes the layout fast.
template <class Act, const KernelTable* (*Table)()>
void matmul_x16_gather(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y,
                       size_t ldy, int n0, int n1) {
  const DType base = x16_base(w.dtype);
  const KernelTable& kt = *Table();
  const auto kernel = [&] {
    if constexpr (std::is_same_v<Act, BlockQ8A2>) return kt.matmul2[(int)base];
    else return kt.matmul[(int)base];
  }();
  const size_t rb = row_bytes(w.dtype, w.cols);
  thread_local ScratchBytes scratch;
  uint8_t* const row = scratch.get(rb);
  for (int n = n0; n < n1; ++n) {
    x16_gather_row(w.dtype, w.data, w.cols, n, row);
    const WeightView one{base, 1, w.cols, row, rb, w.row_scales ? w.row_scales + n : nullptr};
    kernel(one, x, ldx, xq, T, y + n, ldy, 0, 1);
  }
}

// The sparse types (2:4 and bitmask, common.h) through a variant's own row-major kernel of the dense
// type they expand into (Q4_0, or I8): up to 16 rows at a time are expanded into dense rows (the
// pruned columns 0) and multiplied for all T tokens at once (so prefill keeps the variant's GEMM).
// Correct for every variant, T and row range: the reference's way, and the fallback of variants
// without their own sparse kernel; a variant's own kernel is what reads fewer bytes.
template <class Act, const KernelTable* (*Table)()>
void matmul_sparse_expand(const WeightView& w, const float* x, size_t ldx, const Act* xq, int T, float* y,
                          size_t ldy, int n0, int n1) {
  const KernelTable& kt = *Table();
  const DType base = sparse_dense(w.dtype);
  const auto kernel = [&] {
    if constexpr (std::is_same_v<Act, BlockQ8A2>) return kt.matmul2[(int)base];
    else return kt.matmul[(int)base];
  }();
  const size_t rb = row_bytes(base, w.cols);
  thread_local ScratchBytes scratch;
  uint8_t* const rows = scratch.get(16 * rb);
  for (int n = n0; n < n1;) {
    const int m = std::min(n1 - n, 16 - n % 16);  // to the end of n's group of 16 rows
    for (int r = 0; r < m; ++r) sparse_gather_row(w.dtype, w.data, w.rows, w.cols, n + r, rows + (size_t)r * rb);
    WeightView dense{base, m, w.cols, rows, rb, w.row_scales ? w.row_scales + n : nullptr};
    dense.row_invariant = w.row_invariant;
    kernel(dense, x, ldx, xq, T, y + n, ldy, 0, m);
    n += m;
  }
}

const KernelTable& best_kernels();                 // picked once from CPUID; env PLM_KERNELS=<name> overrides
const KernelTable* kernels_by_name(const std::string& name);  // nullptr if not built or CPU lacks it
std::vector<std::string> available_kernels();      // variants usable on this CPU, "ref" first

}  // namespace plm::kernels
