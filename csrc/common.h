// Shared definitions for the pocketlm C++ core: tensor types, quant blocks, errors.
// This file is the contract between the Python converter (python/pocketlm/dtypes.py,
// python/pocketlm/quant.py), the bundle format (docs/format.md) and the kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace plm {

// Typed errors. The bindings translate them into pocketlm.BundleError etc.
struct BundleError : std::runtime_error { using std::runtime_error::runtime_error; };
struct ContextOverflowError : std::runtime_error { using std::runtime_error::runtime_error; };
struct UnsupportedError : std::runtime_error { using std::runtime_error::runtime_error; };

// ---- IEEE half <-> float (portable; SIMD files use F16C/NEON instead) ----
using fp16_t = uint16_t;
inline float fp16_to_fp32(fp16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; }
    else {  // subnormal: renormalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f; std::memcpy(&f, &bits, 4); return f;
}
inline fp16_t fp32_to_fp16(float f) {  // round to nearest even
  uint32_t x; std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
  uint32_t man = x & 0x7fffff;
  if (((x >> 23) & 0xff) == 0xff) return (fp16_t)(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return (fp16_t)(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return (fp16_t)sign;
    man |= 0x800000;
    uint32_t shift = (uint32_t)(14 - exp);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return (fp16_t)(sign | half);
  }
  uint32_t h = sign | (uint32_t)exp << 10 | man >> 13;
  uint32_t rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return (fp16_t)h;
}

// ---- Tensor types. Ids are stored in .plm files: never renumber. ----
enum class DType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q8_0 = 2,       // block 32: {f16 d; i8 qs[32]}            x = d*q            (== GGUF Q8_0)
  Q4_0 = 3,       // block 32: {f16 d; u8 qs[16]}            x = d*(q-8)        (== GGUF Q4_0)
  Q4_1 = 4,       // block 32: {f16 d; f16 m; u8 qs[16]}     x = d*q + m        (== GGUF Q4_1)
  Q4_0_G64 = 5,   // block 64: {f16 d; u8 qs[32]}            two Q4_0 nibble halves, one scale
  Q4_0_G128 = 6,  // block 128: {f16 d; u8 qs[64]}
  Q4_1_G64 = 7,   // block 64: {f16 d; f16 m; u8 qs[32]}
  Q4_1_G128 = 8,  // block 128: {f16 d; f16 m; u8 qs[64]}
  I8 = 9,         // per-output-channel int8: [rows][cols] i8, then [rows] f32 scales; x = s[r]*q
  // GGUF block layouts, stored unchanged (zero-copy from a GGUF file; values == gguf dequantize):
  Q5_0 = 10,      // block 32: {f16 d; u8 qh[4]; u8 qs[16]}          x = d*(q-16), q 5-bit
  Q5_1 = 11,      // block 32: {f16 d; f16 m; u8 qh[4]; u8 qs[16]}   x = d*q + m
  Q4_K = 12,      // block 256: {f16 d, dmin; u8 scales[12]; u8 qs[128]}   8 x 32: x = d*sc*q - dmin*mn
  Q5_K = 13,      // block 256: {f16 d, dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]}
  Q6_K = 14,      // block 256: {u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d}  16 x 16: x = d*sc*(q-32)
  BF16 = 15,      // bfloat16 (the high half of an f32)
  // Row-interleaved ("x16") forms of Q8_0, Q4_0, Q4_1 (groups 32/64/128), I8, Q5_0 and Q5_1 for matmul weights, written by
  // the converter (layout below): same bytes per tensor as the base type, rows % 16 == 0.
  Q8_0_X16 = 16,
  Q4_0_X16 = 17,
  Q4_1_X16 = 18,
  I8_X16 = 19,    // codes interleaved, then [rows] f32 scales as I8; needs cols % 32 == 0
  Q5_0_X16 = 20,
  Q5_1_X16 = 21,
  Q4_0_G64_X16 = 22,   // the group-64/128 Q4 types: a record per block of 64/128 elements
  Q4_0_G128_X16 = 23,
  Q4_1_G64_X16 = 24,
  Q4_1_G128_X16 = 25,
  // 2:4-sparse 4-bit weights (two kept in every four columns), rows % 16 == 0, cols % 64 == 0:
  // records of 16 rows x 64 columns, 384 bytes, 3.0 bits per weight (layout below).
  Q4_0_24_X16 = 26,
  // 2:4-sparse int8 (the int8 mode's per-row scale): records of 16 rows x 64 columns, 608 bytes,
  // then [rows] f32 scales as I8; 4.75 bits per weight (layout below).
  I8_24_X16 = 27,
  // Unstructured-sparse int8 (a bitmask per 64 columns, the stored values packed, the int8 mode's
  // per-row scale), with row pointers: bytes vary with the stored values (layout below).
  I8_BITMASK = 28,
  COUNT = 29,
};
constexpr int kNumDTypes = (int)DType::COUNT;

