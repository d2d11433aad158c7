// Driver of fusion_softmax: U = H W_a split by column panels across threads,
// then the batch rows split across threads for the online-softmax pass.
#include "fusion_softmax.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "parallel.h"

namespace rag_engine {
namespace {

FusionKernels pick_fusion_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return fusion_kernels_avx512();
    case Isa::kAvx2: return fusion_kernels_avx2();
    case Isa::kScalar: break;
  }
  return fusion_kernels_scalar();
}

// Multiply-adds one thread should have before a second one pays for its
// wake-up (a few microseconds): below this the call stays single-threaded.
constexpr int64_t kWorkPerThread = 96 * 1024;
// Batch rows per thread from which each thread computes its own rows of U = H W_a
// (each W_a panel it streams from L3 then serves 2+ register blocks); measured
// 2-4% faster than the column split + barrier at B = 32, D = 768 on 2 threads.
constexpr int64_t kRowsPerThread = 16;

}  // namespace

int64_t fusion_softmax_cpu(const FusionSoftmaxArgs& a) {
  const FusionKernels kern = pick_fusion_kernels(a.isa);
  const int64_t panels = a.w != nullptr ? (a.d + kern.gemm_panel - 1) / kern.gemm_panel : 0;
  const int64_t work = (a.w != nullptr ? a.b * a.d * a.d : 0) + 2 * a.b * a.k * a.d;
  int64_t nt = a.threads > 0 ? a.threads : omp_get_max_threads();
  nt = std::max<int64_t>(1, std::min({nt, std::max(a.b, panels), work / kWorkPerThread + 1}));

  std::vector<float> ubuf(a.w != nullptr ? static_cast<size_t>(a.b * a.d) : 0);
  const float* u = a.w != nullptr ? ubuf.data() : a.h_in;
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};

  // With a full GEMM row block per thread, each thread computes u for its own
  // rows (reading all of W_a from L3) and goes straight on: no barrier, and its
  // u rows are still in cache. Fewer rows: split W_a's columns, then a barrier.
  const bool own_rows = a.b >= kRowsPerThread * nt;

  const auto run = [&](int64_t t, int64_t nth) {
    const int64_t b0 = a.b * t / nth, b1 = a.b * (t + 1) / nth;
    if (a.w != nullptr && own_rows) {
      if (b0 < b1) kern.gemm_cols(a.h_in + b0 * a.d, b1 - b0, a.d, a.w, 0, a.d, ubuf.data() + b0 * a.d);
    } else if (a.w != nullptr) {
      const int64_t p0 = panels * t / nth, p1 = panels * (t + 1) / nth;
      if (p0 < p1)
        kern.gemm_cols(a.h_in, a.b, a.d, a.w, p0 * kern.gemm_panel,
                       std::min(a.d, p1 * kern.gemm_panel), ubuf.data());
#pragma omp barrier
    }
    const int64_t r = b0 < b1 ? kern.rows(a, u, b0, b1) : -1;
    const int64_t first_bad = r >= 0 ? r : std::numeric_limits<int64_t>::max();
    int64_t cur = bad.load();
    while (first_bad < cur && !bad.compare_exchange_weak(cur, first_bad)) {
    }
  };
  parallel_region(nt, run);
  const int64_t out = bad.load();
  return out == std::numeric_limits<int64_t>::max() ? -1 : out;
}

}  // namespace rag_engine
