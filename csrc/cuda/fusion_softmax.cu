// fusion_softmax on CUDA: one CTA per batch row, online softmax over its K
// documents (see ops_cuda.h).
#include "common.cuh"
#include "ops_cuda.h"

namespace rag_engine {
namespace {

constexpr int kThreads = 256;

// Shared memory: u [d], the h_aug accumulator [d], raw scores [k]. Each thread
// owns the elements e = tid + i * blockDim, so the accumulator needs no
// barrier; the document element it multiplies in the dot product is read
// again for the accumulation from L1.
template <typename T>
__global__ void __launch_bounds__(kThreads) fusion_softmax_kernel(const FusionSoftmaxCudaArgs a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float red[32];
  float* us = smem;
  float* acc = us + a.d;
  float* sc = acc + a.d;
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  for (int64_t e = tid; e < a.d; e += blockDim.x) {
    us[e] = a.u[b * a.d + e];
    acc[e] = 0.f;
  }
  const T* docs = static_cast<const T*>(a.docs);
  float m = -INFINITY, l = 0.f;  // running max and Σ exp(score - m): uniform over the block
  for (int64_t j = 0; j < a.k; ++j) {
    const int64_t slot = b * a.k + j;
    bool valid = a.mask == nullptr || a.mask[slot] != 0;
    const T* doc = docs + slot * a.d;
    float scale = 1.f;
    if (valid && a.ids != nullptr) {
      const int64_t row = a.ids[slot];
      if (row >= a.n) {
        if (tid == 0) cuda::report_bad(a.bad, slot);
        valid = false;
      } else if (row < 0) {
        valid = false;
      } else {
        doc = docs + row * a.d;
        if (a.scales != nullptr) scale = a.scales[row];
      }
    }
    float s = -INFINITY;
    if (valid) {  // block-uniform: every thread read the same mask/id
      float part = 0.f;
      for (int64_t e = tid; e < a.d; e += blockDim.x) part = fmaf(us[e], cuda::to_f32(doc[e]), part);
      s = cuda::block_sum(part, red) * scale;
      if (!isfinite(s)) {
        if (tid == 0) cuda::report_bad(a.bad, slot);
        s = -INFINITY;
      }
    }
    if (tid == 0) sc[j] = s;
    if (s == -INFINITY) continue;
    const float m_new = fmaxf(m, s);
    const float corr = expf(m - m_new);  // 0 for the first valid slot (m = -inf)
    const float p = expf(s - m_new);
    l = l * corr + p;
    const float ps = p * scale;
    for (int64_t e = tid; e < a.d; e += blockDim.x) acc[e] = fmaf(ps, cuda::to_f32(doc[e]), acc[e] * corr);
    m = m_new;
  }
  __syncthreads();  // sc[] written by thread 0
  const float inv = l > 0.f ? 1.f / l : 0.f;  // every slot masked: alpha 0, h_aug 0
  for (int64_t j = tid; j < a.k; j += blockDim.x) {
    const float s = sc[j];
    a.alpha[b * a.k + j] = s == -INFINITY ? 0.f : expf(s - m) * inv;
    if (a.scores != nullptr) a.scores[b * a.k + j] = s;
  }
  for (int64_t e = tid; e < a.d; e += blockDim.x) a.h_aug[b * a.d + e] = acc[e] * inv;
}

}  // namespace

size_t fusion_softmax_cuda_smem(int64_t d, int64_t k, const char** error) {
  const size_t bytes = static_cast<size_t>(2 * d + k) * sizeof(float);
  // + the kernel's static reduction scratch (32 floats)
  if (bytes + 32 * sizeof(float) > static_cast<size_t>(cuda::device_limits().smem_optin)) {
    *error = "2*D + K floats exceed the shared memory of one block";
    return 0;
  }
  return bytes;
}

cudaError_t fusion_softmax_cuda(const FusionSoftmaxCudaArgs& a) {
  const char* error = nullptr;
  const size_t smem = fusion_softmax_cuda_smem(a.d, a.k, &error);
  if (smem == 0) return cudaErrorInvalidValue;
  void (*kernel)(FusionSoftmaxCudaArgs) = fusion_softmax_kernel<float>;
  switch (a.dtype) {
    case DType::kBF16: kernel = fusion_softmax_kernel<__nv_bfloat16>; break;
    case DType::kF16: kernel = fusion_softmax_kernel<__half>; break;
    case DType::kI8: kernel = fusion_softmax_kernel<int8_t>; break;
    case DType::kF32: break;
  }
  cudaError_t err = cuda::allow_smem(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(a.b), kThreads, smem, a.stream>>>(a);
  return cudaGetLastError();
}

}  // namespace rag_engine
