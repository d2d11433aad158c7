// rag_token_marg kernels written once over a SIMD traits type S (simd_math.h)
// and compiled per ISA by rag_token_marg_{scalar,avx2,avx512}.cpp.
#pragma once

#include <cmath>
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

// e[t] = exp(x_t * it - shift) for the chunk, returning Σ e[t] (and, through *mx,
// max_t x_t * it when `track`). NaN anywhere makes the sum NaN.
template <class S, bool kTrack>
float exp_pass(const float* x, int64_t n, float it, float shift, float* e, const float* next, float* mx) {
  using V = typename S::V;
  constexpr int W = S::W;
  const V itv = S::set1(it), neg = S::set1(-shift);
  V s0 = S::zero(), s1 = s0, m0 = S::set1(-kInf), m1 = m0;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    if (next != nullptr) {  // the next chunk comes into L2 while this one is exp-bound
      __builtin_prefetch(next + j, 0, 2);
      if (2 * W * sizeof(float) > 64) __builtin_prefetch(next + j + W, 0, 2);
    }
    const V x0 = S::load(x + j), x1 = S::load(x + j + W);
    if (kTrack) {
      m0 = S::max(m0, x0);
      m1 = S::max(m1, x1);
    }
    const V e0 = S::exp_nonpos(S::fma(x0, itv, neg));
    const V e1 = S::exp_nonpos(S::fma(x1, itv, neg));
    S::store(e + j, e0);
    S::store(e + j + W, e1);
    s0 = S::add(s0, e0);
    s1 = S::add(s1, e1);
  }
  for (; j < n; j += W) {
    const int64_t cnt = n - j < W ? n - j : W;
    const V x0 = S::load_n_or(x + j, cnt, -kInf);
    if (kTrack) m0 = S::max(m0, x0);
    const V e0 = S::exp_nonpos(S::fma(x0, itv, neg));
    S::store_n(e + j, e0, cnt);
    s0 = S::add(s0, e0);
  }
  if (kTrack) *mx = S::hmax(S::max(m0, m1)) * it;
  return S::hsum(S::add(s0, s1));
}

// The chunk's (shift, Σ exp(x_t * it - shift)), keeping each e_t = exp(x_t * it - shift)
// in `e` (0 where x_t = -inf) so that the combination pass needs no exp of its own.
// One pass: the shift is the first vector's max, and the pass also finds the chunk's
// max; only where that lies more than 64 above the shift (the sum could overflow) is
// the chunk redone with its max as the shift. NaN or +Inf anywhere makes the sum NaN
// (or +Inf), which is how the driver detects them. `next` (or null): the chunk read
// after this one, prefetched meanwhile.
template <class S>
void lse_chunk(const float* x, int64_t n, float it, float* m_out, float* s_out, float* e,
               const float* next) {
  constexpr int W = S::W;
  constexpr float kHeadroom = 64.0f;  // 4096 terms of up to e^64 stay far below FLT_MAX
  float shift = S::hmax(S::load_n_or(x, n < W ? n : W, -kInf)) * it, mx = kInf;
  if (shift > -kInf && shift < kInf) {
    const float sum = exp_pass<S, true>(x, n, it, shift, e, next, &mx);
    if (mx - shift <= kHeadroom) {
      *m_out = shift;
      *s_out = sum;
      return;
    }
  }
  shift = mx == kInf ? max_of<S>(x, n) * it : mx;  // a NaN head: the max pass decides
  *m_out = shift;
  if (shift == -kInf) {  // every entry -inf: contributes nothing (and avoids -inf - -inf)
    for (int64_t j = 0; j < n; ++j) e[j] = 0.0f;
    *s_out = 0.0f;
    return;
  }
  *s_out = exp_pass<S, false>(x, n, it, shift, e, nullptr, nullptr);
}

