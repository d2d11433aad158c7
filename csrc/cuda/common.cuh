// Device helpers shared by the CUDA kernels: storage-type widening, vector
// loads, block reductions, the packed top-K key, and the host-side launch
// plumbing (device limits, error text).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rag_engine {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Storage types are widened to float32 exactly (bf16/fp16/int8 -> fp32 is
// exact), so the only error against the float64 reference is the storage
// rounding and the fp32 accumulation.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(int8_t x) { return static_cast<float>(x); }

// Elements of T in one 16-byte load.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// x[0..VEC) = widened T values at p (16-byte aligned when VEC == vec16<T>()).
// The read-only path (__ldg) keeps the streamed corpus out of L1 write-back.
template <typename T, int VEC>
__device__ __forceinline__ void load_f32(const T* p, float (&x)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = to_f32(p[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Block-wide reduction with the warp-level `warp_reduce`, result to every
// thread. `scratch` holds one T per warp; the leading __syncthreads makes
// back-to-back calls safe. `empty` is the identity of the reduction.
template <typename T, typename WarpReduce>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T empty, WarpReduce warp_reduce) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return warp_reduce(lane < nwarps ? scratch[lane] : empty);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  return block_reduce(v, scratch, 0.f, [](float x) { return warp_sum(x); });
}

// Online-softmax state (running max m, sum s of exp(x - m)) merged by max.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty: avoid (-inf) - (-inf)
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_merge(MaxSum v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum w{__shfl_xor_sync(kFullMask, v.m, o), __shfl_xor_sync(kFullMask, v.s, o)};
    v = merge(v, w);
  }
  return v;
}

__device__ __forceinline__ MaxSum block_merge(MaxSum v, MaxSum* scratch) {
  return block_reduce(v, scratch, MaxSum{-INFINITY, 0.f}, [](MaxSum x) { return warp_merge(x); });
}

// Records the smallest bad index seen (non-finite score, bad id) for the host.
__device__ __forceinline__ void report_bad(unsigned long long* bad, int64_t index) {
  if (bad != nullptr) atomicMin(bad, static_cast<unsigned long long>(index));
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

struct DeviceLimits {
  int sms = 1;
  int smem_optin = 48 << 10;  // bytes of dynamic shared memory one block may opt into
  int smem_per_sm = 64 << 10;  // bytes of shared memory on one SM (all resident blocks)
};

DeviceLimits device_limits();

// Allows `kernel` to use `bytes` of dynamic shared memory (needed above 48 KiB).
cudaError_t allow_smem(const void* kernel, size_t bytes);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

}  // namespace cuda
}  // namespace rag_engine
