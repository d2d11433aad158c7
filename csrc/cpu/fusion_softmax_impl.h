// fusion_softmax kernels written once over a SIMD traits type S (simd_math.h)
// and compiled per ISA by fusion_softmax_{scalar,avx2,avx512}.cpp. Only
// templates in an anonymous namespace: nothing here is shared across ISAs.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

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

// A block of up to S::kDocBlock documents shares each u load, and the
// accumulator is read and written once per block instead of once per document
// (as in flash-attention's tiles); the rows kLookahead blocks ahead are
// prefetched meanwhile (gathered rows are scattered over the corpus).
constexpr int kMaxBlock = 8;
constexpr int kLookahead = 1;  // blocks

template <class T>
struct Slot {
  const T* x;
  float scale;
  int64_t j;  // slot within its batch row
};

// s[i] = <u, x_i> for N rows, two FMA chains per row; prefetches the `ahead` rows
// (only gathered rows: dense rows are sequential and the hardware prefetcher has them).
template <class S, int N, class T>
inline void dot_block(const float* u, const Slot<T>* slot, int64_t d, const Slot<T>* ahead,
                      int nahead, float* s) {
  using V = typename S::V;
  constexpr int W = S::W;
  const T* x[N];
  const T* pf[kMaxBlock];
  for (int i = 0; i < N; ++i) x[i] = slot[i].x;
  for (int p = 0; p < nahead; ++p) pf[p] = ahead[p].x;
  V a0[N], a1[N];
  for (int i = 0; i < N; ++i) a0[i] = a1[i] = S::zero();
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    for (int p = 0; p < nahead; ++p) {  // 2W elements span one or two lines
      __builtin_prefetch(pf[p] + j, 0, 3);
      if (2 * W * sizeof(T) > 64) __builtin_prefetch(pf[p] + j + W, 0, 3);
    }
    const V u0 = S::load(u + j), u1 = S::load(u + j + W);
    for (int i = 0; i < N; ++i) {
      a0[i] = S::fma(u0, S::load(x[i] + j), a0[i]);
      a1[i] = S::fma(u1, S::load(x[i] + j + W), a1[i]);
    }
  }
  for (int p = 0; p < nahead; ++p)
    if (j < d) __builtin_prefetch(pf[p] + j, 0, 3);
  for (; j < d; j += W) {
    const int64_t n = d - j < W ? d - j : W;
    const V uv = S::load_n(u + j, n);
    for (int i = 0; i < N; ++i) a0[i] = S::fma(uv, S::load_n(x[i] + j, n), a0[i]);
  }
  for (int i = 0; i < N; ++i) s[i] = S::hsum(S::add(a0[i], a1[i])) * slot[i].scale;
}

// How a block updates the accumulator: the first block of a row writes it
// (no zero-fill pass), later ones add, rescaling first when the max grew.
enum AccMode : int { kAccInit = 0, kAccAdd = 1, kAccScale = 2 };

// acc = [corr * acc +] Σ_i c[i] x_i per kMode; the x_i come from L1.
template <class S, int N, int kMode, class T>
inline void axpy_block(float* __restrict acc, float corr, const float* c, const Slot<T>* slot, int64_t d) {
  using V = typename S::V;
  constexpr int W = S::W;
  const T* x[N];
  V cv[N];
  for (int i = 0; i < N; ++i) {
    x[i] = slot[i].x;
    cv[i] = S::set1(c[i]);
  }
  const V corr_v = S::set1(corr);
  for (int64_t j = 0; j < d; j += W) {
    const int64_t n = d - j < W ? d - j : W;
    const bool full = n == W;
    V v = S::zero();
    if (kMode != kAccInit) v = full ? S::load(acc + j) : S::load_n(acc + j, n);
    if (kMode == kAccScale) v = S::mul(v, corr_v);
    for (int i = 0; i < N; ++i) v = S::fma(cv[i], full ? S::load(x[i] + j) : S::load_n(x[i] + j, n), v);
    if (full) S::store(acc + j, v);
    else S::store_n(acc + j, v, n);
  }
}

// The accumulate over fp32 rows that all start `off` floats past a 64-byte line
// (numpy rows are 16-byte aligned, and a 64-byte load across two lines costs two
// L1 accesses: the accumulate, which reads its rows from L1, ran at a third of the
// speed). Each row is read as whole aligned vectors from x - off, and the sums go
// to an aligned scratch `acc` laid out the same way (element j at acc[off + j]);
// lanes outside the row read the neighbouring bytes of the same cache lines (never
// another page) and their sums are discarded. Each element gets the FMA sequence
// of axpy_block, so the bits do not depend on the addresses.
template <class S, int N, int kMode>
inline void axpy_block_lines(float* __restrict acc, float corr, const float* c, const Slot<float>* slot,
                             int64_t nvec, int64_t off, float* __restrict out, int64_t d) {
  using V = typename S::V;
  constexpr int W = S::W;
  const float* x[N];
  V cv[N];
  for (int i = 0; i < N; ++i) {
    x[i] = slot[i].x - off;
    cv[i] = S::set1(c[i]);
  }
  const V corr_v = S::set1(corr);
  // out: the row's last block writes its sums straight to out (element j at out[j]),
  // the edge vectors through masks so that nothing outside the row is written.
  float* o = out == nullptr ? nullptr : out - off;
  for (int64_t t = 0; t < nvec * W; t += W) {
    V v = kMode == kAccInit ? S::zero() : S::load_aligned(acc + t);
    if (kMode == kAccScale) v = S::mul(v, corr_v);
    for (int i = 0; i < N; ++i) v = S::fma(cv[i], S::load_aligned(x[i] + t), v);
    if (o == nullptr) S::store_aligned(acc + t, v);
    else if (t == 0 || t + W > off + d) S::store_lanes(o + t, v, t == 0 ? off : 0, off + d - t < W ? off + d - t : W);
    else S::store(o + t, v);
  }
}

