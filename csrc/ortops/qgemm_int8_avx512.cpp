// AVX-512 VNNI path of the int8 block GEMM: one VPDPBUSD multiplies 4 consecutive k of
// 16 columns by one row's 4 activation bytes (broadcast), accumulating exact int32 sums;
// each block's sums are scaled into fp32 accumulators once per block.
//
// Register tiles: MR rows x NG groups of 16 columns (MR * NG int32 accumulators and as
// many fp32 ones). Batch-1 decode (M = 1) streams the weights from memory once, with
// NG = 2 independent VPDPBUSD chains; at M >= 8 each weight vector loaded feeds 8 rows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "qgemm_int8.h"

namespace rag_engine::qgemm {

void quantize_rows_avx512(const float* x, int64_t m0, int64_t m1, const Weights& w, uint8_t* xq, float* xs) {
  const int64_t stride = w.blocks * w.block;
  if (w.block % 16 != 0) return quantize_rows_scalar(x, m0, m1, w, xq, xs);
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * w.k;
    for (int64_t b = 0; b < w.blocks; ++b) {
      const int64_t k0 = b * w.block;
      __m512 amax = _mm512_setzero_ps();
      __mmask16 bad = 0;  // NaN or +-Inf
      for (int64_t k = k0; k < k0 + w.block; k += 16) {
        const __mmask16 live = k + 16 <= w.k ? 0xFFFF : k >= w.k ? 0 : static_cast<__mmask16>((1u << (w.k - k)) - 1);
        const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(live, row + k));
        bad |= _mm512_cmp_ps_mask(v, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
        amax = _mm512_max_ps(amax, v);
      }
      const float top = bad ? 0.f : _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(top > 0.f ? 127.f / top : 0.f);
      xs[m * w.blocks + b] = bad ? std::numeric_limits<float>::quiet_NaN() : top / 127.f;
      for (int64_t k = k0; k < k0 + w.block; k += 16) {
        const __mmask16 live = k + 16 <= w.k ? 0xFFFF : k >= w.k ? 0 : static_cast<__mmask16>((1u << (w.k - k)) - 1);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(live, row + k), inv));
        q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * stride + k), _mm512_cvtusepi32_epi8(q));
      }
    }
  }
}

namespace {

template <int MR, int NG>
inline void tile(const Weights& w, const Activations& a, int64_t m0, int64_t g0, float* y) {
  const int64_t stride = w.blocks * w.block;
  const int64_t steps = w.block / 4;
  __m512 facc[MR][NG];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NG; ++j) facc[i][j] = _mm512_setzero_ps();
  const uint8_t* xrow = a.xq + m0 * stride;
  for (int64_t b = 0; b < w.blocks; ++b) {
    __m512i acc[MR][NG];
    const int8_t* q[NG];
    for (int j = 0; j < NG; ++j) {
      const int64_t gb = (g0 + j) * w.blocks + b;
      q[j] = w.q + gb * w.block * 16;
      const __m512i bias = _mm512_loadu_si512(w.bias + gb * 16);
      for (int i = 0; i < MR; ++i) acc[i][j] = bias;
    }
    const uint8_t* xb = xrow + b * w.block;
#pragma GCC unroll 8
    for (int64_t s = 0; s < steps; ++s) {
      for (int j = 0; j < NG; ++j) {
        const __m512i wv = _mm512_loadu_si512(q[j] + s * 64);
        for (int i = 0; i < MR; ++i) {
          int32_t x4;
          std::memcpy(&x4, xb + i * stride + s * 4, 4);
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], _mm512_set1_epi32(x4), wv);
        }
      }
    }
    for (int j = 0; j < NG; ++j) {
      const __m512 ws = _mm512_loadu_ps(w.scales + ((g0 + j) * w.blocks + b) * 16);
      for (int i = 0; i < MR; ++i) {
        const __m512 scale = _mm512_mul_ps(ws, _mm512_set1_ps(a.xs[(m0 + i) * w.blocks + b]));
        facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), scale, facc[i][j]);
      }
    }
  }
  for (int j = 0; j < NG; ++j) {
    const int64_t col = (g0 + j) * 16;
    const __mmask16 live = col + 16 <= w.n ? 0xFFFF : static_cast<__mmask16>((1u << (w.n - col)) - 1);
    for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + (m0 + i) * w.n + col, live, facc[i][j]);
  }
}

// Rows [m0, m0 + rows) (rows < 8) over groups [g0, g1).
template <int MR>
inline void rows_tile(const Weights& w, const Activations& a, int64_t m0, int64_t g0, int64_t g1, float* y) {
  constexpr int NG = MR == 1 ? 2 : 1;
  int64_t g = g0;
  for (; g + NG <= g1; g += NG) tile<MR, NG>(w, a, m0, g, y);
  for (; g < g1; ++g) tile<MR, 1>(w, a, m0, g, y);
}

}  // namespace

void gemm_groups_avx512(const Weights& w, const Activations& a, int64_t g0, int64_t g1, float* y) {
  if (w.block % 4 != 0) return gemm_groups_scalar(w, a, g0, g1, y);
  int64_t m0 = 0;
  for (; m0 + 8 <= a.m; m0 += 8) rows_tile<8>(w, a, m0, g0, g1, y);
  switch (a.m - m0) {
    case 1: rows_tile<1>(w, a, m0, g0, g1, y); break;
    case 2: rows_tile<2>(w, a, m0, g0, g1, y); break;
    case 3: rows_tile<3>(w, a, m0, g0, g1, y); break;
    case 4: rows_tile<4>(w, a, m0, g0, g1, y); break;
    case 5: rows_tile<5>(w, a, m0, g0, g1, y); break;
    case 6: rows_tile<6>(w, a, m0, g0, g1, y); break;
    case 7: rows_tile<7>(w, a, m0, g0, g1, y); break;
    default: break;
  }
}

}  // namespace rag_engine::qgemm
