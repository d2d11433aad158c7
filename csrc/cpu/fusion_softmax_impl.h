// fusion_softmax kernels written once over a SIMD traits type S (simd_math.h)
// and compiled per ISA by fusion_softmax_{scalar,avx2,avx512}.cpp. Only
// templates in an anonymous namespace: nothing here is shared across ISAs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "fusion_softmax.h"
#include "simd_math.h"

namespace rag_engine {
namespace {

// u[0:MR, c0:c0+ncols] = h[0:MR, :] W[:, c0:c0+ncols]. MR x NV accumulators stay
// in registers; each W row chunk is loaded once and used MR times, and the
// panel (NV vectors wide) stays in L2 while the row blocks pass over it.
template <class S, int MR, bool kFull>
inline void gemm_block(const float* h, int64_t d, const float* w, int64_t c0, int64_t ncols,
                       float* u) {
  using V = typename S::V;
  constexpr int NV = S::kGemmVecs;
  constexpr int W = S::W;
  V acc[MR][NV];
  int64_t cnt[NV];
  for (int v = 0; v < NV; ++v) {
    const int64_t left = ncols - v * W;
    cnt[v] = left < 0 ? 0 : (left > W ? W : left);
    for (int r = 0; r < MR; ++r) acc[r][v] = S::zero();
  }
  const float* wp = w + c0;
  for (int64_t j = 0; j < d; ++j, wp += d) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = kFull ? S::load(wp + v * W) : S::load_n(wp + v * W, cnt[v]);
    for (int r = 0; r < MR; ++r) {
      const V hb = S::set1(h[r * d + j]);
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fma(hb, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) {
      float* out = u + r * d + c0 + v * W;
      if (kFull) S::store(out, acc[r][v]);
      else if (cnt[v] > 0) S::store_n(out, acc[r][v], cnt[v]);
    }
}

// The last rows (fewer than S::kGemmRows): pick the block height at compile time.
template <class S, bool kFull, int M>
inline void gemm_tail_rows(int64_t rows, const float* h, int64_t d, const float* w, int64_t c0,
                           int64_t ncols, float* u) {
  if constexpr (M > 0) {
    if (rows == M) gemm_block<S, M, kFull>(h, d, w, c0, ncols, u);
    else gemm_tail_rows<S, kFull, M - 1>(rows, h, d, w, c0, ncols, u);
  }
}

template <class S, bool kFull>
inline void gemm_panel(const float* h, int64_t rows, int64_t d, const float* w, int64_t c0,
                       int64_t ncols, float* u) {
  constexpr int MR = S::kGemmRows;
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) gemm_block<S, MR, kFull>(h + r * d, d, w, c0, ncols, u + r * d);
  gemm_tail_rows<S, kFull, MR - 1>(rows - r, h + r * d, d, w, c0, ncols, u + r * d);
}

template <class S>
void gemm_cols(const float* h, int64_t rows, int64_t d, const float* w, int64_t c0, int64_t c1,
               float* u) {
  constexpr int64_t P = S::kGemmVecs * S::W;
  for (int64_t p = c0; p < c1; p += P) {
    const int64_t ncols = c1 - p < P ? c1 - p : P;
    if (ncols == P) gemm_panel<S, true>(h, rows, d, w, p, ncols, u);
    else gemm_panel<S, false>(h, rows, d, w, p, ncols, u);
  }
}

// <u, x> with four independent FMA chains; while reading x it prefetches the
// next document of the row (gathered rows are scattered over the corpus).
template <class S, class T>
inline float dot_prefetch(const float* u, const T* x, int64_t d, const T* next) {
  using V = typename S::V;
  constexpr int W = S::W;
  constexpr int kLineElems = 64 / sizeof(T) < 1 ? 1 : 64 / sizeof(T);
  V a0 = S::zero(), a1 = S::zero(), a2 = S::zero(), a3 = S::zero();
  int64_t j = 0;
  for (; j + 4 * W <= d; j += 4 * W) {
    if (next != nullptr)
      for (int e = 0; e < 4 * W; e += kLineElems) __builtin_prefetch(next + j + e, 0, 3);
    a0 = S::fma(S::load(u + j), S::load(x + j), a0);
    a1 = S::fma(S::load(u + j + W), S::load(x + j + W), a1);
    a2 = S::fma(S::load(u + j + 2 * W), S::load(x + j + 2 * W), a2);
    a3 = S::fma(S::load(u + j + 3 * W), S::load(x + j + 3 * W), a3);
  }
  if (next != nullptr)
    for (int64_t e = j; e < d; e += kLineElems) __builtin_prefetch(next + e, 0, 3);
  for (; j + W <= d; j += W) a0 = S::fma(S::load(u + j), S::load(x + j), a0);
  if (j < d) a1 = S::fma(S::load_n(u + j, d - j), S::load_n(x + j, d - j), a1);
  return S::hsum(S::add(S::add(a0, a1), S::add(a2, a3)));
}

// acc = a * acc + c * x (kScale) or acc += c * x; x comes from L1 (just read by the dot).
template <class S, bool kScale, class T>
inline void axpby(float* acc, float a, float c, const T* x, int64_t d) {
  using V = typename S::V;
  constexpr int W = S::W;
  const V av = S::set1(a), cv = S::set1(c);
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    V v = S::load(acc + j);
    if (kScale) v = S::mul(v, av);
    S::store(acc + j, S::fma(cv, S::load(x + j), v));
  }
  if (j < d) {
    V v = S::load_n(acc + j, d - j);
    if (kScale) v = S::mul(v, av);
    S::store_n(acc + j, S::fma(cv, S::load_n(x + j, d - j), v), d - j);
  }
}

template <class S>
inline void scale_row(float* x, float c, int64_t d) {
  constexpr int W = S::W;
  const typename S::V cv = S::set1(c);
  int64_t j = 0;
  for (; j + W <= d; j += W) S::store(x + j, S::mul(S::load(x + j), cv));
  if (j < d) S::store_n(x + j, S::mul(S::load_n(x + j, d - j), cv), d - j);
}

// One batch row: a single pass over its documents with an online softmax
// (flash-attention style running max m and normaliser l; the accumulator is
// rescaled only when the max grows). alpha holds the raw scores until the end.
template <class S, class T>
int64_t fusion_row_typed(const FusionSoftmaxArgs& a, const float* u, int64_t b) {
  const int64_t d = a.d, k = a.k;
  const T* base = static_cast<const T*>(a.docs);
  const int64_t* ids = a.ids != nullptr ? a.ids + b * k : nullptr;
  const uint8_t* mask = a.mask != nullptr ? a.mask + b * k : nullptr;
  float* alpha = a.alpha + b * k;
  float* h = a.h_aug + b * d;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < d; ++j) h[j] = 0.0f;