template <class S, int kMode, int M>
inline void block_accumulate_lines(int n, float* acc, float corr, const float* c, const Slot<float>* slot,
                                   int64_t nvec, int64_t off, float* out, int64_t d) {
  if constexpr (M > 0) {
    if (n == M) axpy_block_lines<S, M, kMode>(acc, corr, c, slot, nvec, off, out, d);
    else block_accumulate_lines<S, kMode, M - 1>(n, acc, corr, c, slot, nvec, off, out, d);
  }
}

// The misalignment (floats past a 64-byte line) shared by every fp32 row of
// slots [p0, p1), or -1.
template <class S, class T>
inline int64_t shared_line_offset(const Slot<T>* slot, int64_t p0, int64_t p1) {
  if constexpr (S::kWholeLines && std::is_same_v<T, float>) {
    const auto addr = [&](int64_t p) { return reinterpret_cast<uintptr_t>(slot[p].x); };
    if (p0 >= p1 || addr(p0) % sizeof(float) != 0) return -1;
    const uintptr_t line = addr(p0) % 64;
    for (int64_t p = p0 + 1; p < p1; ++p)
      if (addr(p) % 64 != line) return -1;
    return static_cast<int64_t>(line / sizeof(float));
  } else {
    (void)slot;
    (void)p0;
    (void)p1;
    return -1;
  }
}

// Run the block kernel instantiated for exactly n (<= M) documents.
template <class S, class T, int M>
inline void block_step(int n, const float* u, const Slot<T>* slot, int64_t d, const Slot<T>* ahead,
                       int nahead, float* s) {
  if constexpr (M > 0) {
    if (n == M) dot_block<S, M>(u, slot, d, ahead, nahead, s);
    else block_step<S, T, M - 1>(n, u, slot, d, ahead, nahead, s);
  }
}

template <class S, int kMode, class T, int M>
inline void block_accumulate(int n, float* acc, float corr, const float* c, const Slot<T>* slot, int64_t d) {
  if constexpr (M > 0) {
    if (n == M) axpy_block<S, M, kMode>(acc, corr, c, slot, d);
    else block_accumulate<S, kMode, T, M - 1>(n, acc, corr, c, slot, d);
  }
}

