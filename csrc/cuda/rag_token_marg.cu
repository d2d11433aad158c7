// rag_token_marg on CUDA: per-row partial logsumexp, then the combination over
// documents (see ops_cuda.h).
#include <algorithm>

#include "common.cuh"
#include "ops_cuda.h"

namespace rag_engine {
namespace {

using cuda::MaxSum;

constexpr int kThreads = 256;
constexpr int kChunkAlign = 1024;     // a V split is a multiple of this (every VEC)
constexpr int kTokensPerThread = 4;   // pass 2

// Adds x to the running (max, Σ exp(x - max)) with one exp per element.
// -inf (a masked token) adds nothing; NaN/+Inf are flagged.
__device__ __forceinline__ void online_add(MaxSum& st, float x, bool& bad) {
  if (x == -INFINITY) return;
  if (!(x < INFINITY)) {  // NaN or +Inf
    bad = true;
    return;
  }
  if (x > st.m) {
    st.s = st.s * expf(st.m - x) + 1.f;  // first finite value: expf(-inf) = 0
    st.m = x;
  } else {
    st.s += expf(x - st.m);
  }
}

// Pass 1: grid (b*k, splits). partial[row * splits + split] = (max, Σexp) of
// x * it over the split's V range.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    lse_partial_kernel(const T* logits, int64_t v, int64_t chunk, float it, MaxSum* partial,
                       unsigned long long* bad) {
  __shared__ MaxSum red[32];
  const int64_t row = blockIdx.x;
  const int64_t start = blockIdx.y * chunk;
  const int64_t end = min(v, start + chunk);
  const T* x = logits + row * v;
  MaxSum st{-INFINITY, 0.f};
  bool flag = false;
  for (int64_t e = start + threadIdx.x * VEC; e < end; e += kThreads * VEC) {
    float f[VEC];
    cuda::load_f32<T, VEC>(x + e, f);
#pragma unroll
    for (int i = 0; i < VEC; ++i) online_add(st, f[i] * it, flag);
  }
  if (flag) cuda::report_bad(bad, row);
  st = cuda::block_merge(st, red);
  if (threadIdx.x == 0) partial[row * gridDim.y + blockIdx.y] = st;
}

// Pass 2: grid (V blocks, b). In shared memory c_i = log_alpha_i - log s_i and mx_i (the row's
// (max, sum) from pass 1), then per token a logsumexp over the k documents of
// c_i + (x_i * it - mx_i): one rounding for the difference (fma), so logits far from 0 do not
// cancel against an offset of their size.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const T* logits, const float* log_alpha, const MaxSum* partial, int64_t k,
                   int64_t v, int64_t splits, float it, float* out, unsigned long long* bad) {
  extern __shared__ float c[];  // [2k]: c_i, then mx_i
  const int64_t b = blockIdx.y;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) {
    const int64_t row = b * k + i;
    MaxSum st{-INFINITY, 0.f};
    for (int64_t s = 0; s < splits; ++s) st = cuda::merge(st, partial[row * splits + s]);
    if (st.m == -INFINITY) {  // no finite logit in the row: no distribution
      if (blockIdx.x == 0) cuda::report_bad(bad, row);
      c[i] = -INFINITY;
      c[k + i] = 0.f;
    } else {
      c[i] = log_alpha[row] - logf(st.s);
      c[k + i] = st.m;
    }
  }
  __syncthreads();
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kThreads * kTokensPerThread + threadIdx.x;
#pragma unroll
  for (int j = 0; j < kTokensPerThread; ++j) {
    const int64_t t = t0 + j * kThreads;
    if (t >= v) break;
    MaxSum st{-INFINITY, 0.f};
    bool unused = false;  // pass 1 already flagged NaN/+Inf
    for (int64_t i = 0; i < k; ++i) {
      if (c[i] == -INFINITY) continue;  // weight 0 (log_alpha = -inf) or flagged row
      online_add(st, c[i] + fmaf(cuda::to_f32(logits[(b * k + i) * v + t]), it, -c[k + i]), unused);
    }
    out[b * v + t] = st.m == -INFINITY ? -INFINITY : st.m + logf(st.s);
  }
}

struct MargPlan {
  int64_t splits = 1, chunk = 0;
};

MargPlan make_plan(int64_t b, int64_t k, int64_t v) {
  const int64_t rows = std::max<int64_t>(1, b * k);
  const int64_t want = cuda::ceil_div(2 * cuda::device_limits().sms, rows);
  MargPlan p;
  p.splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, v / 4096));
  p.chunk = cuda::ceil_div(cuda::ceil_div(v, p.splits), kChunkAlign) * kChunkAlign;
  p.splits = cuda::ceil_div(v, p.chunk);
  return p;
}

template <typename T>
cudaError_t launch(const RagTokenMargCudaArgs& a) {
  const MargPlan p = make_plan(a.b, a.k, a.v);
  auto* partial = static_cast<MaxSum*>(a.workspace);
  const T* logits = static_cast<const T*>(a.logits);
  constexpr int V = cuda::vec16<T>();
  const bool vec_ok = a.v % V == 0 && reinterpret_cast<uintptr_t>(a.logits) % 16 == 0;
  const dim3 grid1(static_cast<unsigned>(a.b * a.k), static_cast<unsigned>(p.splits));
  if (vec_ok)
    lse_partial_kernel<T, V><<<grid1, kThreads, 0, a.stream>>>(logits, a.v, p.chunk, a.inv_temperature,
                                                               partial, a.bad);
  else
    lse_partial_kernel<T, 1><<<grid1, kThreads, 0, a.stream>>>(logits, a.v, p.chunk, a.inv_temperature,
                                                               partial, a.bad);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = static_cast<size_t>(2 * a.k) * sizeof(float);
  err = cuda::allow_smem(reinterpret_cast<const void*>(combine_kernel<T>), smem);
  if (err != cudaSuccess) return err;
  const dim3 grid2(static_cast<unsigned>(cuda::ceil_div(a.v, kThreads * kTokensPerThread)),
                   static_cast<unsigned>(a.b));
  combine_kernel<T><<<grid2, kThreads, smem, a.stream>>>(logits, a.log_alpha, partial, a.k, a.v, p.splits,
                                                         a.inv_temperature, a.out, a.bad);
  return cudaGetLastError();
}

}  // namespace

size_t rag_token_marg_cuda_workspace(int64_t b, int64_t k, int64_t v) {
  return static_cast<size_t>(b * k * make_plan(b, k, v).splits) * sizeof(MaxSum);
}

cudaError_t rag_token_marg_cuda(const RagTokenMargCudaArgs& a) {
  switch (a.dtype) {
    case DType::kBF16: return launch<__nv_bfloat16>(a);
    case DType::kF16: return launch<__half>(a);
    default: return launch<float>(a);
  }
}

}  // namespace rag_engine