  auto valid = [&](int64_t j) { return (mask == nullptr || mask[j]) && (ids == nullptr || ids[j] >= 0); };
  auto row_of = [&](int64_t j) { return ids != nullptr ? base + ids[j] * d : base + (b * k + j) * d; };
  auto next_valid = [&](int64_t j) {
    for (; j < k && !valid(j); ++j) alpha[j] = kNegInf;
    return j;
  };

  float m = kNegInf, l = 0.0f;
  for (int64_t j = next_valid(0); j < k;) {
    const int64_t jn = next_valid(j + 1);
    const T* x = row_of(j);
    const float sc = a.scales != nullptr ? a.scales[ids != nullptr ? ids[j] : b * k + j] : 1.0f;
    const float s = dot_prefetch<S>(u, x, d, jn < k ? row_of(jn) : nullptr) * sc;
    if (!__builtin_isfinite(s)) return j;
    alpha[j] = s;
    if (s > m) {  // new max: old terms shrink by e^(m - s); this term has weight 1
      const float corr = ::expf(m - s);
      l = l * corr + 1.0f;
      axpby<S, true>(h, corr, sc, x, d);
      m = s;
    } else {
      const float wgt = ::expf(s - m);
      l += wgt;
      axpby<S, false>(h, 1.0f, wgt * sc, x, d);
    }
    j = jn;
  }

  float* scores = a.scores != nullptr ? a.scores + b * k : nullptr;
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // l == 0: every slot masked -> zeros
  for (int64_t j = 0; j < k; ++j) {
    const float s = alpha[j];
    if (scores != nullptr) scores[j] = s;
    alpha[j] = s == kNegInf ? 0.0f : ::expf(s - m) * inv;
  }
  if (l > 0.0f) scale_row<S>(h, inv, d);
  return -1;
}

template <class S>
int64_t fusion_row(const FusionSoftmaxArgs& a, const float* u, int64_t b) {
  switch (a.dtype) {
    case DType::kF32: return fusion_row_typed<S, float>(a, u, b);
    case DType::kBF16: return fusion_row_typed<S, Bf16Bits>(a, u, b);
    case DType::kF16: return fusion_row_typed<S, F16Bits>(a, u, b);
    case DType::kI8: return fusion_row_typed<S, int8_t>(a, u, b);
  }
  return -1;
}

template <class S>
FusionKernels make_fusion_kernels() {
  return FusionKernels{&gemm_cols<S>, int64_t{S::kGemmVecs} * S::W, &fusion_row<S>};
}

}  // namespace
}  // namespace rag_engine