// x[i] = exp(x[i] - shift) for i < n, vectorised (exp(-inf) = 0: masked slots).
template <class S>
inline void exp_shifted(float* x, int64_t n, float shift) {
  constexpr int W = S::W;
  const typename S::V sh = S::set1(shift);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t cnt = n - i < W ? n - i : W;
    S::store_n(x + i, S::exp(S::sub(S::load_n_or(x + i, cnt, -std::numeric_limits<float>::infinity()), sh)), cnt);
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

// Batch rows [b0, b1): for each, one pass over its valid documents in blocks
// with an online softmax (running max m and normaliser l; the accumulator is
// rescaled only when a block raises the max). alpha holds raw scores until
// the end. Returns -1 or the flat slot b * k + j of the first non-finite score.
template <class S, class T>
int64_t fusion_rows_typed(const FusionSoftmaxArgs& a, const float* u_all, int64_t b0, int64_t b1) {
  const int64_t d = a.d, k = a.k;
  const T* base = static_cast<const T*>(a.docs);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // Valid slots of all rows in order, so the prefetch runs ahead across rows.
  std::vector<Slot<T>> slots;
  std::vector<int64_t> first(static_cast<size_t>(b1 - b0 + 1));
  slots.reserve(static_cast<size_t>((b1 - b0) * k));
  for (int64_t b = b0; b < b1; ++b) {
    first[static_cast<size_t>(b - b0)] = static_cast<int64_t>(slots.size());
    for (int64_t j = 0; j < k; ++j) {
      const int64_t f = b * k + j;
      const bool valid = (a.mask == nullptr || a.mask[f]) && (a.ids == nullptr || a.ids[f] >= 0);
      a.alpha[f] = kNegInf;
      if (!valid) continue;
      const int64_t row = a.ids != nullptr ? a.ids[f] : f;
      slots.push_back({base + row * d, a.scales != nullptr ? a.scales[row] : 1.0f, j});
    }
  }
  first.back() = static_cast<int64_t>(slots.size());
  const int64_t nslots = first.back();
  // Aligned accumulator for rows whose documents share a line offset (whole-line reads).
  constexpr int64_t kLineFloats = 64 / sizeof(float);
  std::vector<float> lines_buf;
  float* lines = nullptr;
  if constexpr (S::kWholeLines && std::is_same_v<T, float>) {
    lines_buf.resize(static_cast<size_t>(d + 3 * kLineFloats));
    const uintptr_t base_addr = reinterpret_cast<uintptr_t>(lines_buf.data());
    lines = lines_buf.data() + ((64 - base_addr % 64) % 64) / sizeof(float);
  }

  for (int64_t b = b0; b < b1; ++b) {
    const float* u = u_all + b * d;
    float* alpha = a.alpha + b * k;
    float* h = a.h_aug + b * d;
    float m = kNegInf, l = 0.0f;
    const int64_t begin = first[static_cast<size_t>(b - b0)], end = first[static_cast<size_t>(b - b0 + 1)];
    if (begin == end)
      for (int64_t j = 0; j < d; ++j) h[j] = 0.0f;  // every slot masked: h_aug = 0
    const int64_t off = lines != nullptr ? shared_line_offset<S>(slots.data(), begin, end) : -1;
    const int64_t nvec = (off + d + S::W - 1) / S::W;  // whole vectors from the line start
    constexpr int kB = S::kDocBlock;
    for (int64_t p = begin; p < end; p += kB) {
      const int n = static_cast<int>(end - p < kB ? end - p : kB);
      const int64_t q = p + kLookahead * kB;
      const int nahead = a.ids == nullptr || q >= nslots ? 0 : static_cast<int>(nslots - q < kB ? nslots - q : kB);
      float s[kB], c[kB];
      block_step<S, T, kB>(n, u, slots.data() + p, d, slots.data() + (q < nslots ? q : 0), nahead, s);
      float bm = kNegInf;
      for (int i = 0; i < n; ++i) {
        if (!__builtin_isfinite(s[i])) return b * k + slots[static_cast<size_t>(p + i)].j;
        alpha[slots[static_cast<size_t>(p + i)].j] = s[i];
        bm = s[i] > bm ? s[i] : bm;
      }
      const float corr = bm > m ? ::expf(m - bm) : 1.0f;  // old terms shrink when the max grows
      m = bm > m ? bm : m;
      for (int i = 0; i < n; ++i) c[i] = s[i];
      exp_shifted<S>(c, n, m);
      l *= corr;
      for (int i = 0; i < n; ++i) l += c[i];
      // The last block also applies the final 1/l, folded into its coefficients.
      const float post = p + kB >= end ? 1.0f / l : 1.0f;
      for (int i = 0; i < n; ++i) c[i] *= slots[static_cast<size_t>(p + i)].scale * post;
      const float corr_post = corr * post;
      if constexpr (S::kWholeLines && std::is_same_v<T, float>) {
        if (off >= 0) {
          const auto* sl = slots.data() + p;
          float* o = p + kB >= end ? h : nullptr;  // the last block writes h_aug itself
          if (p == begin) block_accumulate_lines<S, kAccInit, kB>(n, lines, corr_post, c, sl, nvec, off, o, d);
          else if (corr_post != 1.0f)
            block_accumulate_lines<S, kAccScale, kB>(n, lines, corr_post, c, sl, nvec, off, o, d);
          else block_accumulate_lines<S, kAccAdd, kB>(n, lines, corr_post, c, sl, nvec, off, o, d);
          continue;
        }
      }
      if (p == begin) block_accumulate<S, kAccInit, T, kB>(n, h, corr_post, c, slots.data() + p, d);
      else if (corr_post != 1.0f) block_accumulate<S, kAccScale, T, kB>(n, h, corr_post, c, slots.data() + p, d);
      else block_accumulate<S, kAccAdd, T, kB>(n, h, corr_post, c, slots.data() + p, d);
    }
    float* scores = a.scores != nullptr ? a.scores + b * k : nullptr;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // l == 0: every slot masked -> zeros
    if (scores != nullptr)
      for (int64_t j = 0; j < k; ++j) scores[j] = alpha[j];
    exp_shifted<S>(alpha, k, m == kNegInf ? 0.0f : m);  // masked: exp(-inf) = 0
    if (l > 0.0f) scale_row<S>(alpha, inv, k);
  }
  return -1;
}

template <class S>
int64_t fusion_rows(const FusionSoftmaxArgs& a, const float* u, int64_t b0, int64_t b1) {
  switch (a.dtype) {
    case DType::kF32: return fusion_rows_typed<S, float>(a, u, b0, b1);
    case DType::kBF16: return fusion_rows_typed<S, Bf16Bits>(a, u, b0, b1);
    case DType::kF16: return fusion_rows_typed<S, F16Bits>(a, u, b0, b1);
    case DType::kI8: return fusion_rows_typed<S, int8_t>(a, u, b0, b1);
  }
  return -1;
}

template <class S>
FusionKernels make_fusion_kernels() {
  return FusionKernels{&gemm_cols<S>, int64_t{S::kGemmVecs} * S::W, &fusion_rows<S>};
}

}  // namespace
}  // namespace rag_engine
