// rag_token_marg, avx512 path; compiled with -mavx512f -mavx512bw -mavx512vl -mfma -mf16c.
#include "rag_token_marg_impl.h"

namespace rag_engine {

MargKernels marg_kernels_avx512() { return make_marg_kernels<SimdAvx512>(); }

}  // namespace rag_engine
