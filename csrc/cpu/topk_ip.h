// Fused inner-product scoring + top-K over a corpus matrix (CPU).
//
// scores[q, j], ids[q, j] = the k corpus rows with the largest <queries[q], corpus[n]>
// (times scales[n] for int8 storage), sorted by score descending, ties broken
// by the lower id. The corpus is tiled; each tile is read once for all
// queries into a small score buffer, and each thread keeps a bounded heap per
// query with a running threshold. No [Q, N] score matrix is ever built.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace rag_engine {

// Storage type of corpus rows. Queries are always float32; bf16/fp16/int8 rows
// are widened to float32 exactly before the multiply, so the only error is the
// storage rounding itself.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kI8 = 3 };

struct TopkIpArgs {
  const float* queries = nullptr;  // [nq, d], row-major, contiguous
  int64_t nq = 0;
  int64_t d = 0;
  const void* corpus = nullptr;    // [n, d] of `dtype`, row-major, contiguous
  DType dtype = DType::kF32;
  const float* scales = nullptr;   // [n] per-row scale (int8 only), else null
  int64_t n = 0;
  int64_t k = 0;                   // rows returned per query: min(k, n)
  const uint8_t* allow = nullptr;  // optional bitmap, bit i (LSB first) = row i allowed
  int threads = 0;                 // <= 0: OpenMP default
  Isa isa = Isa::kScalar;
  float* out_scores = nullptr;     // [nq, min(k, n)]
  int64_t* out_ids = nullptr;      // [nq, min(k, n)]; -1 / -inf where fewer rows pass the filter
};

// Returns -1 on success, or the id of the first corpus row whose score was
// not finite (NaN/Inf in the corpus, or fp32 overflow); the caller raises.
int64_t topk_ip_cpu(const TopkIpArgs& args);

// out[q * ldo + r] = <queries[q], rows[r]> for r < nrows, q < nq (no scaling).
using ScoreTileFn = void (*)(const float* queries, int64_t nq, int64_t d, const void* rows,
                             DType dtype, int64_t nrows, float* out, int64_t ldo);

ScoreTileFn score_tile_scalar();
ScoreTileFn score_tile_avx2();
ScoreTileFn score_tile_avx512();

}  // namespace rag_engine