// x16 interleaving. A matrix-vector product that walks 16 rows at once reads 16 short
// streams in the row-major layouts, which the hardware prefetchers serve poorly; the x16
// types put each group of 16 rows (rows 16g..16g+15) in one contiguous run, so a kernel
// that keeps one row per SIMD lane reads one sequential stream. Group g starts at byte
// 16 * g * row_bytes and holds the rows' 32-element blocks b = 0, 1, ... in order, each as one
// record of 16 * block_bytes bytes (the base type's block of each of the 16 rows):
//   1. the block's header fields in the base block's order (Q8_0/Q4_0: f16 d; Q4_1: f16 d, m;
//      Q5_0: f16 d, u32 qh; Q5_1: f16 d, m, u32 qh), each as 16 values, row 0 first (32 bytes a
//      f16 field, 64 bytes a qh field);
//   2. the code bytes (Q4/Q5: the 16 nibble bytes qs; Q8_0/I8: the 32 int8) as 4-byte units:
//      unit u of row i at 64 * u + 4 * i. So a 64-byte vector of unit u holds bytes
//      4u..4u+3 of every row: for Q4/Q5, codes 4u..4u+3 in the low and 16+4u..16+4u+3 in the
//      high nibbles (Q5: bit 4 of code j is bit j of the row's qh); for Q8_0/I8, codes
//      4u..4u+3 (u = 0..7).
// Record sizes: Q8_0 544, Q4_0 288, Q4_1 320, I8 512, Q5_0 352, Q5_1 384 bytes. The group-64/128
// Q4 types have one record per 64/128-element block: the header, then the 32/64 nibble bytes as
// 8/16 units (so each 32-element run is 4 units, as in Q4_0).
//
// 4-bit nibble order (all Q4 types, as in GGUF): within each run of 32 elements
// stored in 16 bytes qs[0..15], element j is the low nibble of qs[j] and element
// j+16 the high nibble of qs[j]. A G64/G128 block holds 2/4 such runs back to back.
// Q5_0/Q5_1 use the same nibbles; bit j of the little-endian u32 qh is bit 4 of element j.
//
// K-quants (GGUF "super-blocks" of 256), exactly as llama.cpp lays them out:
//  Q4_K/Q5_K: 8 sub-blocks of 32, each with a 6-bit scale sc[s] and 6-bit min mn[s] packed
//    in scales[12]: for j < 4, sc[j] = scales[j] & 63, mn[j] = scales[j+4] & 63,
//    sc[j+4] = (scales[j+8] & 15) | (scales[j] >> 6) << 4,
//    mn[j+4] = (scales[j+8] >> 4) | (scales[j+4] >> 6) << 4.
//    Element j of sub-block 2c (2c+1) is the low (high) nibble of qs[32c + j]; Q5_K adds
//    bit s of qh[j] as bit 4 of element j of sub-block s. x = (d*sc[s])*q - (dmin*mn[s]).
//  Q6_K: element 128h + r (h = 0, 1; r < 128) has low 4 bits (ql[64h + r%64] >> 4*(r/64)) & 15
//    and high 2 bits (qh[32h + r%32] >> 2*(r/32)) & 3; x = (d*scales[e/16]) * (q - 32).

