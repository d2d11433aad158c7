// Sampling from the RAG-Token marginal: temperature -> top_k -> top_p -> min_p
// -> inverse CDF, the order and rules of rag_engine.generator's Sampler, with
// weights w_t = exp(z_t - z_max) (p_t = w_t / Σw) so nothing is normalised twice.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "rag_token_marg.h"

namespace rag_engine {
namespace {

int64_t first_max(const float* x, int64_t n, float mx) {
  for (int64_t t = 0; t < n; ++t)
    if (x[t] == mx) return t;
  return 0;
}

constexpr int64_t kBlock = 256;  // values whose max is taken at once (SIMD) to skip them

// The k-th largest of x (duplicates counted): a min-heap of the k best so far.
// Almost every value loses to the heap's root, so whole blocks whose max does not
// beat it are skipped after one SIMD max.
float kth_largest(const float* x, int64_t n, int64_t k, const MargKernels& kern) {
  std::vector<float> heap(x, x + k);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t b0 = k; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    if (!(kern.max(x + b0, b1 - b0) > heap.front())) continue;
    for (int64_t t = b0; t < b1; ++t)
      if (x[t] > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = x[t];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
  }
  return heap.front();
}

// The ids t (ascending) with x[t] >= lo, skipping blocks whose max is below it.
void ids_at_least(const float* x, int64_t n, float lo, const MargKernels& kern, std::vector<int64_t>& out) {
  out.clear();
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    if (!(kern.max(x + b0, b1 - b0) >= lo)) continue;
    for (int64_t t = b0; t < b1; ++t)
      if (x[t] >= lo) out.push_back(t);
  }
}

// Drop from `live` (ascending ids) the ids whose weight is zero.
void drop_zero(const float* w, std::vector<int64_t>& live) {
  live.erase(std::remove_if(live.begin(), live.end(), [w](int64_t t) { return !(w[t] > 0.0f); }), live.end());
}

// top_p on the kept weights: keep tokens (z descending, ties by lower id)
// while the mass before them is below top_p * Σw. Only tokens with w >= tau are
// sorted; tau shrinks until those alone reach the nucleus mass (then no token
// outside them can be in the nucleus), so a peaked row sorts a handful.
// live: the ids (ascending) with w > 0; the ones dropped get w = 0.
void top_p_filter(const float* z, float* w, double top_p, std::vector<int64_t>& live,
                  std::vector<int64_t>& cand) {
  double total = 0.0;
  for (int64_t t : live) total += w[t];
  const double target = top_p * total;
  for (float tau = 1e-3f;; tau = tau > 1e-30f ? tau * 1e-6f : 0.0f) {
    cand.clear();
    double mass = 0.0;
    for (int64_t t : live)
      if (w[t] >= tau) {
        cand.push_back(t);
        mass += w[t];
      }
    if (mass >= target || tau == 0.0f) break;
  }
  std::sort(cand.begin(), cand.end(), [z](int64_t x, int64_t y) { return z[x] > z[y] || (z[x] == z[y] && x < y); });
  double before = 0.0;
  size_t kept = 0;
  while (kept < cand.size() && before < target) before += w[cand[kept++]];
  std::vector<float> keep_w(kept);
  for (size_t i = 0; i < kept; ++i) keep_w[i] = w[cand[i]];
  for (int64_t t : live) w[t] = 0.0f;
  for (size_t i = 0; i < kept; ++i) w[cand[i]] = keep_w[i];
  drop_zero(w, live);
}

// After top_k the rest of the work runs over the surviving ids only (`live`,
// ascending: sums in id order, as over the whole row with zeros).
int64_t sample_row(const float* lp, int64_t n, const RagTokenSampleArgs& p, double u,
                   const MargKernels& kern, std::vector<float>& z, std::vector<float>& w,
                   std::vector<int64_t>& live, std::vector<int64_t>& cand) {
  // 0: argmax (the binding maps every temperature below 1e-5 to 0, deciding in double)
  if (p.temperature == 0.0f) return first_max(lp, n, kern.max(lp, n));
  for (int64_t t = 0; t < n; ++t) z[t] = lp[t] / p.temperature;
  const float zmax = kern.max(z.data(), n);
  kern.exp_shift(z.data(), n, zmax, w.data());
  const float lo = p.top_k > 0 && p.top_k < n ? kth_largest(z.data(), n, p.top_k, kern)
                                              : -std::numeric_limits<float>::infinity();
  ids_at_least(z.data(), n, lo, kern, live);
  drop_zero(w.data(), live);
  if (p.top_p < 1.0) top_p_filter(z.data(), w.data(), p.top_p, live, cand);
  if (p.min_p > 0.0) {  // p_t < min_p * p_max  <=>  w_t < min_p (the max has w = 1)
    for (int64_t t : live)
      if (w[t] < p.min_p) w[t] = 0.0f;
    drop_zero(w.data(), live);
  }
  double total = 0.0;
  for (int64_t t : live) total += w[t];
  const double target = u * total;
  double cum = 0.0;
  int64_t last = first_max(z.data(), n, zmax);
  for (int64_t t : live) {
    cum += w[t];
    last = t;
    if (cum > target) return t;
  }
  return last;  // only reached through rounding at u close to 1
}

}  // namespace

int64_t rag_token_sample_cpu(const RagTokenMargArgs& a, const RagTokenSampleArgs& s) {
  RagTokenMargArgs marg = a;
  marg.inv_temperature = 1.0f;
  const int64_t bad = rag_token_marg_cpu(marg);
  if (bad >= 0) return bad;
  const MargKernels kern = pick_marg_kernels(a.isa);
  int64_t nt = a.threads > 0 ? a.threads : omp_get_max_threads();
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, a.b));
  parallel_region(nt, [&](int64_t t, int64_t nth) {
    std::vector<float> z(static_cast<size_t>(a.v)), w(static_cast<size_t>(a.v));
    std::vector<int64_t> live, cand;
    for (int64_t b = a.b * t / nth; b < a.b * (t + 1) / nth; ++b) {
      const float* lp = a.out + b * a.v;
      const int64_t tok = sample_row(lp, a.v, s, s.uniforms[b], kern, z, w, live, cand);
      s.tokens[b] = tok;
      s.logprobs[b] = lp[tok];
    }
  });
  return -1;
}

}  // namespace rag_engine
