// Driver of rag_token_marg: (row, chunk) work items split across threads,
// pass 1 and pass 2 of an item on the same thread (its chunk stays in cache).
#include "rag_token_marg.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"

namespace rag_engine {

MargKernels pick_marg_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return marg_kernels_avx512();
    case Isa::kAvx2: return marg_kernels_avx2();
    case Isa::kScalar: break;
  }
  return marg_kernels_scalar();
}

namespace {

constexpr int64_t kChunk = 4096;             // logits per chunk: 16 KiB, fits L1
constexpr int64_t kWorkPerThread = 64 * 1024;  // logits a second thread must get to pay off
constexpr int64_t kGroupLogits = 256 * 1024;   // 1 MiB: pass 2 still finds the group in L2/L3

// From the per-chunk (shift, sum) partials, merged in chunk order (double, so the merge adds
// no error): c[k + i] = mx_i, row i's largest shift, and c[i] = log_alpha[i] - log Σ_t
// exp(x_it / T - mx_i), so that c[i] + (x_it / T - mx_i) is the log term without rounding an
// offset as large as the logits (see combine). Returns -1 or the first document i whose row
// is NaN/+Inf or all -inf.
int64_t doc_offsets(const float* log_alpha, const float* pm, const float* ps, int64_t k,
                    int64_t nchunks, float* c) {
  for (int64_t i = 0; i < k; ++i) {
    const float* m = pm + i * nchunks;
    const float* s = ps + i * nchunks;
    const float mx = *std::max_element(m, m + nchunks);
    if (!std::isfinite(mx)) return i;
    double sum = 0.0;
    for (int64_t ch = 0; ch < nchunks; ++ch)
      if (m[ch] != -std::numeric_limits<float>::infinity())
        sum += static_cast<double>(s[ch]) * std::exp(static_cast<double>(m[ch]) - mx);
    if (!std::isfinite(sum)) return i;
    c[i] = static_cast<float>(static_cast<double>(log_alpha[i]) - std::log(sum));
    c[k + i] = mx;
  }
  return -1;
}

// The calling thread's scratch for pass 1's exponentials (kept between calls: the
// OpenMP workers persist, so steady-state calls allocate nothing).
float* kept_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace

int64_t rag_token_marg_cpu(const RagTokenMargArgs& a) {
  const MargKernels kern = pick_marg_kernels(a.isa);
  const int64_t nchunks = (a.v + kChunk - 1) / kChunk;
  int64_t nt = a.threads > 0 ? a.threads : omp_get_max_threads();
  nt = std::max<int64_t>(1, std::min({nt, a.b * nchunks, a.b * a.k * a.v / kWorkPerThread + 1}));
  // Rows handled between two barriers: enough (row, chunk) items to keep every
  // thread busy, and about kGroupLogits logits so that short rows do not pay a
  // barrier each. Every row is split across the threads (not whole rows per
  // thread): each thread's kept exponentials are then K * V / threads floats,
  // which stay in its L2 for pass 2 (B=8, K=5, V=49152 on 2 threads: 0.26 vs 0.29
  // ms; B=64: 2.7 vs 4.0 ms), at the price of a barrier per group that waits for
  // a thread another process has taken the core of.
  const int64_t group = std::clamp<int64_t>(
      std::max((4 * nt + nchunks - 1) / nchunks, kGroupLogits / (a.k * a.v)), 1, a.b);

  // Per (b, i, chunk): max and Σ exp of the chunk. Laid out [b][i][chunk].
  std::vector<float> pm(static_cast<size_t>(a.b * a.k * nchunks));
  std::vector<float> ps(pm.size());
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};

  parallel_region(nt, [&](int64_t t, int64_t nth) {
    std::vector<float> c(static_cast<size_t>(2 * a.k));
    int64_t first_bad = std::numeric_limits<int64_t>::max();
    for (int64_t g0 = 0; g0 < a.b; g0 += group) {
      const int64_t items = (std::min(a.b, g0 + group) - g0) * nchunks;
      const int64_t it0 = items * t / nth, it1 = items * (t + 1) / nth;
      // kept exponentials of this thread's items: [item][k][kChunk]
      float* kept = kept_scratch(static_cast<size_t>(std::max<int64_t>(it1 - it0, 1) * a.k * kChunk));
      for (int64_t it = it0; it < it1; ++it) {
        const int64_t b = g0 + it / nchunks, ch = it % nchunks;
        const int64_t v0 = ch * kChunk, n = std::min(kChunk, a.v - v0);
        for (int64_t i = 0; i < a.k; ++i) {
          const size_t slot = static_cast<size_t>((b * a.k + i) * nchunks + ch);
          // read next: document i + 1 of this item, else document 0 of the next item (if whole)
          const int64_t nit = i + 1 < a.k ? it : it + 1;
          const int64_t nb = g0 + nit / nchunks, nch = nit % nchunks, ni = i + 1 < a.k ? i + 1 : 0;
          const bool prefetch = nit < it1 && (nch + 1) * kChunk <= a.v;
          kern.lse_chunk(a.logits + (b * a.k + i) * a.v + v0, n, a.inv_temperature, &pm[slot], &ps[slot],
                         kept + ((it - it0) * a.k + i) * kChunk,
                         prefetch ? a.logits + (nb * a.k + ni) * a.v + nch * kChunk : nullptr);
        }
      }
#pragma omp barrier
      int64_t have = -1;  // row whose offsets are in c
      for (int64_t it = it1 - 1; it >= it0; --it) {  // backwards: the latest chunks are in L2
        const int64_t b = g0 + it / nchunks, ch = it % nchunks;
        if (b != have) {
          const size_t base = static_cast<size_t>(b * a.k * nchunks);
          const int64_t i = doc_offsets(a.log_alpha + b * a.k, &pm[base], &ps[base], a.k, nchunks, c.data());
          if (i >= 0) first_bad = std::min(first_bad, b * a.k + i);
          have = b;
        }
        const int64_t v0 = ch * kChunk, n = std::min(kChunk, a.v - v0);
        kern.combine(kept + (it - it0) * a.k * kChunk, kChunk, a.logits + b * a.k * a.v + v0, a.v, c.data(),
                     &pm[static_cast<size_t>(b * a.k * nchunks + ch)], nchunks, a.k, n, a.inv_temperature,
                     a.out + b * a.v + v0);
      }
    }
    int64_t cur = bad.load();
    while (first_bad < cur && !bad.compare_exchange_weak(cur, first_bad)) {
    }
  });
  const int64_t out = bad.load();
  return out == std::numeric_limits<int64_t>::max() ? -1 : out;
}

}  // namespace rag_engine