#pragma pack(push, 1)
struct BlockQ8_0 { fp16_t d; int8_t qs[32]; };
struct BlockQ4_0 { fp16_t d; uint8_t qs[16]; };
struct BlockQ4_1 { fp16_t d; fp16_t m; uint8_t qs[16]; };
template <int G> struct BlockQ4_0G { fp16_t d; uint8_t qs[G / 2]; };
template <int G> struct BlockQ4_1G { fp16_t d; fp16_t m; uint8_t qs[G / 2]; };
struct BlockQ5_0 { fp16_t d; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ5_1 { fp16_t d; fp16_t m; uint8_t qh[4]; uint8_t qs[16]; };
struct BlockQ4_K { fp16_t d; fp16_t dmin; uint8_t scales[12]; uint8_t qs[128]; };
struct BlockQ5_K { fp16_t d; fp16_t dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; };
struct BlockQ6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; fp16_t d; };
#pragma pack(pop)
static_assert(sizeof(BlockQ8_0) == 34, "BlockQ8_0 size");
static_assert(sizeof(BlockQ4_0) == 18, "BlockQ4_0 size");
static_assert(sizeof(BlockQ4_1) == 20, "BlockQ4_1 size");
static_assert(sizeof(BlockQ4_0G<64>) == 34 && sizeof(BlockQ4_0G<128>) == 66, "BlockQ4_0G size");
static_assert(sizeof(BlockQ4_1G<64>) == 36 && sizeof(BlockQ4_1G<128>) == 68, "BlockQ4_1G size");
static_assert(sizeof(BlockQ5_0) == 22, "BlockQ5_0 size");
static_assert(sizeof(BlockQ5_1) == 24, "BlockQ5_1 size");
static_assert(sizeof(BlockQ4_K) == 144, "BlockQ4_K size");
static_assert(sizeof(BlockQ5_K) == 176, "BlockQ5_K size");
static_assert(sizeof(BlockQ6_K) == 210, "BlockQ6_K size");

// The 6-bit scales (sc[0..7]) and mins (mn[0..7]) of a Q4_K/Q5_K block (layout above).
inline void kquant_scales_mins(const uint8_t* scales, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = scales[j] & 63;
    mn[j] = scales[j + 4] & 63;
    sc[j + 4] = (uint8_t)((scales[j + 8] & 15) | (scales[j] >> 6) << 4);
    mn[j + 4] = (uint8_t)((scales[j + 8] >> 4) | (scales[j + 4] >> 6) << 4);
  }
}
inline float bf16_to_fp32(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f; std::memcpy(&f, &bits, 4); return f;
}

struct DTypeTraits {
  const char* name;
  int block_elems;    // elements per block (1 for plain types; I8 handled specially)
  int block_bytes;    // bytes per block
  bool quantized;     // matmul takes int8-quantized activations
};
// One row per type, indexed by DType.
inline constexpr DTypeTraits kDTypeTraits[kNumDTypes] = {
  {"f32", 1, 4, false},
  {"f16", 1, 2, false},
  {"q8_0", 32, 34, true},
  {"q4_0", 32, 18, true},
  {"q4_1", 32, 20, true},
  {"q4_0_g64", 64, 34, true},
  {"q4_0_g128", 128, 66, true},
  {"q4_1_g64", 64, 36, true},
  {"q4_1_g128", 128, 68, true},
  {"i8", 1, 1, true},
  {"q5_0", 32, 22, true},
  {"q5_1", 32, 24, true},
  {"q4_k", 256, 144, true},
  {"q5_k", 256, 176, true},
  {"q6_k", 256, 210, true},
  {"bf16", 1, 2, false},
  {"q8_0_x16", 32, 34, true},
  {"q4_0_x16", 32, 18, true},
  {"q4_1_x16", 32, 20, true},
  {"i8_x16", 32, 32, true},
  {"q5_0_x16", 32, 22, true},
  {"q5_1_x16", 32, 24, true},
  {"q4_0_g64_x16", 64, 34, true},
  {"q4_0_g128_x16", 128, 66, true},
  {"q4_1_g64_x16", 64, 36, true},
  {"q4_1_g128_x16", 128, 68, true},
  {"q4_0_24_x16", 64, 24, true},  // per row: 64 columns in 24 bytes
  {"i8_24_x16", 64, 38, true},    // per row: 64 columns in 38 bytes, + its f32 scale
  {"i8_bitmask", 64, 0, true},    // variable: bitmask_check() checks a tensor's layout
};
inline const DTypeTraits& traits(DType t) { return kDTypeTraits[(int)t]; }
inline bool dtype_valid(uint32_t t) { return t < (uint32_t)DType::COUNT; }

