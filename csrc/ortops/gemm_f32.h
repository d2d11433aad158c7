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

}  // namespace rag_engine::gemm_f32
