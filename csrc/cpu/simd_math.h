// SIMD traits with vectorised exp/log for the fusion_softmax and rag_token_marg
// kernels. Each ISA's struct exists only in the translation unit compiled with
// that ISA's flags (see CMakeLists.txt), and everything lives in an anonymous
// namespace so no inline function compiled for AVX-512 can be picked by the
// linker for a scalar path.
//
// exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and a degree-6
// minimax polynomial (about 1 ulp on [-87, 88]); exp(-inf) = 0 exactly and NaN
// propagates (the kernels rely on both: padded entries and NaN detection).
// log: Cephes logf on the mantissa in [sqrt(1/2), sqrt(2)) (about 1 ulp), for
// positive normal inputs only (the kernels never pass anything else).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rag_engine {
namespace {

// Storage types of document rows (bits only; widened to fp32 on load).
struct Bf16Bits { uint16_t bits; };
struct F16Bits { uint16_t bits; };

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;      // ln2 split in two for exact n*ln2
constexpr float kLn2Lo = -2.12194440e-4f;
// e^r ~ 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3 + c6 r^4): a relative-error minimax fit
// on [-ln2/2, ln2/2] (3.1e-9), 0.71 ulp in float32 Horner with FMAs: six FMAs.
constexpr float kExpC2 = 0.49999994f, kExpC3 = 0.16666521f, kExpC4 = 0.04166839f, kExpC5 = 0.008368705f,
                kExpC6 = 0.0013814588f;
constexpr float kLogP[9] = {7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f,
                            -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                            2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f};
constexpr float kSqrt2 = 1.41421356237f;

// Shared polynomial parts, written over the traits' arithmetic.
template <class S>
inline typename S::V exp_poly(typename S::V r) {  // e^r for |r| <= ln2/2
  using V = typename S::V;
  V p = S::fma(S::set1(kExpC6), r, S::set1(kExpC5));
  p = S::fma(p, r, S::set1(kExpC4));
  p = S::fma(p, r, S::set1(kExpC3));
  p = S::fma(p, r, S::set1(kExpC2));
  p = S::fma(p, r, S::set1(1.0f));
  return S::fma(p, r, S::set1(1.0f));
}

template <class S>
inline typename S::V log1p_poly(typename S::V f, typename S::V e) {  // log((1 + f) 2^e)
  using V = typename S::V;
  V p = S::set1(kLogP[0]);
  for (int i = 1; i < 9; ++i) p = S::fma(p, f, S::set1(kLogP[i]));
  const V z = S::mul(f, f);
  V y = S::mul(S::mul(p, f), z);
  y = S::fma(e, S::set1(kLn2Lo), y);
  y = S::fma(S::set1(-0.5f), z, y);
  return S::fma(e, S::set1(kLn2Hi), S::add(f, y));
}

#if defined(__AVX512F__)
struct SimdAvx512 {
  using V = __m512;
  static constexpr int W = 16;
  static constexpr int kGemmRows = 8;   // u = h W: 8 rows x 3 vectors = 24 accumulators
  static constexpr int kGemmVecs = 3;
  static constexpr int kDocBlock = 8;   // fusion: 8 documents x 2 chains = 16 accumulators
  static constexpr bool kWholeLines = true;  // fusion: aligned whole-vector row reads (see fusion_softmax_impl.h)
  static __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
  static bool all_gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) == 0xffff; }  // NaN: false
  static V gt_select(V a, V b, V x, V y) {  // a > b ? x : y
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), y, x);
  }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const Bf16Bits* p) {  // bf16 -> fp32 is exact: the bits move to the top half
    return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load(const F16Bits* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static V load(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // First n (< W) elements, the rest zero; masked loads never touch memory past p + n.
  static V load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail_mask(n), p); }
  static V load_n_or(const float* p, int64_t n, float fill) {  // lanes >= n hold `fill`
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(n), p);
  }
  static V load_n(const Bf16Bits* p, int64_t n) {
    return widen_bf16(_mm256_maskz_loadu_epi16(tail_mask(n), p));
  }
  static V load_n(const F16Bits* p, int64_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(tail_mask(n), p));
  }
  static V load_n(const int8_t* p, int64_t n) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask(n), p)));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store_n(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, tail_mask(n), v); }
  static V load_aligned(const float* p) { return _mm512_load_ps(p); }
  static void store_lanes(float* p, V v, int64_t lo, int64_t hi) {  // lanes lo <= l < hi only
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(tail_mask(hi) & ~tail_mask(lo)), v);
  }
  static void store_aligned(float* p, V v) { _mm512_store_ps(p, v); }
  static V exp(V x) {
    // Clamp first (operand order keeps NaN); scalef turns 2^n into 0/denormal/inf exactly.
    return exp_nonpos(_mm512_min_ps(_mm512_set1_ps(89.0f), x));
  }
  static V exp_nonpos(V x) {  // exp for x <= 89 (or NaN): no upper clamp needed
    x = _mm512_max_ps(_mm512_set1_ps(-110.0f), x);
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    return _mm512_scalef_ps(exp_poly<SimdAvx512>(r), n);
  }
  static V log(V x) {
    V m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);  // [1, 2)
    V e = _mm512_getexp_ps(x);
    const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kSqrt2), _CMP_GT_OQ);
    m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
    e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.0f));
    return log1p_poly<SimdAvx512>(_mm512_sub_ps(m, _mm512_set1_ps(1.0f)), e);
  }

 private:
  static V widen_bf16(__m256i w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
  }
};
#endif  // __AVX512F__