// x16 types: rows per group, and the row-major type each interleaves.
constexpr int kX16Rows = 16;
inline bool is_x16(DType t) { return t >= DType::Q8_0_X16 && t <= DType::Q4_1_G128_X16; }
constexpr DType x16_base(DType t) {
  switch (t) {
    case DType::Q8_0_X16: return DType::Q8_0;
    case DType::Q4_0_X16: return DType::Q4_0;
    case DType::Q4_1_X16: return DType::Q4_1;
    case DType::I8_X16: return DType::I8;
    case DType::Q5_0_X16: return DType::Q5_0;
    case DType::Q5_1_X16: return DType::Q5_1;
    case DType::Q4_0_G64_X16: return DType::Q4_0_G64;
    case DType::Q4_0_G128_X16: return DType::Q4_0_G128;
    case DType::Q4_1_G64_X16: return DType::Q4_1_G64;
    case DType::Q4_1_G128_X16: return DType::Q4_1_G128;
    default: return t;
  }
}
// The 2:4-sparse types (layout below).
inline bool is_sparse24(DType t) { return t == DType::Q4_0_24_X16 || t == DType::I8_24_X16; }
// Types stored in records of 16 rows (rows % 16 == 0): the x16 ones and the 2:4-sparse ones.
inline bool needs_16_rows(DType t) { return is_x16(t) || is_sparse24(t); }

// The types that carry one f32 scale per row after the codes.
inline bool has_row_scales(DType t) {
  return t == DType::I8 || t == DType::I8_X16 || t == DType::I8_24_X16 || t == DType::I8_BITMASK;
}
// Types whose bytes depend on the values, not only on the shape (tensor_bytes does not apply).
inline bool is_variable(DType t) { return t == DType::I8_BITMASK; }

// Bytes of one row of `cols` elements (cols must be a multiple of block_elems).
inline size_t row_bytes(DType t, int64_t cols) {
  const auto& tr = traits(t);
  return (size_t)(cols / tr.block_elems) * (size_t)tr.block_bytes;
}
// Bytes of a 2-D [rows, cols] tensor (1-D tensors: rows = 1). I8 adds its row scales.
inline size_t tensor_bytes(DType t, int64_t rows, int64_t cols) {
  size_t b = (size_t)rows * row_bytes(t, cols);
  if (has_row_scales(t)) b += (size_t)rows * sizeof(float);
  return b;
}

// The header fields (bytes each, in block order) of one block of an x16 type (32 elements; 64 or
// 128 for the group-64/128 Q4 types); the rest of the block's bytes are codes.
struct X16Block {
  int n_fields;
  int field_bytes[3];
};
constexpr X16Block x16_block(DType t) {
  switch (x16_base(t)) {
    case DType::Q4_1: case DType::Q4_1_G64: case DType::Q4_1_G128: return {2, {2, 2, 0}};
    case DType::Q5_0: return {2, {2, 4, 0}};
    case DType::Q5_1: return {3, {2, 2, 4}};
    case DType::I8: return {0, {0, 0, 0}};
    default: return {1, {2, 0, 0}};  // Q8_0, Q4_0 (any group): d
  }
}

// Row n of an x16 matrix of `cols` columns, in the base type's row-major bytes (I8: the codes
// only): the inverse of the interleaving above, for reference kernels and embedding lookups.
inline void x16_gather_row(DType t, const uint8_t* data, int64_t cols, int64_t n, uint8_t* out) {
  const X16Block lay = x16_block(t);
  const size_t bb = (size_t)traits(t).block_bytes;              // base block bytes
  const size_t rb = row_bytes(t, cols), g = (size_t)(n / kX16Rows), i = (size_t)(n % kX16Rows);
  const uint8_t* group = data + g * kX16Rows * rb;
  const int64_t be = traits(t).block_elems;  // elements per record
  for (int64_t b = 0; b < cols / be; ++b) {
    const uint8_t* rec = group + (size_t)b * kX16Rows * bb;
    uint8_t* o = out + (size_t)b * bb;
    size_t code = bb;
    for (int f = 0; f < lay.n_fields; ++f) {
      const size_t size = (size_t)lay.field_bytes[f];
      std::memcpy(o, rec + size * i, size);
      o += size;
      rec += kX16Rows * size;
      code -= size;
    }
    for (size_t u = 0; u < code / 4; ++u) std::memcpy(o + 4 * u, rec + 64 * u + 4 * i, 4);
  }
}

