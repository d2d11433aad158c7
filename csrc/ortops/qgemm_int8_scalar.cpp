// Portable path of the int8 block GEMM (any x86-64 or other CPU): same integer sums and
// the same fp32 operations per block as the AVX-512 path, so the same results.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "qgemm_int8.h"

namespace rag_engine::qgemm {

void quantize_rows_scalar(const float* x, int64_t m0, int64_t m1, const Weights& w, const Activations& a) {
  const int64_t stride = w.blocks * w.block;
  for (int64_t m = m0; m < m1; ++m) {
    const float* row = x + m * w.k;
    for (int64_t b = 0; b < w.blocks; ++b) {
      const int64_t k0 = b * w.block, k1 = std::min(w.k, k0 + w.block);
      float amax = 0.f;
      bool bad = false;  // NaN or +-Inf: the block's outputs become NaN
      for (int64_t k = k0; k < k1; ++k) {
        bad |= !std::isfinite(row[k]);
        amax = std::max(amax, std::fabs(row[k]));
      }
      if (bad || !(amax >= kSmallestAbsmax)) amax = 0.f;  // 127 / amax would overflow: a zero block
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      a.xs[m * w.blocks + b] = bad ? std::numeric_limits<float>::quiet_NaN() : amax / 127.f;
      int8_t* out = a.xq + m * stride + k0;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int32_t q = bad ? 0 : static_cast<int32_t>(std::nearbyint(row[k] * inv));  // |q| <= 127
        out[k - k0] = static_cast<int8_t>(q);
        sum += q;
      }
      for (int64_t k = k1; k < k0 + w.block; ++k) out[k - k0] = 0;  // zero padding
      a.xsum[m * w.blocks + b] = sum;
    }
  }
}

void gemm_groups_scalar(const Weights& w, const Activations& a, int64_t g0, int64_t g1, float* y) {
  const int64_t stride = w.blocks * w.block;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t cols = std::min<int64_t>(16, w.n - g * 16);
    for (int64_t m = 0; m < a.m; ++m) {
      float acc[16] = {};
      for (int64_t b = 0; b < w.blocks; ++b) {
        const int64_t gb = g * w.blocks + b;
        const uint8_t* q = w.q + gb * block_bytes(w);
        const int8_t* xq = a.xq + m * stride + b * w.block;
        const float xs = a.xs[m * w.blocks + b];
        for (int64_t c = 0; c < 16; ++c) {
          int32_t dot = -zero_point(w.bits) * a.xsum[m * w.blocks + b];
          for (int64_t k = 0; k < w.block; ++k) {
            int32_t v;
            if (w.bits == 8) {
              v = q[(k / 4) * 64 + c * 4 + k % 4];
            } else {
              const uint8_t byte = q[(k / 8) * 64 + c * 4 + k % 4];
              v = k % 8 < 4 ? byte & 0x0F : byte >> 4;
            }
            dot += v * int32_t{xq[k]};
          }
          // fmadd(float(dot), ws * xs, acc) as the vector path computes it
          acc[c] = std::fma(static_cast<float>(dot), w.scales[gb * 16 + c] * xs, acc[c]);
        }
      }
      std::memcpy(y + m * w.n + g * 16, acc, sizeof(float) * cols);
    }
  }
}

}  // namespace rag_engine::qgemm
