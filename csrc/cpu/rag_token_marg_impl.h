// rag_token_marg kernels written once over a SIMD traits type S (simd_math.h)
// and compiled per ISA by rag_token_marg_{scalar,avx2,avx512}.cpp.
#pragma once

#include <cstdint>
#include <limits>

#include "rag_token_marg.h"
#include "simd_math.h"

namespace rag_engine {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

template <class S>
float max_of(const float* x, int64_t n) {
  using V = typename S::V;
  constexpr int W = S::W;
  V m0 = S::set1(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = S::max(m0, S::load(x + j));
    m1 = S::max(m1, S::load(x + j + W));
    m2 = S::max(m2, S::load(x + j + 2 * W));
    m3 = S::max(m3, S::load(x + j + 3 * W));
  }
  for (; j + W <= n; j += W) m0 = S::max(m0, S::load(x + j));
  if (j < n) m1 = S::max(m1, S::load_n_or(x + j, n - j, -kInf));
  return S::hmax(S::max(S::max(m0, m1), S::max(m2, m3)));
}

// Max pass, then Σ exp pass over the same (L1-resident) chunk. NaN or +Inf
// anywhere makes the sum NaN, which is how the driver detects them.
template <class S>
void lse_chunk(const float* x, int64_t n, float it, float* m_out, float* s_out) {
  using V = typename S::V;
  constexpr int W = S::W;
  const float mx = max_of<S>(x, n) * it;
  *m_out = mx;
  if (mx == -kInf) {  // every entry -inf: contributes nothing (and avoids -inf - -inf)
    *s_out = 0.0f;
    return;
  }
  const V itv = S::set1(it), neg = S::set1(-mx);
  V s0 = S::zero(), s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    s0 = S::add(s0, S::exp(S::fma(S::load(x + j), itv, neg)));
    s1 = S::add(s1, S::exp(S::fma(S::load(x + j + W), itv, neg)));
    s2 = S::add(s2, S::exp(S::fma(S::load(x + j + 2 * W), itv, neg)));
    s3 = S::add(s3, S::exp(S::fma(S::load(x + j + 3 * W), itv, neg)));
  }
  for (; j + W <= n; j += W) s0 = S::add(s0, S::exp(S::fma(S::load(x + j), itv, neg)));
  if (j < n) s1 = S::add(s1, S::exp(S::fma(S::load_n_or(x + j, n - j, -kInf), itv, neg)));
  *s_out = S::hsum(S::add(S::add(s0, s1), S::add(s2, s3)));
}

// Per token: y_i = x_i * it + c_i, out = m + log Σ_i exp(y_i - m) with m = max_i y_i
// (floored at -FLT_MAX so a token that is -inf everywhere gives -inf, not NaN).
template <class S>
void combine(const float* x, int64_t stride, const float* c, int64_t k, int64_t n, float it,
             float* out) {
  using V = typename S::V;
  constexpr int W = S::W;
  const V itv = S::set1(it), lowest = S::set1(-std::numeric_limits<float>::max());
  const V zero = S::zero(), ninf = S::set1(-kInf);
  for (int64_t j = 0; j < n; j += W) {
    const int64_t cnt = n - j;
    const bool full = cnt >= W;
    V m = lowest;
    for (int64_t i = 0; i < k; ++i) {
      const float* p = x + i * stride + j;
      m = S::max(m, S::fma(full ? S::load(p) : S::load_n(p, cnt), itv, S::set1(c[i])));
    }
    V s = zero;
    for (int64_t i = 0; i < k; ++i) {
      const float* p = x + i * stride + j;
      const V y = S::fma(full ? S::load(p) : S::load_n(p, cnt), itv, S::set1(c[i]));
      s = S::add(s, S::exp(S::sub(y, m)));
    }
    const V r = S::gt_select(s, zero, S::add(m, S::log(s)), ninf);
    if (full) S::store(out + j, r);
    else S::store_n(out + j, r, cnt);
  }
}

template <class S>
double exp_shift(const float* z, int64_t n, float shift, float* w) {
  using V = typename S::V;
  constexpr int W = S::W;
  constexpr int64_t kBlock = 1024;  // float partial sums per block, double across blocks
  const V sh = S::set1(shift);
  double total = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = b0 + kBlock < n ? b0 + kBlock : n;
    V acc = S::zero();
    for (int64_t j = b0; j < b1; j += W) {
      const int64_t cnt = b1 - j;
      if (cnt >= W) {
        const V e = S::exp(S::sub(S::load(z + j), sh));
        S::store(w + j, e);
        acc = S::add(acc, e);
      } else {
        const V e = S::exp(S::sub(S::load_n_or(z + j, cnt, -kInf), sh));
        S::store_n(w + j, e, cnt);
        acc = S::add(acc, e);
      }
    }
    total += static_cast<double>(S::hsum(acc));
  }
  return total;
}

template <class S>
MargKernels make_marg_kernels() {
  return MargKernels{&lse_chunk<S>, &combine<S>, &exp_shift<S>, &max_of<S>};
}

}  // namespace
}  // namespace rag_engine
