// Register-blocked scoring micro-kernels, written once over a SIMD traits type
// and compiled per ISA (score_tile_{scalar,avx2,avx512}.cpp include this file
// with their own -m flags and traits). Only a header of templates: nothing here
// may be used outside those translation units.
#pragma once

#include <cstdint>
#include <cstring>

#include "topk_ip.h"

namespace rag_engine {
namespace {

struct Bf16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// Loads the last `n` (< S::W) elements of a row into a zero-padded vector.
template <class S, class T>
inline typename S::V load_tail(const T* p, int64_t n) {
  T tmp[S::W];
  std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
  std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
  return S::load(tmp);
}

// acc[i][j] = <rows[i], q[j]> for an R-row x QB-query block. R*QB accumulators
// stay in registers; each row chunk is loaded once and used QB times.
template <class S, class T, int R, int QB>
inline void micro(const float* q, int64_t d, const T* rows, float* out, int64_t ldo) {
  using V = typename S::V;
  V acc[R][QB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < QB; ++j) acc[i][j] = S::zero();
  int64_t k = 0;
  for (; k + S::W <= d; k += S::W) {
    V r[R];
    for (int i = 0; i < R; ++i) r[i] = S::load(rows + i * d + k);
    for (int j = 0; j < QB; ++j) {
      const V qv = S::load(q + j * d + k);
      for (int i = 0; i < R; ++i) acc[i][j] = S::fma(r[i], qv, acc[i][j]);
    }
  }
  if (k < d) {
    const int64_t rest = d - k;
    V r[R];
    for (int i = 0; i < R; ++i) r[i] = load_tail<S>(rows + i * d + k, rest);
    for (int j = 0; j < QB; ++j) {
      const V qv = load_tail<S>(q + j * d + k, rest);
      for (int i = 0; i < R; ++i) acc[i][j] = S::fma(r[i], qv, acc[i][j]);
    }
  }
  for (int j = 0; j < QB; ++j)
    for (int i = 0; i < R; ++i) out[j * ldo + i] = S::hsum(acc[i][j]);
}

// All rows of a tile against a block of QB queries: R rows at a time, then
// the leftover rows one by one.
template <class S, class T, int R, int QB>
inline void rows_block(const float* q, int64_t d, const T* rows, int64_t nrows, float* out,
                       int64_t ldo) {
  int64_t r = 0;
  for (; r + R <= nrows; r += R) micro<S, T, R, QB>(q, d, rows + r * d, out + r, ldo);
  for (; r < nrows; ++r) micro<S, T, 1, QB>(q, d, rows + r * d, out + r, ldo);
}

// Widest query block: R x QB accumulators plus R row registers and one query
// register must fit the register file (32 zmm / 16 ymm).
template <class S, class T>
void score_tile_typed(const float* q, int64_t nq, int64_t d, const T* rows, int64_t nrows,
                      float* out, int64_t ldo) {
  constexpr int kMaxQB = S::kMaxQB;
  if (nq == 1) {
    // Memory-bound case: many rows in flight hide the FMA latency.
    rows_block<S, T, S::kRowsQ1, 1>(q, d, rows, nrows, out, ldo);
    return;
  }
  // Split queries into balanced blocks of at most kMaxQB.
  const int64_t nblocks = (nq + kMaxQB - 1) / kMaxQB;
  int64_t q0 = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t qb = (nq - q0) / (nblocks - b);
    const float* qp = q + q0 * d;
    float* op = out + q0 * ldo;
    switch (qb) {
      case 1: rows_block<S, T, S::kRows, 1>(qp, d, rows, nrows, op, ldo); break;
      case 2: rows_block<S, T, S::kRows, 2>(qp, d, rows, nrows, op, ldo); break;
      case 3: rows_block<S, T, S::kRows, 3>(qp, d, rows, nrows, op, ldo); break;
      case 4: rows_block<S, T, S::kRows, 4>(qp, d, rows, nrows, op, ldo); break;
      case 5: rows_block<S, T, S::kRows, 5>(qp, d, rows, nrows, op, ldo); break;
      default: rows_block<S, T, S::kRows, kMaxQB>(qp, d, rows, nrows, op, ldo); break;
    }
    q0 += qb;
  }
}

template <class S>
void score_tile(const float* q, int64_t nq, int64_t d, const void* rows, DType dtype,
                int64_t nrows, float* out, int64_t ldo) {
  switch (dtype) {
    case DType::kF32:
      score_tile_typed<S>(q, nq, d, static_cast<const float*>(rows), nrows, out, ldo);
      break;
    case DType::kBF16:
      score_tile_typed<S>(q, nq, d, static_cast<const Bf16*>(rows), nrows, out, ldo);
      break;
    case DType::kF16:
      score_tile_typed<S>(q, nq, d, static_cast<const F16*>(rows), nrows, out, ldo);
      break;
    case DType::kI8:
      score_tile_typed<S>(q, nq, d, static_cast<const int8_t*>(rows), nrows, out, ldo);
      break;
  }
}

}  // namespace
}  // namespace rag_engine
