// topk_ip on CUDA: fused inner-product scan + block-select top-K (see ops_cuda.h).
#include <algorithm>

#include "common.cuh"
#include "ops_cuda.h"

namespace rag_engine {
namespace {

using cuda::ceil_div;
using Key = unsigned long long;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;                     // rows a warp scores per round
constexpr int kRoundRows = kWarps * kRowsPerWarp;   // most keys one round can queue per query
constexpr int kMergeRound = 128;                    // candidates read per round in pass 2
constexpr int kMinQueue = 256;                      // buffer m >= this, so the queue >= 128
constexpr Key kEmpty = 0;                           // below every real key (it decodes to NaN)

// Order-preserving key: high word = score bits mapped so that unsigned order is
// float order, low word = ~id so that equal scores put the lower id first.
// -0 is folded into +0 so that the two compare equal, as on the CPU.
__device__ __forceinline__ Key make_key(float s, int64_t id) {
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  const uint32_t o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<Key>(o) << 32) | (0xffffffffu - static_cast<uint32_t>(id));
}

__device__ __forceinline__ void decode_key(Key key, float* score, int64_t* id) {
  if (key == kEmpty) {
    *score = -INFINITY;
    *id = -1;
    return;
  }
  const uint32_t o = static_cast<uint32_t>(key >> 32);
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  *score = __uint_as_float(u);
  *id = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key));
}

// Sorts `segs` independent segments of m (a power of two) keys, descending.
// Called by every thread of the block; ends with a barrier.
__device__ void bitonic_sort_desc(Key* buf, int m, int segs) {
  const int half = m >> 1;
  const int pairs = half * segs;
  for (int size = 2; size <= m; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        const int seg = t / half, j = t - seg * half;
        const int i = (j / stride) * 2 * stride + (j % stride);
        Key* base = buf + static_cast<size_t>(seg) * m;
        const Key a = base[i], b = base[i + stride];
        // Blocks with bit `size` clear sort descending; at size == m that is all of it.
        const bool desc = (i & size) == 0;
        if (desc ? a < b : a > b) {
          base[i] = b;
          base[i + stride] = a;
        }
      }
    }
  }
  __syncthreads();
}

// Block-select state in shared memory, one segment per query:
// buf[seg*m, seg*m + kp) the kept keys (sorted after each flush), the rest the
// queue; thr[seg] the k-th best kept key (a key must beat it to be queued).
struct Select {
  Key* buf;
  Key* thr;
  int* count;
  int segs, m, kp, k;

  __device__ void offer(int seg, Key key) const {
    if (key > thr[seg]) {
      const int pos = atomicAdd(&count[seg], 1);
      buf[seg * m + kp + pos] = key;
    }
  }
  // True when another round of `round` offers could overflow a queue (thread 0 only).
  __device__ bool queue_full(int round) const {
    for (int s = 0; s < segs; ++s)
      if (count[s] > m - kp - round) return true;
    return false;
  }
  // Every thread: sort the queue into the kept set, empty the queue, raise thr.
  __device__ void flush() const {
    bitonic_sort_desc(buf, m, segs);
    const int qlen = m - kp;
    for (int i = threadIdx.x; i < segs * qlen; i += blockDim.x) {
      const int s = i / qlen;
      buf[s * m + kp + (i - s * qlen)] = kEmpty;
    }
    for (int s = threadIdx.x; s < segs; s += blockDim.x) {
      count[s] = 0;
      thr[s] = buf[s * m + k - 1];
    }
    __syncthreads();
  }
  // Every thread, after a round of offers: flush when the next round might overflow.
  __device__ void end_round(int round) const {
    __syncthreads();  // this round's offers are all in
    if (__syncthreads_or(threadIdx.x == 0 && queue_full(round))) flush();
  }
};

struct ScanParams {
  const float* queries;
  int nq, d, dp;  // dp: d rounded up to 4 (row stride of the queries in shared memory)
  const void* corpus;
  const float* scales;
  const uint8_t* allow;
  int64_t n, rows_per_chunk;
  int k, kp, m;
  int nchunks;
  Key* out_keys;  // [nq, nchunks, kp]
  unsigned long long* bad;
};

