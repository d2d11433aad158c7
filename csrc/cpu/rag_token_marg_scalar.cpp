// rag_token_marg, scalar path; compiled with no ISA flags (any x86-64 or other CPU).
#include "rag_token_marg_impl.h"

namespace rag_engine {

MargKernels marg_kernels_scalar() { return make_marg_kernels<SimdScalar>(); }

}  // namespace rag_engine
