// Portable scalar scoring path (any CPU; also the oracle for the SIMD paths).
#include "score_tile_impl.h"
#include "simd_math.h"

namespace rag_engine {
namespace {

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
  static V load(const F16* p) { return half_bits_to_float(p->bits); }
  static V load(const int8_t* p) { return static_cast<float>(*p); }
};

}  // namespace

ScoreTileFn score_tile_scalar() { return &score_tile<Scalar>; }

}  // namespace rag_engine