// acc[qi] = <row, qs[qi]> for every lane (VEC > 1 needs d % VEC == 0 and a
// 16-byte aligned row). Lanes read consecutive 16-byte pieces: coalesced.
template <typename T, int QB, int VEC>
__device__ __forceinline__ void dot_row(const T* row, const float* qs, int d, int dp, int lane,
                                        float (&acc)[QB]) {
#pragma unroll
  for (int qi = 0; qi < QB; ++qi) acc[qi] = 0.f;
#pragma unroll 2
  for (int e = lane * VEC; e < d; e += 32 * VEC) {
    float x[VEC];
    cuda::load_f32<T, VEC>(row + e, x);
#pragma unroll
    for (int qi = 0; qi < QB; ++qi) {
      const float* q = qs + qi * dp + e;
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
          const float4 q4 = *reinterpret_cast<const float4*>(q + i);
          acc[qi] = fmaf(x[i], q4.x, acc[qi]);
          acc[qi] = fmaf(x[i + 1], q4.y, acc[qi]);
          acc[qi] = fmaf(x[i + 2], q4.z, acc[qi]);
          acc[qi] = fmaf(x[i + 3], q4.w, acc[qi]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[qi] = fmaf(x[i], q[i], acc[qi]);
      }
    }
  }
#pragma unroll
  for (int qi = 0; qi < QB; ++qi) acc[qi] = cuda::warp_sum(acc[qi]);
}

// Pass 1. Grid (query blocks, corpus chunks); one warp per corpus row, lane qi
// offers query qi's score. Shared memory: queries [QB, dp] fp32, then the
// select buffers [QB, m], thresholds [QB] and queue counts [QB].
template <typename T, int QB, int VEC>
__global__ void __launch_bounds__(kThreads) topk_scan_kernel(const ScanParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* qs = reinterpret_cast<float*>(smem);
  Key* buf = reinterpret_cast<Key*>(qs + QB * p.dp);
  Key* thr = buf + QB * p.m;
  int* count = reinterpret_cast<int*>(thr + QB);
  const int q0 = blockIdx.x * QB;
  const int nqb = min(QB, p.nq - q0);
  for (int i = threadIdx.x; i < QB * p.dp; i += blockDim.x) {
    const int qi = i / p.dp, e = i - qi * p.dp;
    qs[i] = (qi < nqb && e < p.d) ? p.queries[static_cast<int64_t>(q0 + qi) * p.d + e] : 0.f;
  }
  for (int i = threadIdx.x; i < QB * p.m; i += blockDim.x) buf[i] = kEmpty;
  for (int i = threadIdx.x; i < QB; i += blockDim.x) {
    thr[i] = kEmpty;
    count[i] = 0;
  }
  __syncthreads();

  const Select sel{buf, thr, count, QB, p.m, p.kp, p.k};
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* corpus = static_cast<const T*>(p.corpus);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.rows_per_chunk;
  const int64_t r1 = min(p.n, r0 + p.rows_per_chunk);
  for (int64_t base = r0; base < r1; base += kRoundRows) {
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int64_t row = base + warp * kRowsPerWarp + rr;
      if (row >= r1) break;  // warp-uniform
      float acc[QB];
      dot_row<T, QB, VEC>(corpus + row * p.d, qs, p.d, p.dp, lane, acc);
      float mine = 0.f;
#pragma unroll
      for (int qi = 0; qi < QB; ++qi)
        if (lane == qi) mine = acc[qi];  // static indices keep acc in registers
      if (lane < nqb) {
        const float s = p.scales != nullptr ? mine * __ldg(p.scales + row) : mine;
        if (!isfinite(s))
          cuda::report_bad(p.bad, row);
        else if (p.allow == nullptr || ((p.allow[row >> 3] >> (row & 7)) & 1))
          sel.offer(lane, make_key(s, row));
      }
    }
    sel.end_round(kRoundRows);
  }
  sel.flush();
  for (int i = threadIdx.x; i < nqb * p.kp; i += blockDim.x) {
    const int qi = i / p.kp, j = i - qi * p.kp;
    p.out_keys[(static_cast<int64_t>(q0 + qi) * p.nchunks + blockIdx.y) * p.kp + j] = buf[qi * p.m + j];
  }
}

