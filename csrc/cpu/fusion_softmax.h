// Bilinear attention fusion over retrieved documents (CPU).
//
// For each batch row b with query h = h_in[b] and documents d_k (k < K):
//   u        = W_aᵀ h                     (W_a = I when w is null)
//   score_k  = <u, d_k>  (times the row scale for int8 storage)
//   alpha_k  = softmax_k(score_k) over the unmasked slots
//   h_aug    = Σ_k alpha_k d_k
// u is computed for the whole batch by a register-blocked GEMM (U = H W_a);
// then each row makes one pass over its K documents with an online softmax
// (running max, rescaled accumulator) so every document is read from memory
// once. Masked slots (and gather ids < 0) get alpha 0 and score -inf; a row
// with every slot masked gets alpha 0 and h_aug 0 (documented, not an error).
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "topk_ip.h"  // DType: the storage types shared with the corpus matrix

namespace rag_engine {

struct FusionSoftmaxArgs {
  const float* h_in = nullptr;   // [b, d]
  int64_t b = 0;
  int64_t d = 0;
  int64_t k = 0;                 // documents per row
  const float* w = nullptr;      // [d, d] row-major W_a, or null for the identity
  const void* docs = nullptr;    // dense: [b, k, d]; gather: corpus [n, d]
  DType dtype = DType::kF32;
  const float* scales = nullptr; // int8 only: per corpus row (gather) scale
  const int64_t* ids = nullptr;  // gather: [b, k] corpus rows (< 0 = empty slot); null = dense
  const uint8_t* mask = nullptr; // [b, k], 0 = padded slot; null = all valid
  int threads = 0;               // <= 0: OpenMP default
  Isa isa = Isa::kScalar;
  float* alpha = nullptr;        // [b, k]
  float* h_aug = nullptr;        // [b, d]
  float* scores = nullptr;       // [b, k] raw scores (-inf where masked), or null
};

// Returns -1, or the flat slot index b * k + j of the first document whose
// score is not finite (NaN/Inf in h_in, W_a or the document); the caller raises.
int64_t fusion_softmax_cpu(const FusionSoftmaxArgs& args);

// Per-ISA pieces, one set per translation unit (fusion_softmax_{scalar,avx2,avx512}.cpp).
struct FusionKernels {
  // u[r, c] = Σ_j h[r, j] w[j, c] for r < rows, c in [c0, c1); row stride d for h, w and u.
  void (*gemm_cols)(const float* h, int64_t rows, int64_t d, const float* w, int64_t c0,
                    int64_t c1, float* u);
  int64_t gemm_panel;  // column panel width c1 - c0 should be a multiple of
  // Batch rows [b0, b1) (see FusionSoftmaxArgs), u = [b, d]; returns -1 or the
  // flat slot b * k + j of the first document with a non-finite score.
  int64_t (*rows)(const FusionSoftmaxArgs& a, const float* u, int64_t b0, int64_t b1);
};

FusionKernels fusion_kernels_scalar();
FusionKernels fusion_kernels_avx2();
FusionKernels fusion_kernels_avx512();

}  // namespace rag_engine
