// fusion_softmax, scalar path; compiled with no ISA flags (any x86-64 or other CPU).
#include "fusion_softmax_impl.h"

namespace rag_engine {

FusionKernels fusion_kernels_scalar() { return make_fusion_kernels<SimdScalar>(); }

}  // namespace rag_engine
