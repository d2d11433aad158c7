// Portable scalar scoring path (any CPU; also the oracle for the SIMD paths).
#include <cmath>

#include "score_tile_impl.h"

namespace rag_engine {
namespace {

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h >> 15) << 31;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  float mag;
  if (exp == 0) mag = std::ldexp(static_cast<float>(mant), -24);                 // subnormal
  else if (exp == 31) mag = mant ? NAN : INFINITY;
  else mag = std::ldexp(static_cast<float>(mant | 0x400), exp - 25);
  uint32_t bits;
  std::memcpy(&bits, &mag, sizeof(bits));
  bits |= sign;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

struct Scalar {
  using V = float;
  static constexpr int W = 1;
  static constexpr int kRows = 4;
  static constexpr int kMaxQB = 6;
  static constexpr int kRowsQ1 = 4;
  static V zero() { return 0.0f; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static float hsum(V v) { return v; }
  static V load(const float* p) { return *p; }
  static V load(const Bf16* p) {
    const uint32_t bits = static_cast<uint32_t>(p->bits) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  }
  static V load(const F16* p) { return half_to_float(p->bits); }
  static V load(const int8_t* p) { return static_cast<float>(*p); }
};

}  // namespace

ScoreTileFn score_tile_scalar() { return &score_tile<Scalar>; }

}  // namespace rag_engine