// Row n of an x16 matrix written from the base type's row-major bytes `row` (I8: the codes only):
// the interleaving itself, one row at a time (the converter's; x16_gather_row undoes it).
inline void x16_scatter_row(DType t, const uint8_t* row, int64_t cols, int64_t n, uint8_t* data) {
  const X16Block lay = x16_block(t);
  const size_t bb = (size_t)traits(t).block_bytes;
  const size_t rb = row_bytes(t, cols), g = (size_t)(n / kX16Rows), i = (size_t)(n % kX16Rows);
  uint8_t* group = data + g * kX16Rows * rb;
  const int64_t be = traits(t).block_elems;
  for (int64_t b = 0; b < cols / be; ++b) {
    uint8_t* rec = group + (size_t)b * kX16Rows * bb;
    const uint8_t* o = row + (size_t)b * bb;
    size_t code = bb;
    for (int f = 0; f < lay.n_fields; ++f) {
      const size_t size = (size_t)lay.field_bytes[f];
      std::memcpy(rec + size * i, o, size);
      o += size;
      rec += kX16Rows * size;
      code -= size;
    }
    for (size_t u = 0; u < code / 4; ++u) std::memcpy(rec + 64 * u + 4 * i, o + 4 * u, 4);
  }
}

// ---- The 2:4-sparse types: Q4_0_24_X16 (4-bit) and I8_24_X16 (int8) ----
// Each run of four columns (a group) keeps two weights. A row's 64-column block holds its 32 kept
// values as Q4_0 codes with one f16 scale (x = d * (q - 8), the pruned weights 0), and a 3-bit
// pattern code per group: code c keeps columns kSparse24Pairs[c] of the group (codes 6 and 7 are
// invalid; the reader refuses them). Value 2g is group g's first kept column, value 2g + 1 its
// second. The tensor is records of 16 rows x 64 columns (group of rows r16, block b at byte
// 384 * (r16 * cols / 64 + b)), each:
//   [0, 32)     d of rows 0..15 (f16)
//   [32, 288)   the 16 code bytes of each row as 4-byte units: unit u (0..3) of row i at 32 + 64u + 4i
//               holds bytes 4u..4u+3; value j (< 16) is the low nibble of byte j, value 16 + j its
//               high nibble (Q4_0's order)
//   [288, 384)  pattern codes, 24 bytes per unit u at 288 + 24u: row i's 12 bits at bit 12i
//               (little-endian), the codes of groups 2u, 2u + 1, 8 + 2u, 9 + 2u at bits 0, 3, 6, 9
//               (the groups of unit u's low-nibble values 4u..4u+3 and high-nibble ones 16+4u..19+4u)
// So a 64-byte vector of unit u holds the codes of 4 values of each of the 16 rows, as Q4_0_X16's do.
//
// I8_24_X16 keeps the same groups, values and pattern codes with int8 values and the int8 mode's
// per-row scale (x = s[row] * q, the pruned weights 0). Records of 16 rows x 64 columns (group of
// rows r16, block b at byte 608 * (r16 * cols / 64 + b)), then the [rows] f32 scales, each record:
//   [0, 512)    the 32 values of each row as 4-byte units: unit u (0..7) of row i at 64u + 4i holds
//               values 4u..4u+3 (int8), so unit u covers groups 2u, 2u + 1 (columns 8u..8u+7)
//   [512, 608)  pattern codes exactly as Q4_0_24_X16's [288, 384)
constexpr int kSparse24Pairs[8][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}, {0, 1}, {0, 1}};
constexpr size_t kSparse24Record = 384;     // Q4_0_24_X16
constexpr size_t kSparse24I8Record = 608;   // I8_24_X16
inline size_t sparse24_record(DType t) { return t == DType::I8_24_X16 ? kSparse24I8Record : kSparse24Record; }
// Where a record's pattern codes start.
inline size_t sparse24_patterns(DType t) { return t == DType::I8_24_X16 ? 512 : 288; }

// The pattern code of group g (0..15) of row i (0..15), from a record's pattern codes `pat`.
inline int sparse24_code(const uint8_t* pat, int i, int g) {
  const int u = (g % 8) / 2, k = (g >= 8 ? 2 : 0) + g % 2;
  const int bit = 12 * i + 3 * k;
  const uint8_t* p = pat + 24 * u;
  uint32_t v = p[bit / 8];
  if (bit % 8 > 5) v |= (uint32_t)p[bit / 8 + 1] << 8;  // the code runs into the next byte (never the last)
  return (int)(v >> (bit % 8) & 7);
}

