// Portable path of gemm_f32.h: the same order of accumulation over k per output (one fused
// multiply-add per k), so the same results as the AVX-512 path.
#include <algorithm>
#include <cmath>

#include "gemm_f32.h"

namespace rag_engine::gemm_f32 {

void panels_scalar(const Problem& pr, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = pr.w + p * pr.k * kPanel;
    const int64_t cols = std::min(kPanel, pr.n - p * kPanel);
    for (int64_t m = 0; m < pr.m; ++m) {
      float acc[kPanel] = {};
      const float* x = pr.x + m * pr.k;
      for (int64_t k = 0; k < pr.k; ++k)
        for (int64_t c = 0; c < kPanel; ++c) acc[c] = std::fma(x[k], w[k * kPanel + c], acc[c]);
      std::copy(acc, acc + cols, pr.y + m * pr.n + p * kPanel);
    }
  }
}

void swiglu_scalar(const float* z, int64_t ldz, float* y, int64_t ldy, int64_t m, int64_t p0, int64_t p1) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < 16; ++c) {
        const float g = z[r * ldz + 32 * p + c], u = z[r * ldz + 32 * p + 16 + c];
        y[r * ldy + 16 * p + c] = g / (1.0f + std::exp(-g)) * u;
      }
}

}  // namespace rag_engine::gemm_f32
