// Block-quantised int8 weight GEMM for ONNX Runtime's CPU decode path.
//
// y[M, N] = x[M, K] @ W[K, N] with W stored as signed 8-bit values q in blocks of `block`
// consecutive k (one fp32 scale per (column, block), as ONNX Runtime's MatMulNBits with
// bits=8: W[k, n] = q[k, n] * scale[n, k / block]). x is quantised per (row, block) to int8
// with scale absmax/127 (round to nearest even), as MatMulNBits' accuracy_level 4 does, and
// each block's dot product is exact in int32:
//   y[m, n] = sum_b xs[m, b] * ws[n, b] * sum_{k in b} xq[m, k] q[k, n].
//
// Weight layout (written by rag_engine/generator/quant.py pack_int8_vnni): the MatMulNBits
// bytes (q + 128, uint8) with columns in groups of 16, N padded with zero columns to a
// multiple of 16 and K with zero rows to a multiple of `block`:
//   q      uint8 [groups, blocks, block / 4, 16, 4]   (4 consecutive k of 16 columns: one
//                                                      512-bit VNNI operand)
//   scales fp32  [groups, blocks, 16]
// VPDPBUSD multiplies these unsigned bytes by the signed activation bytes, which sums
// (q + 128) * xq; the 128 * sum(xq) it adds is taken back per (row, block), so the weights
// need no per-column correction term. A block of x holding NaN or +-Inf gets the scale NaN,
// so every output of that row is NaN (never a finite value from garbage).
#pragma once

#include <cstdint>

namespace rag_engine::qgemm {

struct Weights {
  const uint8_t* q;
  const float* scales;
  int64_t k, n, groups, blocks, block;
  int bits;  // 8, or 4 (see below)
};

// 4-bit weights (MatMulInt4Block): MatMulNBits' values q in [0, 15] (weight = (q - 8) * scale),
// two per byte, block / 8 runs of 64 bytes per (group, block): byte j of column c's dword
// holds k = 8r + j in its low nibble and k = 8r + 4 + j in its high nibble, so masking and a
// shift give the two VPDPBUSD operands for k 8r..8r+3 and 8r+4..8r+7.
//   q uint8 [groups, blocks, block / 8, 16, 4]
inline int zero_point(int bits) { return bits == 8 ? 128 : 8; }

// Activation blocks whose absmax is below this are quantised as zero blocks: 127 / absmax
// overflows below 127 / FLT_MAX = 3.7e-37 (this leaves a factor 2.7 of margin), and such a
// block contributes less than 1e-36 per unit weight.
constexpr float kSmallestAbsmax = 1e-36f;
inline int64_t block_bytes(const Weights& w) { return w.block * 16 * w.bits / 8; }  // per (group, block)

// Activations quantised for one call: xq [m, blocks * block] int8 (zero past k), xs and
// xsum (the block's sum of xq) [m, blocks].
struct Activations {
  int8_t* xq;
  float* xs;
  int32_t* xsum;
  int64_t m;
};

// Quantises rows [m0, m1) of x [m, k] into a. Same values on every path.
void quantize_rows_scalar(const float* x, int64_t m0, int64_t m1, const Weights& w, const Activations& a);
void quantize_rows_avx512(const float* x, int64_t m0, int64_t m1, const Weights& w, const Activations& a);

// y[:, 16 * g0 : 16 * g1] for column groups [g0, g1), every row (y is [m, n], row-major;
// columns past n are not written).
void gemm_groups_scalar(const Weights& w, const Activations& a, int64_t g0, int64_t g1, float* y);
void gemm_groups_avx512(const Weights& w, const Activations& a, int64_t g0, int64_t g1, float* y);

}  // namespace rag_engine::qgemm
