// Sampling from the RAG-Token marginal: temperature -> top_k -> top_p -> min_p
// -> inverse CDF, the order and rules of rag_engine.generator's Sampler, with
// weights w_t = exp(z_t - z_max) (p_t = w_t / Σw) so nothing is normalised twice.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "rag_token_marg.h"

namespace rag_engine {
namespace {

int64_t first_max(const float* x, int64_t n, float mx) {
  for (int64_t t = 0; t < n; ++t)
    if (x[t] == mx) return t;
  return 0;
}

// The k-th largest of x (duplicates counted): a min-heap of the k best so far;
// almost every value loses to the heap's root, so this is one compare per value.
float kth_largest(const float* x, int64_t n, int64_t k) {
  std::vector<float> heap(x, x + k);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t t = k; t < n; ++t)
    if (x[t] > heap.front()) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = x[t];
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
    }
  return heap.front();
}

// top_p on the kept weights: keep tokens (z descending, ties by lower id)
// while the mass before them is below top_p * Σw. Only tokens with w >= tau are
// sorted; tau shrinks until those alone reach the nucleus mass (then no token
// outside them can be in the nucleus), so a peaked row sorts a handful.
void top_p_filter(const float* z, float* w, int64_t n, double top_p, std::vector<int64_t>& cand) {
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) total += w[t];
  const double target = top_p * total;
  for (float tau = 1e-3f;; tau = tau > 1e-30f ? tau * 1e-6f : 0.0f) {
    cand.clear();
    double mass = 0.0;
    for (int64_t t = 0; t < n; ++t)
      if (w[t] > 0.0f && w[t] >= tau) {
        cand.push_back(t);
        mass += w[t];
      }
    if (mass >= target || tau == 0.0f) break;
  }
  std::sort(cand.begin(), cand.end(), [z](int64_t x, int64_t y) { return z[x] > z[y] || (z[x] == z[y] && x < y); });
  std::vector<char> keep(static_cast<size_t>(n), 0);
  double before = 0.0;
  for (int64_t t : cand) {
    if (before >= target) break;
    keep[static_cast<size_t>(t)] = 1;
    before += w[t];
  }
  for (int64_t t = 0; t < n; ++t)
    if (!keep[static_cast<size_t>(t)]) w[t] = 0.0f;
}

int64_t sample_row(const float* lp, int64_t n, const RagTokenSampleArgs& p, double u,
                   const MargKernels& kern, std::vector<float>& z, std::vector<float>& w,
                   std::vector<int64_t>& cand) {
  if (p.temperature == 0.0f) return first_max(lp, n, kern.max(lp, n));
  for (int64_t t = 0; t < n; ++t) z[t] = lp[t] / p.temperature;
  const float zmax = kern.max(z.data(), n);
  kern.exp_shift(z.data(), n, zmax, w.data());
  if (p.top_k > 0 && p.top_k < n) {
    const float kth = kth_largest(z.data(), n, p.top_k);
    for (int64_t t = 0; t < n; ++t)
      if (z[t] < kth) w[t] = 0.0f;
  }
  if (p.top_p < 1.0) top_p_filter(z.data(), w.data(), n, p.top_p, cand);
  if (p.min_p > 0.0)  // p_t < min_p * p_max  <=>  w_t < min_p (the max has w = 1)
    for (int64_t t = 0; t < n; ++t)
      if (w[t] < p.min_p) w[t] = 0.0f;
  double total = 0.0;
  for (int64_t t = 0; t < n; ++t) total += w[t];
  const double target = u * total;
  double cum = 0.0;
  int64_t last = first_max(z.data(), n, zmax);
  for (int64_t t = 0; t < n; ++t) {
    if (w[t] <= 0.0f) continue;
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
#pragma omp parallel num_threads(static_cast<int>(nt)) if (nt > 1)
  {
    std::vector<float> z(static_cast<size_t>(a.v)), w(static_cast<size_t>(a.v));
    std::vector<int64_t> cand;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.b; ++b) {
      const float* lp = a.out + b * a.v;
      const int64_t tok = sample_row(lp, a.v, s, s.uniforms[b], kern, z, w, cand);
      s.tokens[b] = tok;
      s.logprobs[b] = lp[tok];
    }
  }
  return -1;
}

}  // namespace rag_engine
