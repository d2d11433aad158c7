// rag_token_marg, avx2 path; compiled with -mavx2 -mfma -mf16c.
#include "rag_token_marg_impl.h"

namespace rag_engine {

MargKernels marg_kernels_avx2() { return make_marg_kernels<SimdAvx2>(); }

}  // namespace rag_engine
