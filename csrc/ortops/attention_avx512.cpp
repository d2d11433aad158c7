#include "attention_impl.h"

namespace rag_engine::attention {

void store_kv_avx512(const Params& p, int64_t b, int64_t h) { store_kv_impl<SimdAvx512>(p, b, h); }
void attend_avx512(const Params& p, int64_t b, int64_t h, int64_t s0, int64_t s1, float* scratch) {
  attend_impl<SimdAvx512>(p, b, h, s0, s1, scratch);
}

}  // namespace rag_engine::attention
