// RAG-Token marginalisation over documents, and sampling from the marginal (CPU).
//
//   out[b, t] = logsumexp_i( log_alpha[b, i] + log_softmax(logits[b, i, :] / T)[t] )
//
// Two streaming passes over V per (b, i), never a [B, K, V] temporary:
//  1. per chunk of V, a shift (the chunk's head max, or its max when the chunk
//     rises more than 64 above that) and Σ exp(x/T - shift) of every document row
//     (one exp per logit, one pass), merged over chunks into lse_i = log Σ_t exp(x_t/T);
//  2. per chunk, for each token, a logsumexp over the K values
//     log_alpha_i - lse_i + x_i/T. Pass 1 keeps its exponentials in a per-thread
//     scratch (K chunks of 16 KiB per work item, L2-resident), so pass 2 only
//     multiplies them by per-(row, chunk) weights and takes one log per token;
//     tokens far below every row's shift (sum < 2^-90) are recomputed with a
//     per-token max, so tiny probabilities keep their exact log.
// A chunk is 16 KiB and both passes over it run on the same thread, so the
// second pass reads it from L1/L2. Chunk partials are merged in a fixed order:
// the result does not depend on the thread count.
#pragma once

#include <cstdint>

#include "cpu_features.h"

namespace rag_engine {

struct RagTokenMargArgs {
  const float* log_alpha = nullptr;  // [b, k]; -inf = document with weight 0
  const float* logits = nullptr;     // [b, k, v]
  int64_t b = 0;
  int64_t k = 0;
  int64_t v = 0;
  float inv_temperature = 1.0f;      // > 0
  int threads = 0;                   // <= 0: OpenMP default
  Isa isa = Isa::kScalar;
  float* out = nullptr;              // [b, v]
};

// Returns -1, or the flat index b * k + i of the first logits row holding a
// NaN or +Inf, or no finite value at all; the caller raises.
int64_t rag_token_marg_cpu(const RagTokenMargArgs& args);

// Sampling from the marginal, in the order of the generator's Sampler:
// temperature (0 = greedy argmax), top_k (ties at the k-th value kept), top_p
// (smallest most-likely prefix, ties by lower id, reaching top_p), min_p (p >=
// min_p * p_max); then the inverse CDF in token-id order at uniforms[b] * total.
struct RagTokenSampleArgs {
  float temperature = 1.0f;          // >= 0, applied to the marginal log-probs
  int64_t top_k = 0;                 // <= 0: off
  double top_p = 1.0;                // (0, 1]
  double min_p = 0.0;                // [0, 1]
  const double* uniforms = nullptr;  // [b] in [0, 1)
  int64_t* tokens = nullptr;         // [b]
  float* logprobs = nullptr;         // [b] marginal log-prob (temperature 1) of the token
};

// args.out receives the marginal at temperature 1 (scratch of [b, v]).
// Same return convention as rag_token_marg_cpu.
int64_t rag_token_sample_cpu(const RagTokenMargArgs& args, const RagTokenSampleArgs& sample);

// Per-ISA pieces (rag_token_marg_{scalar,avx2,avx512}.cpp).
struct MargKernels {
  // *m = a shift with x_t * it - *m <= 64 for every t (-inf if every x_t is -inf), *s =
  // Σ_t exp(x_t * it - *m), and the kept exponentials e[t] = exp(x_t * it - *m); `next`:
  // the chunk the caller reads next (prefetched into L2 meanwhile), or null.
  void (*lse_chunk)(const float* x, int64_t n, float it, float* m, float* s, float* e, const float* next);
  // out[t] = log Σ_i exp(x[i * stride + t] * it - c[k + i] + c[i]) for t < n (c[k + i]: row i's
  // largest shift, c[i]: log_alpha_i less the log of the row's sum below that shift, so that
  // neither carries the size of the logits), from the kept exponentials e[i * e_stride + t] and
  // each row's chunk shift m[i * m_stride] (x is read only for the rare tokens recomputed exactly).
  void (*combine)(const float* e, int64_t e_stride, const float* x, int64_t stride, const float* c,
                  const float* m, int64_t m_stride, int64_t k, int64_t n, float it, float* out);
  // w[t] = exp(z[t] - shift); returns Σ_t w[t].
  double (*exp_shift)(const float* z, int64_t n, float shift, float* w);
  float (*max)(const float* x, int64_t n);
};

MargKernels marg_kernels_scalar();
MargKernels marg_kernels_avx2();
MargKernels marg_kernels_avx512();
MargKernels pick_marg_kernels(Isa isa);

}  // namespace rag_engine
