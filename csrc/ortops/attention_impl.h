// Kernels of attention.h, compiled once per ISA (S = SimdScalar / SimdAvx512 from
// csrc/cpu/simd_math.h). Per (row, kv head, new token): the G query heads are scored
// against every cached key up to the token's position together (each key row is loaded
// once for the group), softmax with the row max subtracted, then the values are summed
// with the G probability rows in registers.
#pragma once

#include <algorithm>
#include <cstring>

#include "../cpu/simd_math.h"
#include "attention.h"

namespace rag_engine::attention {
namespace {

inline void rotate_into(const Params& p, const float* src, int64_t pos, float mult, float* dst) {
  const int64_t d = p.head_dim, half = p.rot_half;
  if (half == 0) {
    for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * mult;
    return;
  }
  const float* c = p.cos + pos * half;
  const float* s = p.sin + pos * half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = src[i], x2 = src[i + half];
    dst[i] = (x1 * c[i] - x2 * s[i]) * mult;
    dst[i + half] = (x2 * c[i] + x1 * s[i]) * mult;
  }
  for (int64_t i = 2 * half; i < d; ++i) dst[i] = src[i] * mult;
}

inline const float* qkv_row(const Params& p, int64_t b, int64_t s) {
  return p.qkv + (b * p.seq + s) * (p.heads + 2 * p.kv_heads) * p.head_dim;
}

template <class S>
void store_kv_impl(const Params& p, int64_t b, int64_t h) {
  const int64_t d = p.head_dim;
  const int64_t start = first_position(p, b);
  const int64_t valid = std::min(p.seq, row_length(p, b) - start);
  float* key = p.key + ((b * p.kv_heads + h) * p.cache_len) * d;
  float* value = p.value + ((b * p.kv_heads + h) * p.cache_len) * d;
  for (int64_t s = 0; s < valid; ++s) {
    const float* row = qkv_row(p, b, s);
    rotate_into(p, row + (p.heads + h) * d, start + s, 1.0f, key + (start + s) * d);
    std::memcpy(value + (start + s) * d, row + (p.heads + p.kv_heads + h) * d, sizeof(float) * d);
  }
}

// exp(x - row max) in place for `count` rows of n scores; sums[j] = the row's sum (the
// caller divides by it).
template <class S>
void exp_rows(float* scores, int64_t count, int64_t n, int64_t stride, float* sums) {
  constexpr int W = S::W;
  for (int64_t j = 0; j < count; ++j) {
    float* row = scores + j * stride;
    typename S::V vmax = S::set1(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + W <= n; t += W) vmax = S::max(vmax, S::load(row + t));
    float m = S::hmax(vmax);
    for (; t < n; ++t) m = std::max(m, row[t]);
    const typename S::V vm = S::set1(m);
    typename S::V vsum = S::zero();
    for (t = 0; t + W <= n; t += W) {
      const typename S::V e = S::exp(S::sub(S::load(row + t), vm));
      S::store(row + t, e);
      vsum = S::add(vsum, e);
    }
    float sum = S::hsum(vsum);
    if (t < n) {
      const typename S::V e = S::exp(S::sub(S::load_n(row + t, n - t), vm));
      S::store_n(row + t, e, n - t);
      float tail[64];
      S::store_n(tail, e, n - t);
      for (int64_t i = 0; i < n - t; ++i) sum += tail[i];
    }
    sums[j] = sum;
  }
}

// Generic path (any head_dim; the scalar build): plain loops.
template <class S>
void attend_group_generic(const Params& p, const float* q, int64_t group, const float* key, const float* value,
                          int64_t n, float* scores, float* out) {
  const int64_t d = p.head_dim;
  for (int64_t j = 0; j < group; ++j)
    for (int64_t t = 0; t < n; ++t) {
      float acc = 0.0f;
      for (int64_t i = 0; i < d; ++i) acc += q[j * d + i] * key[t * d + i];
      scores[j * n + t] = acc;
    }
  for (int64_t j = 0; j < group; ++j) {
    float sum = 0.0f;
    exp_rows<S>(scores + j * n, 1, n, n, &sum);
    float* o = out + j * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t t = 0; t < n; ++t) {
      const float pr = scores[j * n + t];
      for (int64_t i = 0; i < d; ++i) o[i] += pr * value[t * d + i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

#if defined(__AVX512F__)
// head_dim = NV * 16; up to QC query heads at once (QC * NV <= 16 accumulators).
template <class S, int NV, int QC>
void attend_chunk_vec(const float* q, int qc, const float* key, const float* value, int64_t n, float* scores,
                      float* out) {
  constexpr int64_t d = NV * S::W;
  typename S::V qv[QC][NV];
  for (int j = 0; j < QC; ++j)
    for (int i = 0; i < NV; ++i) qv[j][i] = j < qc ? S::load(q + j * d + i * S::W) : S::zero();
  // The rows of one (row, kv head) are short streams (n * head_dim floats) that the hardware
  // prefetcher barely ramps up on: fetch keys kPrefetchRows ahead, and each value row while its
  // key is scored, so the second pass finds the values in cache.
  constexpr int64_t kPrefetchRows = 8;
  for (int64_t t = 0; t < std::min(n, kPrefetchRows); ++t)
    for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(key + t * d + c);
  for (int64_t t = 0; t < n; ++t) {
    if (t + kPrefetchRows < n)
      for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(key + (t + kPrefetchRows) * d + c);
    for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(value + t * d + c);
    typename S::V kv[NV];
    for (int i = 0; i < NV; ++i) kv[i] = S::load(key + t * d + i * S::W);
    for (int j = 0; j < QC; ++j) {
      if (j >= qc) break;
      typename S::V acc = S::mul(qv[j][0], kv[0]);
      for (int i = 1; i < NV; ++i) acc = S::fma(qv[j][i], kv[i], acc);
      scores[j * n + t] = S::hsum(acc);
    }
  }
  float sums[QC];
  exp_rows<S>(scores, qc, n, n, sums);
  typename S::V acc[QC][NV];
  for (int j = 0; j < QC; ++j)
    for (int i = 0; i < NV; ++i) acc[j][i] = S::zero();
  for (int64_t t = 0; t < n; ++t) {
    typename S::V vv[NV];
    for (int i = 0; i < NV; ++i) vv[i] = S::load(value + t * d + i * S::W);
    for (int j = 0; j < QC; ++j) {
      if (j >= qc) break;
      const typename S::V pr = S::set1(scores[j * n + t]);
      for (int i = 0; i < NV; ++i) acc[j][i] = S::fma(pr, vv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < qc; ++j) {
    const typename S::V inv = S::set1(1.0f / sums[j]);
    for (int i = 0; i < NV; ++i) S::store(out + j * d + i * S::W, S::mul(acc[j][i], inv));
  }
}

template <class S, int NV>
void attend_group_vec(const float* q, int64_t group, const float* key, const float* value, int64_t n, float* scores,
                      float* out) {
  constexpr int QC = 16 / NV;
  constexpr int64_t d = NV * S::W;
  for (int64_t j = 0; j < group; j += QC)
    attend_chunk_vec<S, NV, QC>(q + j * d, static_cast<int>(std::min<int64_t>(QC, group - j)), key, value, n, scores,
                                out + j * d);
}
#endif

template <class S>
void attend_impl(const Params& p, int64_t b, int64_t h, int64_t s0, int64_t s1, float* scratch) {
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  const int64_t start = first_position(p, b);
  const int64_t valid = std::min(p.seq, row_length(p, b) - start);
  const float* key = p.key + ((b * p.kv_heads + h) * p.cache_len) * d;
  const float* value = p.value + ((b * p.kv_heads + h) * p.cache_len) * d;
  float* q = scratch;
  float* scores = scratch + group * d;
  for (int64_t s = s0; s < s1; ++s) {
    float* out = p.out + ((b * p.seq + s) * p.heads + h * group) * d;
    if (s >= valid) {  // right padding of a first prompt
      std::fill(out, out + group * d, 0.0f);
      continue;
    }
    const int64_t pos = start + s, n = pos + 1;
    const float* row = qkv_row(p, b, s);
    for (int64_t j = 0; j < group; ++j) rotate_into(p, row + (h * group + j) * d, pos, p.scale, q + j * d);
#if defined(__AVX512F__)
    if (d == 16) { attend_group_vec<S, 1>(q, group, key, value, n, scores, out); continue; }
    if (d == 32) { attend_group_vec<S, 2>(q, group, key, value, n, scores, out); continue; }
    if (d == 64) { attend_group_vec<S, 4>(q, group, key, value, n, scores, out); continue; }
    if (d == 128) { attend_group_vec<S, 8>(q, group, key, value, n, scores, out); continue; }
#endif
    attend_group_generic<S>(p, q, group, key, value, n, scores, out);
  }
}

}  // namespace
}  // namespace rag_engine::attention