// The first invalid pattern code of a 2:4-sparse tensor (its byte offset), or -1 when all are valid.
inline int64_t sparse24_bad_pattern(DType t, const uint8_t* data, int64_t rows, int64_t cols) {
  const size_t records = (size_t)(rows / 16) * (size_t)(cols / 64), rb = sparse24_record(t), po = sparse24_patterns(t);
  for (size_t r = 0; r < records; ++r) {
    const uint8_t* pat = data + r * rb + po;
    for (int k = 0; k < 96; k += 3) {  // 3 bytes = 8 codes; a code c >= 6 has bits 1 and 2 set
      const uint32_t v = (uint32_t)pat[k] | (uint32_t)pat[k + 1] << 8 | (uint32_t)pat[k + 2] << 16;
      if ((v >> 1) & (v >> 2) & 0x249249u) return (int64_t)(r * rb + po + k);
    }
  }
  return -1;
}

// Row n of a 2:4-sparse matrix as dense row-major bytes of sparse_dense(t): Q4_0 (cols / 32
// blocks of 18 bytes; each 64-column block's scale in both of its Q4_0 blocks, the pruned columns
// code 8) or I8 (cols codes, the pruned ones 0; the row's scale stays in the tensor's scales):
// what the reference kernels, embedding lookups and the variants without their own kernel read.
inline void sparse24_gather_row(DType t, const uint8_t* data, int64_t cols, int64_t n, uint8_t* out) {
  const int64_t nb = cols / 64;
  const int i = (int)(n % 16);
  const bool i8 = t == DType::I8_24_X16;
  const size_t rb = sparse24_record(t);
  const uint8_t* rec = data + (size_t)(n / 16) * (size_t)nb * rb;
  for (int64_t b = 0; b < nb; ++b, rec += rb) {
    const uint8_t* pat = rec + sparse24_patterns(t);
    uint8_t q[64];
    std::memset(q, i8 ? 0 : 8, sizeof q);
    for (int g = 0; g < 16; ++g) {
      const int* pr = kSparse24Pairs[sparse24_code(pat, i, g)];
      for (int k = 0; k < 2; ++k) {
        const int v = 2 * g + k;
        if (i8) {  // value v: unit v / 4, byte v % 4
          q[4 * g + pr[k]] = rec[64 * (v / 4) + 4 * i + v % 4];
        } else {   // value v: byte v % 16 (unit v % 16 / 4), nibble v / 16
          const uint8_t c = rec[32 + 64 * ((v % 16) / 4) + 4 * i + v % 4];
          q[4 * g + pr[k]] = (uint8_t)(v < 16 ? c & 15 : c >> 4);
        }
      }
    }
    if (i8) {
      std::memcpy(out + 64 * b, q, 64);
      continue;
    }
    for (int h = 0; h < 2; ++h) {
      uint8_t* blk = out + (size_t)(2 * b + h) * 18;
      std::memcpy(blk, rec + 2 * i, 2);
      for (int j = 0; j < 16; ++j) blk[2 + j] = (uint8_t)(q[32 * h + j] | q[32 * h + 16 + j] << 4);
    }
  }
}

// ---- I8_BITMASK: unstructured-sparse int8 with row pointers ----
// For weights with many zeros in no pattern (pruned 50 % and more). A 2-D [rows, cols] tensor,
// cols % 64 == 0, nb = cols / 64 blocks per row:
//   [0, 8 (rows + 1))   u64 row_start[rows + 1] (little-endian): each row's byte offset in the row
//                       area; row_start[0] = 0, non-decreasing, row_start[rows] = the area's bytes
//   f32 scale[rows]     x = scale[row] * q; unstored columns are 0 (before the rows: 4-byte aligned)
//   row area            each row: u64 mask[nb] (bit j of mask b: column 64b + j is stored), then its
//                       stored values in column order as int8 (popcount of its masks, together)
// A row range is read alone through its row pointers; rows follow each other, one stream.
constexpr size_t kBitmaskPointer = 8;

