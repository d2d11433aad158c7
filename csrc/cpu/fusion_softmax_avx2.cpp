// fusion_softmax, avx2 path; compiled with -mavx2 -mfma -mf16c.
#include "fusion_softmax_impl.h"

namespace rag_engine {

FusionKernels fusion_kernels_avx2() { return make_fusion_kernels<SimdAvx2>(); }

}  // namespace rag_engine