// Per token: y_i = (x_i * it - c[k + i]) + c[i] (the fma rounds the small difference once,
// so large logits do not cancel against a large offset), out = m + log Σ_i exp(y_i - m) with
// m = max_i y_i (floored at -FLT_MAX so a token that is -inf everywhere gives -inf, not NaN).
template <class S>
void combine_exact(const float* x, int64_t stride, const float* c, int64_t k, int64_t n, float it,
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
      const V y = S::add(S::fma(full ? S::load(p) : S::load_n(p, cnt), itv, S::set1(-c[k + i])), S::set1(c[i]));
      m = S::max(m, y);
    }
    V s = zero;
    for (int64_t i = 0; i < k; ++i) {
      const float* p = x + i * stride + j;
      const V y = S::add(S::fma(full ? S::load(p) : S::load_n(p, cnt), itv, S::set1(-c[k + i])), S::set1(c[i]));
      s = S::add(s, S::exp(S::sub(y, m)));
    }
    const V r = S::gt_select(s, zero, S::add(m, S::log(s)), ninf);
    if (full) S::store(out + j, r);
    else S::store_n(out + j, r, cnt);
  }
}

// The combination from the kept exponentials: with e_it = exp(x_it * it - m_i) (m_i the
// chunk shift of row i, at most 64 below its max), exp(y_it) = exp(o_i) e_it with
// o_i = c_i + (m_i - mx_i) (mx_i = c[k + i]; the shifts' difference is exact), so
// out[t] = M + log Σ_i w_i e_it with M = max_i o_i and w_i = exp(o_i - M) <= 1: K
// multiply-adds and one log per token instead of K exps. Where that sum is below 2^-90 (a
// token far below every row's shift, whose e_it lost precision or underflowed) the lanes are
// recomputed exactly by the per-token-max formula; when some w_i is subnormal (or 0) it is
// imprecise, and its term (<= w_i e^64) can only be trusted in sums above 2^-30.
template <class S>
void combine(const float* e, int64_t e_stride, const float* x, int64_t stride, const float* c,
             const float* m, int64_t m_stride, int64_t k, int64_t n, float it, float* out) {
  using V = typename S::V;
  constexpr int W = S::W;
  constexpr int kMaxK = 64;
  float w[kMaxK];
  float big = -kInf;
  const auto offset = [&](int64_t i) { return c[i] + (m[i * m_stride] - c[k + i]); };
  for (int64_t i = 0; i < k; ++i)
    if (m[i * m_stride] != -kInf) big = offset(i) > big ? offset(i) : big;
  if (k > kMaxK || big == -kInf) {  // many documents, or no finite term in the chunk
    combine_exact<S>(x, stride, c, k, n, it, out);
    return;
  }
  bool subnormal = false;
  for (int64_t i = 0; i < k; ++i) {
    w[i] = m[i * m_stride] == -kInf ? 0.0f : std::exp(offset(i) - big);
    subnormal = subnormal || (m[i * m_stride] != -kInf && w[i] < std::numeric_limits<float>::min());
  }
  const V bigv = S::set1(big), tiny = S::set1(subnormal ? 0x1p-30f : 0x1p-90f);
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {  // two vectors at a time: two independent log chains
    V a0 = S::zero(), a1 = S::zero();
    for (int64_t i = 0; i < k; ++i) {
      const float* p = e + i * e_stride + j;
      const V wi = S::set1(w[i]);
      a0 = S::fma(wi, S::load(p), a0);
      a1 = S::fma(wi, S::load(p + W), a1);
    }
    if (S::all_gt(a0, tiny) && S::all_gt(a1, tiny)) {
      S::store(out + j, S::add(bigv, S::log(a0)));
      S::store(out + j + W, S::add(bigv, S::log(a1)));
    } else {  // some lane too small for the factored form: exact for these vectors
      combine_exact<S>(x + j, stride, c, k, 2 * W, it, out + j);
    }
  }
  for (; j < n; j += W) {
    const int64_t cnt = n - j < W ? n - j : W;
    V acc = S::zero();
    for (int64_t i = 0; i < k; ++i) {
      const float* p = e + i * e_stride + j;
      acc = S::fma(S::set1(w[i]), cnt == W ? S::load(p) : S::load_n(p, cnt), acc);
    }
    if (cnt == W && S::all_gt(acc, tiny)) {
      S::store(out + j, S::add(bigv, S::log(acc)));
    } else {  // some lane too small for the factored form (or the tail): exact for this vector
      combine_exact<S>(x + j, stride, c, k, cnt, it, out + j);
    }
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
