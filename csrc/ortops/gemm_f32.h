// fp32 weight GEMM for few rows (decode): y[M, N] = x[M, K] @ W[K, N] with W stored in
// panels of 32 columns, each panel's K rows contiguous:
//   w fp32 [panels = ceil(N / 32), K, 32]   (columns past N are zero)
// (written by rag_engine/generator/quant.py pack_f32_panels). A decode step streams every
// weight once; each 128-byte panel row feeds up to 8 rows of x, and a panel is one
// sequential stream for the hardware prefetcher.
#pragma once

#include <cstdint>

namespace rag_engine::gemm_f32 {

constexpr int64_t kPanel = 32;

struct Problem {
  const float* x;  // [m, k]
  const float* w;  // panels
  float* y;        // [m, n]
  int64_t m, k, n;
};

// Columns of panels [p0, p1), every row.
void panels_scalar(const Problem& pr, int64_t p0, int64_t p1);
void panels_avx512(const Problem& pr, int64_t p0, int64_t p1);

// SwiGLU epilogue shared by the GEMM ops (attribute swiglu=1): z [m, ldz] holds pairs of
// 16-column units (gate, up); y[r, 16 p + c] = silu(z[r, 32 p + c]) * z[r, 32 p + 16 + c]
// for pairs p in [p0, p1), silu(g) = g / (1 + exp(-g)).
void swiglu_scalar(const float* z, int64_t ldz, float* y, int64_t ldy, int64_t m, int64_t p0, int64_t p1);
void swiglu_avx512(const float* z, int64_t ldz, float* y, int64_t ldy, int64_t m, int64_t p0, int64_t p1);

}  // namespace rag_engine::gemm_f32
