// CUDA versions of the three ops (module rag_engine._C_cuda).
//
// Host-callable launchers: every pointer is a device pointer on the current
// device, every launch goes to `stream` and returns at once (no sync). The
// bindings (bindings.cpp) check devices, shapes and alignment before calling
// these; the launchers only return the CUDA error of the launch. Scratch
// memory is passed in by the caller (sized by the *_workspace functions), so
// all memory stays in the caller's allocator (torch's caching allocator).
// Errors found inside a kernel (a non-finite score, an out-of-range id) are
// reported through `bad`: the smallest offending index is atomicMin'ed into
// it; the caller initialises it to UINT64_MAX and raises if it changed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../cpu/topk_ip.h"  // DType: the corpus storage types

namespace rag_engine {

// ---- topk_ip ---------------------------------------------------------------
// scores/ids [nq, min(k, n)] = the k rows of corpus [n, d] with the largest
// <queries[q], row> (times scales[row] for int8), score-descending, ties by
// lower id; rows outside `allow` never appear (-inf / -1 fill the rest).
//
// Pass 1: a grid of (corpus chunk x query block) CTAs; each streams its chunk
// once for all queries of its block (one warp per row, 16-byte loads, fp32
// FMA), keeps the best keys per query in shared memory behind a running
// threshold (block-select: candidates above the k-th best are queued, and
// the queue is bitonic-sorted into the kept set when it could overflow).
// Pass 2: one CTA per query selects the k best of the chunk winners.
// A (score, id) pair is one 64-bit key (order-preserving score bits, then
// inverted id), so every comparison is one integer compare and ties by
// lower id come for free.
constexpr int64_t kTopkIpCudaMaxK = 2048;

struct TopkIpCudaArgs {
  const float* queries = nullptr;  // [nq, d]
  int64_t nq = 0;
  int64_t d = 0;
  const void* corpus = nullptr;    // [n, d] of dtype
  DType dtype = DType::kF32;
  const float* scales = nullptr;   // [n] (int8) or null
  const uint8_t* allow = nullptr;  // ceil(n/8) bytes bitmap (bit i LSB-first = row i) or null
  int64_t n = 0;                   // < 2^31
  int64_t k = 0;                   // 1 .. kTopkIpCudaMaxK
  float* out_scores = nullptr;     // [nq, min(k, n)]
  int64_t* out_ids = nullptr;      // [nq, min(k, n)]
  void* workspace = nullptr;       // topk_ip_cuda_workspace() bytes
  unsigned long long* bad = nullptr;  // first corpus row with a non-finite score
  cudaStream_t stream = nullptr;
};

// Bytes of scratch for these sizes on the current device; 0 and sets *error
// when the shape cannot run (D too large for shared memory).
size_t topk_ip_cuda_workspace(int64_t nq, int64_t d, DType dtype, int64_t n, int64_t k,
                              const char** error);
cudaError_t topk_ip_cuda(const TopkIpCudaArgs& args);

// ---- fusion_softmax --------------------------------------------------------
// One CTA per batch row b: for each of its K documents, score = <u[b], doc>
// (times the corpus row scale for int8), online softmax (running max and
// rescaled accumulator), so every document is read from memory once.
// u = W_aᵀ h_in is computed by the caller (one GEMM for the batch).
// Masked slots (mask 0, gather id < 0) get alpha 0 and score -inf; a row with
// every slot masked gets alpha 0 and h_aug 0.
struct FusionSoftmaxCudaArgs {
  const float* u = nullptr;      // [b, d]
  int64_t b = 0;
  int64_t d = 0;
  int64_t k = 0;
  const void* docs = nullptr;    // dense [b, k, d], or the corpus [n, d] when ids != null
  DType dtype = DType::kF32;
  const float* scales = nullptr; // int8 gather only: [n]
  const int64_t* ids = nullptr;  // gather: [b, k] corpus rows (< 0 = empty slot)
  int64_t n = 0;                 // corpus rows (gather)
  const uint8_t* mask = nullptr; // [b, k], 0 = padded slot, or null
  float* alpha = nullptr;        // [b, k]
  float* h_aug = nullptr;        // [b, d]
  float* scores = nullptr;       // [b, k] or null
  unsigned long long* bad = nullptr;  // first slot b * k + j with a non-finite score or bad id
  cudaStream_t stream = nullptr;
};

// 0 and sets *error when d is too large for shared memory.
size_t fusion_softmax_cuda_smem(int64_t d, int64_t k, const char** error);
cudaError_t fusion_softmax_cuda(const FusionSoftmaxCudaArgs& args);

// ---- rag_token_marg --------------------------------------------------------
// out[b, t] = logsumexp_i(log_alpha[b, i] + x[b, i, t] * it - lse_i),
// lse_i = log Σ_t exp(x[b, i, t] * it).
// Pass 1: CTAs over (row b*k+i, V split) compute partial (max, Σexp).
// Pass 2: CTAs over (b, V block) merge the partials into lse_i (cheap, K
// values) and stream the K logits rows once more — for decode-sized B*K*V
// this second read is served from L2.
struct RagTokenMargCudaArgs {
  const float* log_alpha = nullptr;  // [b, k]
  const void* logits = nullptr;      // [b, k, v] float32 | bfloat16 | float16
  DType dtype = DType::kF32;         // kF32, kBF16 or kF16
  int64_t b = 0;
  int64_t k = 0;
  int64_t v = 0;
  float inv_temperature = 1.f;
  float* out = nullptr;              // [b, v]
  void* workspace = nullptr;         // rag_token_marg_cuda_workspace() bytes
  unsigned long long* bad = nullptr;  // first row b*k+i holding NaN/+Inf or no finite value
  cudaStream_t stream = nullptr;
};

size_t rag_token_marg_cuda_workspace(int64_t b, int64_t k, int64_t v);
cudaError_t rag_token_marg_cuda(const RagTokenMargCudaArgs& args);

// cudaSuccess when this build has kernels for the current device.
cudaError_t cuda_kernels_probe();

}  // namespace rag_engine