#if defined(__AVX2__) && !defined(__AVX512F__)
struct SimdAvx2 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kGemmRows = 4;   // 4 x 3 accumulators + 3 loads + 1 broadcast = 16 ymm
  static constexpr int kGemmVecs = 3;
  static constexpr int kDocBlock = 4;   // 4 x 2 accumulators + 2 u + loads fit 16 ymm
  static constexpr bool kWholeLines = false;
  static __m256i tail_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static V gt_select(V a, V b, V x, V y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
  static bool all_gt(V a, V b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_GT_OQ)) == 0xff; }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const Bf16Bits* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V load(const F16Bits* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static V load(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static V load_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, tail_mask(n)); }
  static V load_n_or(const float* p, int64_t n, float fill) {
    const __m256i m = tail_mask(n);
    return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
  }
  template <class T>
  static V load_n(const T* p, int64_t n) {  // 16-/8-bit rows: through a zeroed buffer
    T tmp[W];
    std::memset(static_cast<void*>(tmp), 0, sizeof(tmp));
    std::memcpy(static_cast<void*>(tmp), p, static_cast<size_t>(n) * sizeof(T));
    return load(tmp);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store_n(float* p, V v, int64_t n) { _mm256_maskstore_ps(p, tail_mask(n), v); }
  static V exp(V x) { return exp_nonpos(_mm256_min_ps(_mm256_set1_ps(88.3f), x)); }
  static V exp_nonpos(V x) {  // exp for x <= 88.3 (or NaN)
    // 2^n is built in the exponent field, valid for n >= -126: below -87.3 the
    // result is set to 0 (the exact answer is < 1.2e-38).
    const V lo = _mm256_set1_ps(-87.3f);
    const V under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x);
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V y = _mm256_mul_ps(exp_poly<SimdAvx2>(r), _mm256_castsi256_ps(bits));
    return _mm256_andnot_ps(under, y);
  }
  static V log(V x) {
    const __m256i xi = _mm256_castps_si256(x);
    V e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
    V m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x7fffff)),
                                              _mm256_set1_epi32(0x3f800000)));  // [1, 2)
    const V big = _mm256_cmp_ps(m, _mm256_set1_ps(kSqrt2), _CMP_GT_OQ);
    m = _mm256_blendv_ps(m, _mm256_mul_ps(m, _mm256_set1_ps(0.5f)), big);
    e = _mm256_add_ps(e, _mm256_and_ps(big, _mm256_set1_ps(1.0f)));
    return log1p_poly<SimdAvx2>(_mm256_sub_ps(m, _mm256_set1_ps(1.0f)), e);
  }
};
#endif  // __AVX2__ only

#if !defined(__AVX2__) && !defined(__AVX512F__)
// Half bits -> float: move exponent and mantissa into fp32 position and rebias
// the exponent by multiplying with 2^112 (exact, subnormal halves included).
inline float half_bits_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  f *= 0x1p112f;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((h & 0x7c00u) == 0x7c00u) bits = 0x7f800000u | (static_cast<uint32_t>(h & 0x3ffu) << 13);  // Inf/NaN
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Portable path: one lane, libm exp/log (also the oracle the SIMD paths are tested against).
struct SimdScalar {
  using V = float;
  static constexpr int W = 1;
  static constexpr int kGemmRows = 4;
  static constexpr int kGemmVecs = 4;
  static constexpr int kDocBlock = 4;
  static constexpr bool kWholeLines = false;
  static V zero() { return 0.0f; }
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V max(V a, V b) { return a > b ? a : b; }
  static float hsum(V v) { return v; }
  static float hmax(V v) { return v; }
  static V gt_select(V a, V b, V x, V y) { return a > b ? x : y; }
  static bool all_gt(V a, V b) { return a > b; }
  static V load(const float* p) { return *p; }
  static V load(const Bf16Bits* p) {
    const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static V load(const F16Bits* p) { return half_bits_to_float(p->bits); }
  static V load(const int8_t* p) { return static_cast<float>(*p); }
  template <class T>
  static V load_n(const T* p, int64_t n) { return n > 0 ? load(p) : 0.0f; }
  static V load_n_or(const float* p, int64_t n, float fill) { return n > 0 ? *p : fill; }
  static void store(float* p, V v) { *p = v; }
  static void store_n(float* p, V v, int64_t n) {
    if (n > 0) *p = v;
  }
  static V exp(V x) { return std::exp(x); }
  static V exp_nonpos(V x) { return std::exp(x); }
  static V log(V x) { return std::log(x); }
};
#endif  // scalar

}  // namespace
}  // namespace rag_engine