// Pass 2. One CTA per query: the k best of its nchunks * kp chunk winners.
__global__ void __launch_bounds__(kThreads)
    topk_merge_kernel(const Key* keys, int64_t per_query, int k, int kp, int m, int64_t kout,
                      float* out_scores, int64_t* out_ids) {
  extern __shared__ __align__(16) unsigned char smem[];
  Key* buf = reinterpret_cast<Key*>(smem);
  Key* thr = buf + m;
  int* count = reinterpret_cast<int*>(thr + 1);
  for (int i = threadIdx.x; i < m; i += blockDim.x) buf[i] = kEmpty;
  if (threadIdx.x == 0) {
    *thr = kEmpty;
    *count = 0;
  }
  __syncthreads();
  const Select sel{buf, thr, count, 1, m, kp, k};
  const Key* mine = keys + static_cast<int64_t>(blockIdx.x) * per_query;
  for (int64_t base = 0; base < per_query; base += kMergeRound) {
    const int64_t i = base + threadIdx.x;
    if (threadIdx.x < kMergeRound && i < per_query) sel.offer(0, mine[i]);
    sel.end_round(kMergeRound);
  }
  sel.flush();
  for (int64_t j = threadIdx.x; j < kout; j += blockDim.x)
    decode_key(buf[j], out_scores + blockIdx.x * kout + j, out_ids + blockIdx.x * kout + j);
}

using ScanKernel = void (*)(ScanParams);

template <typename T>
ScanKernel pick_scan(int qb, bool vec) {
  constexpr int V = cuda::vec16<T>();
  switch (qb) {
    case 16: return vec ? topk_scan_kernel<T, 16, V> : topk_scan_kernel<T, 16, 1>;
    case 4: return vec ? topk_scan_kernel<T, 4, V> : topk_scan_kernel<T, 4, 1>;
    default: return vec ? topk_scan_kernel<T, 1, V> : topk_scan_kernel<T, 1, 1>;
  }
}

ScanKernel pick_scan(DType t, int qb, bool vec) {
  switch (t) {
    case DType::kBF16: return pick_scan<__nv_bfloat16>(qb, vec);
    case DType::kF16: return pick_scan<__half>(qb, vec);
    case DType::kI8: return pick_scan<int8_t>(qb, vec);
    case DType::kF32: break;
  }
  return pick_scan<float>(qb, vec);
}

int elem_bytes(DType t) {
  return t == DType::kF32 ? 4 : (t == DType::kI8 ? 1 : 2);
}

struct Plan {
  int qb = 1, kp = 1, m = kMinQueue, dp = 4;
  int64_t kout = 0, nchunks = 1, rows_per_chunk = 0;
  size_t scan_smem = 0, merge_smem = 0;
};

size_t scan_smem(int qb, int dp, int m) {
  return static_cast<size_t>(qb) * dp * sizeof(float) + static_cast<size_t>(qb) * m * sizeof(Key) +
         qb * (sizeof(Key) + sizeof(int));
}

