// AVX-512 path of gemm_f32.h: MR rows x one 32-column panel (2 vectors) per tile, one
// fused multiply-add per (row, k, vector) in k order; MR = 8 holds 16 accumulators.
#include <immintrin.h>

#include <algorithm>

#include "../cpu/simd_math.h"
#include "gemm_f32.h"

namespace rag_engine::gemm_f32 {

namespace {

template <int MR>
inline void tile(const Problem& pr, int64_t m0, int64_t p) {
  const float* w = pr.w + p * pr.k * kPanel;
  const float* x = pr.x + m0 * pr.k;
  __m512 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int64_t k = 0; k < pr.k; ++k) {
    const __m512 w0 = _mm512_loadu_ps(w + k * kPanel), w1 = _mm512_loadu_ps(w + k * kPanel + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * pr.k + k]);
      acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
    }
  }
  const int64_t col = p * kPanel, cols = std::min(kPanel, pr.n - col);
  const __mmask16 m0mask = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __mmask16 m1mask = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    float* y = pr.y + (m0 + i) * pr.n + col;
    _mm512_mask_storeu_ps(y, m0mask, acc[i][0]);
    _mm512_mask_storeu_ps(y + 16, m1mask, acc[i][1]);
  }
}

}  // namespace

void panels_avx512(const Problem& pr, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    int64_t m0 = 0;
    for (; m0 + 8 <= pr.m; m0 += 8) tile<8>(pr, m0, p);
    switch (pr.m - m0) {
      case 1: tile<1>(pr, m0, p); break;
      case 2: tile<2>(pr, m0, p); break;
      case 3: tile<3>(pr, m0, p); break;
      case 4: tile<4>(pr, m0, p); break;
      case 5: tile<5>(pr, m0, p); break;
      case 6: tile<6>(pr, m0, p); break;
      case 7: tile<7>(pr, m0, p); break;
      default: break;
    }
  }
}

void swiglu_avx512(const float* z, int64_t ldz, float* y, int64_t ldy, int64_t m, int64_t p0, int64_t p1) {
  using S = SimdAvx512;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t p = p0; p < p1; ++p) {
      const __m512 g = _mm512_loadu_ps(z + r * ldz + 32 * p), u = _mm512_loadu_ps(z + r * ldz + 32 * p + 16);
      const __m512 sig = _mm512_div_ps(g, _mm512_add_ps(one, S::exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      _mm512_storeu_ps(y + r * ldy + 16 * p, _mm512_mul_ps(sig, u));
    }
}

}  // namespace rag_engine::gemm_f32