// The tensor's bytes if `data` [nbytes] holds a valid I8_BITMASK [rows, cols], else -1, with *why.
// Reads every row pointer and mask once (bounds-checked): what the reader runs at load.
inline int64_t bitmask_check(const uint8_t* data, uint64_t nbytes, int64_t rows, int64_t cols, std::string* why) {
  auto fail = [&](std::string m) {
    if (why) *why = std::move(m);
    return (int64_t)-1;
  };
  if (rows < 1 || cols < 64 || cols % 64) return fail("needs at least one row and cols a multiple of 64");
  // a row takes at least 8 + 4 bytes (pointer, scale): bounds rows before any product is formed
  if ((uint64_t)rows > nbytes / 12) return fail("too small for its row pointers and scales");
  const uint64_t nb = (uint64_t)cols / 64;
  const uint64_t table = kBitmaskPointer * ((uint64_t)rows + 1), scales = 4 * (uint64_t)rows;
  if (nbytes < table + scales) return fail("too small for its row pointers and scales");
  const uint64_t area = nbytes - table - scales;
  uint64_t prev = 0;
  for (int64_t r = 0; r <= rows; ++r) {
    uint64_t at;
    std::memcpy(&at, data + kBitmaskPointer * (uint64_t)r, 8);
    if ((r == 0 && at != 0) || at < prev || at > area || (r == rows && at != area))
      return fail("row pointer " + std::to_string(r) + " (" + std::to_string(at) + ") out of order or out of range");
    if (r > 0) {  // row r - 1: its masks, then exactly their popcount of values
      const uint64_t len = at - prev;
      if (len < 8 * nb) return fail("row " + std::to_string(r - 1) + " is shorter than its masks");
      const uint8_t* row = data + table + scales + prev;
      uint64_t stored = 0;
      for (uint64_t b = 0; b < nb; ++b) {
        uint64_t m;
        std::memcpy(&m, row + 8 * b, 8);
        stored += (uint64_t)__builtin_popcountll(m);
      }
      if (len != 8 * nb + stored)
        return fail("row " + std::to_string(r - 1) + " holds " + std::to_string(len - 8 * nb) + " value bytes, its masks say " +
                    std::to_string(stored));
    }
    prev = at;
  }
  return (int64_t)nbytes;
}
// Row n's start (its masks) in a checked I8_BITMASK tensor, and the tensor's row scales.
inline const uint8_t* bitmask_row(const uint8_t* data, int64_t rows, int64_t n) {
  uint64_t at;
  std::memcpy(&at, data + kBitmaskPointer * (uint64_t)n, 8);
  return data + (kBitmaskPointer + 4) * (uint64_t)rows + kBitmaskPointer + at;
}
inline const float* bitmask_scales(const uint8_t* data, int64_t rows) {
  return reinterpret_cast<const float*>(data + kBitmaskPointer * ((uint64_t)rows + 1));
}
// Row n as dense I8 codes (cols bytes, the unstored columns 0).
inline void bitmask_gather_row(const uint8_t* data, int64_t rows, int64_t cols, int64_t n, uint8_t* out) {
  const uint8_t* row = bitmask_row(data, rows, n);
  const int64_t nb = cols / 64;
  const uint8_t* v = row + 8 * nb;
  std::memset(out, 0, (size_t)cols);
  for (int64_t b = 0; b < nb; ++b) {
    uint64_t m;
    std::memcpy(&m, row + 8 * b, 8);
    for (; m; m &= m - 1) out[64 * b + __builtin_ctzll(m)] = *v++;  // the set bits, lowest first
  }
}

// ---- Every sparse type (2:4 and bitmask) the same way: what their rows expand into ----
inline bool is_sparse(DType t) { return is_sparse24(t) || t == DType::I8_BITMASK; }
// The dense row-major type a sparse type's rows expand into: Q4_0, or I8 (the row scales stay the tensor's).
inline DType sparse_dense(DType t) { return t == DType::Q4_0_24_X16 ? DType::Q4_0 : DType::I8; }
// Row n of a sparse [rows, cols] matrix as dense row-major bytes of sparse_dense(t).
inline void sparse_gather_row(DType t, const uint8_t* data, int64_t rows, int64_t cols, int64_t n, uint8_t* out) {
  if (t == DType::I8_BITMASK) bitmask_gather_row(data, rows, cols, n, out);
  else sparse24_gather_row(t, data, cols, n, out);
}

}  // namespace plm
