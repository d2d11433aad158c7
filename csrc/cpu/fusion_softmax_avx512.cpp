// fusion_softmax, avx512 path; compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c.
#include "fusion_softmax_impl.h"

namespace rag_engine {

FusionKernels fusion_kernels_avx512() { return make_fusion_kernels<SimdAvx512>(); }

}  // namespace rag_engine