// Queries per CTA: one query is bandwidth-bound and wants QB = 1; more queries
// share each corpus read (up to 16 in registers); shrunk until shared memory fits.
bool make_plan(int64_t nq, int64_t d, int64_t n, int64_t k, Plan* p, const char** error) {
  const cuda::DeviceLimits lim = cuda::device_limits();
  p->kout = std::min(k, n);
  p->kp = static_cast<int>(cuda::next_pow2(p->kout));
  p->m = std::max(2 * p->kp, kMinQueue);
  p->dp = static_cast<int>((d + 3) / 4 * 4);
  p->qb = nq == 1 ? 1 : (nq <= 4 ? 4 : 16);
  while (p->qb > 1 && scan_smem(p->qb, p->dp, p->m) > static_cast<size_t>(lim.smem_optin))
    p->qb = p->qb == 16 ? 4 : 1;
  p->scan_smem = scan_smem(p->qb, p->dp, p->m);
  p->merge_smem = static_cast<size_t>(p->m) * sizeof(Key) + sizeof(Key) + sizeof(int);
  if (p->scan_smem > static_cast<size_t>(lim.smem_optin)) {
    *error = "D and k too large for shared memory (needs 4*D + 16*next_pow2(k) bytes per block)";
    return false;
  }
  // One wave of CTAs over (query blocks x chunks); a chunk keeps >= 4 rounds
  // of rows and >= kp rows so its kp winners are worth merging.
  const int64_t qblocks = ceil_div(nq, p->qb);
  // blocks resident per SM by shared memory (the runtime reserves 1 KiB per block)
  const int64_t per_sm = std::max<int64_t>(1, lim.smem_per_sm / static_cast<int64_t>(p->scan_smem + 1024));
  const int64_t target = lim.sms * std::min<int64_t>(per_sm, 4);
  const int64_t min_rows = std::max<int64_t>(4 * kRoundRows, p->kp);
  int64_t chunks = std::max<int64_t>(1, target / qblocks);
  chunks = std::min(chunks, std::max<int64_t>(1, n / min_rows));
  chunks = std::min<int64_t>(chunks, 65535);
  p->rows_per_chunk = ceil_div(ceil_div(n, chunks), kRoundRows) * kRoundRows;
  p->nchunks = ceil_div(n, p->rows_per_chunk);
  return true;
}

}  // namespace

size_t topk_ip_cuda_workspace(int64_t nq, int64_t d, DType, int64_t n, int64_t k, const char** error) {
  Plan p;
  if (!make_plan(nq, d, n, k, &p, error)) return 0;
  return static_cast<size_t>(nq) * p.nchunks * p.kp * sizeof(Key);
}

cudaError_t topk_ip_cuda(const TopkIpCudaArgs& a) {
  Plan plan;
  const char* error = nullptr;
  if (!make_plan(a.nq, a.d, a.n, a.k, &plan, &error)) return cudaErrorInvalidValue;
  const int vec = 16 / elem_bytes(a.dtype);
  const bool vec_ok = a.d % vec == 0 && reinterpret_cast<uintptr_t>(a.corpus) % 16 == 0;
  const ScanKernel scan = pick_scan(a.dtype, plan.qb, vec_ok);
  cudaError_t err = cuda::allow_smem(reinterpret_cast<const void*>(scan), plan.scan_smem);
  if (err != cudaSuccess) return err;
  err = cuda::allow_smem(reinterpret_cast<const void*>(topk_merge_kernel), plan.merge_smem);
  if (err != cudaSuccess) return err;

  ScanParams p{};
  p.queries = a.queries;
  p.nq = static_cast<int>(a.nq);
  p.d = static_cast<int>(a.d);
  p.dp = plan.dp;
  p.corpus = a.corpus;
  p.scales = a.scales;
  p.allow = a.allow;
  p.n = a.n;
  p.rows_per_chunk = plan.rows_per_chunk;
  p.k = static_cast<int>(plan.kout);
  p.kp = plan.kp;
  p.m = plan.m;
  p.nchunks = static_cast<int>(plan.nchunks);
  p.out_keys = static_cast<Key*>(a.workspace);
  p.bad = a.bad;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.nq, plan.qb)), static_cast<unsigned>(plan.nchunks));
  scan<<<grid, kThreads, plan.scan_smem, a.stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  topk_merge_kernel<<<static_cast<unsigned>(a.nq), kThreads, plan.merge_smem, a.stream>>>(
      p.out_keys, plan.nchunks * plan.kp, p.k, plan.kp, plan.m, plan.kout, a.out_scores, a.out_ids);
  return cudaGetLastError();
}

cudaError_t cuda_kernels_probe() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(topk_merge_kernel));
}

}  // namespace rag_engine
