// ONNX Runtime custom-op library (rag_engine/_ortops*.so): registers rag_engine's ops in the
// domain `ai.rag_engine`. Loaded with SessionOptions.register_custom_ops_library(path);
// ONNX Runtime calls RegisterCustomOps with its API base.
#include "ort_kernel.h"

namespace rag_engine {
namespace qgemm {
ort::CustomOp make_matmul_int8_block_op();
ort::CustomOp make_matmul_int4_block_op();
}
namespace attention {
ort::CustomOp make_decoder_attention_op();
}
namespace gemm_f32 {
ort::CustomOp make_matmul_f32_panels_op();
}
}  // namespace rag_engine

namespace {

using namespace rag_engine;

const ort::CustomOp g_ops[] = {qgemm::make_matmul_int8_block_op(), qgemm::make_matmul_int4_block_op(),
                               attention::make_decoder_attention_op(), gemm_f32::make_matmul_f32_panels_op()};

}  // namespace

extern "C" __attribute__((visibility("default"))) ort::Status* RegisterCustomOps(ort::SessionOptions* options,
                                                                                   const ort::ApiBase* base) {
  const ort::Api* api = base->GetApi(ort::kOrtApiVersion);
  if (api == nullptr) return nullptr;  // ONNX Runtime older than 1.17: it reports the ops as unknown
  ort::g_api = api;
  ort::CustomOpDomain* domain = nullptr;
  using CreateDomain = ort::Status* (*)(const char*, ort::CustomOpDomain**);
  using AddOp = ort::Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*);
  using AddDomain = ort::Status* (*)(ort::SessionOptions*, ort::CustomOpDomain*);
  if (ort::Status* st = ort::api_fn<CreateDomain>(api, ort::kCreateCustomOpDomain)(ort::kDomain, &domain)) return st;
  for (const ort::CustomOp& op : g_ops)
    if (ort::Status* st = ort::api_fn<AddOp>(api, ort::kCustomOpDomainAdd)(domain, &op)) return st;
  // The domain must outlive every session that uses it: it is never released.
  return ort::api_fn<AddDomain>(api, ort::kAddCustomOpDomain)(options, domain);
}
