// Driver of the fused top-K: splits the corpus among threads, scores it tile by
// tile with the ISA micro-kernels and keeps a bounded heap per query.
#include "topk_ip.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"

namespace rag_engine {
namespace {

struct Entry {
  float score;
  int64_t id;
};

// Total order of results: higher score first, then lower id.
inline bool better(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

// Min-heap on `better`: the root is the worst kept entry, i.e. the threshold a
// new row must beat. Rows arrive in increasing id within a thread, so an equal
// score never displaces a kept one (lower id wins ties).
class BoundedHeap {
 public:
  explicit BoundedHeap(int64_t k) : k_(k) { data_.reserve(static_cast<size_t>(k)); }

  float threshold() const {
    return full() ? data_.front().score : -std::numeric_limits<float>::infinity();
  }
  bool full() const { return static_cast<int64_t>(data_.size()) == k_; }

  void push(float score, int64_t id) {
    const Entry e{score, id};
    if (!full()) {
      data_.push_back(e);
      std::push_heap(data_.begin(), data_.end(), better);
    } else if (better(e, data_.front())) {
      std::pop_heap(data_.begin(), data_.end(), better);
      data_.back() = e;
      std::push_heap(data_.begin(), data_.end(), better);
    }
  }
  const std::vector<Entry>& entries() const { return data_; }

 private:
  int64_t k_;
  std::vector<Entry> data_;
};

ScoreTileFn pick_kernel(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return score_tile_avx512();
    case Isa::kAvx2: return score_tile_avx2();
    case Isa::kScalar: break;
  }
  return score_tile_scalar();
}

int64_t elem_bytes(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16:
    case DType::kF16: return 2;
    case DType::kI8: return 1;
  }
  return 4;
}

// Rows per tile: about 128 KiB of corpus, so a tile stays in L2 while every
// query block passes over it.
int64_t tile_rows(int64_t d, DType t) {
  const int64_t bytes = std::max<int64_t>(1, d * elem_bytes(t));
  const int64_t rows = (int64_t{128} << 10) / bytes;
  return std::clamp<int64_t>(rows / 8 * 8, 8, 1024);
}

// Queries scored per pass over a tile (bounds the score buffer; a tile is
// still read from memory only once).
constexpr int64_t kQueryChunk = 64;

}  // namespace

int64_t topk_ip_cpu(const TopkIpArgs& a) {
  const int64_t kout = std::min(a.k, a.n);
  const ScoreTileFn kernel = pick_kernel(a.isa);
  const int64_t tn = tile_rows(a.d, a.dtype);
  const int64_t ntiles = (a.n + tn - 1) / tn;
  int nthreads = a.threads > 0 ? a.threads : omp_get_max_threads();
  nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nthreads, ntiles)));
  const int64_t row_bytes = a.d * elem_bytes(a.dtype);
  const char* corpus = static_cast<const char*>(a.corpus);

  std::vector<std::vector<BoundedHeap>> heaps(static_cast<size_t>(nthreads));
  std::atomic<int64_t> bad_row{std::numeric_limits<int64_t>::max()};

  parallel_region(nthreads, [&](int64_t t, int64_t nth) {
    // Contiguous range of tiles per thread: each thread streams its own part
    // of the corpus, which keeps the hardware prefetchers on.
    const int64_t tile_begin = ntiles * t / nth;
    const int64_t tile_end = ntiles * (t + 1) / nth;
    std::vector<BoundedHeap>& mine = heaps[static_cast<size_t>(t)];
    mine.reserve(static_cast<size_t>(a.nq));
    for (int64_t q = 0; q < a.nq; ++q) mine.emplace_back(kout);
    const int64_t qchunk = std::min(a.nq, kQueryChunk);
    std::vector<float> sbuf(static_cast<size_t>(qchunk * tn));
    int64_t first_bad = std::numeric_limits<int64_t>::max();

    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t r0 = tile * tn;
      const int64_t nr = std::min(tn, a.n - r0);
      for (int64_t q0 = 0; q0 < a.nq; q0 += qchunk) {
        const int64_t nqc = std::min(qchunk, a.nq - q0);
        kernel(a.queries + q0 * a.d, nqc, a.d, corpus + r0 * row_bytes, a.dtype, nr, sbuf.data(), tn);
        for (int64_t qi = 0; qi < nqc; ++qi) {
          float* s = sbuf.data() + qi * tn;
          if (a.scales != nullptr)
            for (int64_t r = 0; r < nr; ++r) s[r] *= a.scales[r0 + r];
          BoundedHeap& heap = mine[static_cast<size_t>(q0 + qi)];
          float thr = heap.threshold();
          for (int64_t r = 0; r < nr; ++r) {
            const float v = s[r];
            if (!std::isfinite(v)) {
              first_bad = std::min(first_bad, r0 + r);
              continue;
            }
            if (v < thr || (v == thr && heap.full())) continue;
            const int64_t id = r0 + r;
            if (a.allow != nullptr && !((a.allow[id >> 3] >> (id & 7)) & 1)) continue;
            heap.push(v, id);
            thr = heap.threshold();
          }
        }
      }
    }
    int64_t cur = bad_row.load();
    while (first_bad < cur && !bad_row.compare_exchange_weak(cur, first_bad)) {
    }
  });

  if (bad_row.load() != std::numeric_limits<int64_t>::max()) return bad_row.load();

  // Merge the per-thread heaps of each query.
  parallel_region(std::min<int64_t>(nthreads, a.nq), [&](int64_t t0, int64_t nth) {
    for (int64_t q = a.nq * t0 / nth; q < a.nq * (t0 + 1) / nth; ++q) {
      std::vector<Entry> all;
      all.reserve(static_cast<size_t>(kout * nthreads));
      for (const auto& mine : heaps) {  // empty: OpenMP ran fewer threads than asked
        if (mine.empty()) continue;
        const auto& e = mine[static_cast<size_t>(q)].entries();
        all.insert(all.end(), e.begin(), e.end());
      }
      const int64_t m = std::min<int64_t>(kout, static_cast<int64_t>(all.size()));
      std::partial_sort(all.begin(), all.begin() + m, all.end(), better);
      float* os = a.out_scores + q * kout;
      int64_t* oi = a.out_ids + q * kout;
      for (int64_t j = 0; j < m; ++j) {
        os[j] = all[static_cast<size_t>(j)].score;
        oi[j] = all[static_cast<size_t>(j)].id;
      }
      for (int64_t j = m; j < kout; ++j) {
        os[j] = -std::numeric_limits<float>::infinity();
        oi[j] = -1;
      }
    }
  });
  return -1;
}

}  // namespace rag_engine
