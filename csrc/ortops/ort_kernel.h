// Helpers shared by rag_engine's ONNX Runtime ops: calls into the API table, typed errors
// that carry the op's name, and the OrtCustomOp a kernel class is registered through.
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <vector>

#include "ort_abi.h"

namespace rag_engine::ort {

constexpr const char* kDomain = "ai.rag_engine";

// Set once by RegisterCustomOps.
extern const Api* g_api;

// An ONNX Runtime status thrown through the kernel (turned back into a Status* at the API
// boundary).
struct Error {
  Status* status;
};

Status* make_status(const char* op, int code, const std::string& msg);
[[noreturn]] void fail(const char* op, const std::string& msg);  // ORT_INVALID_ARGUMENT
void check(Status* status);

struct Tensor {
  const Value* value = nullptr;
  std::vector<int64_t> dims;
  int type = 0;
  void* data = nullptr;
  int64_t numel() const;
  std::string shape() const;
};

// Input `index` (fail naming the op when it is required and missing; an absent optional
// input has value == nullptr).
Tensor input(const char* op, KernelContext* ctx, size_t index, bool required = true);
void* output(KernelContext* ctx, size_t index, const std::vector<int64_t>& dims);
// A node attribute; a missing one is `fallback` when given, else an error naming the op.
int64_t attribute_int(const char* op, const KernelInfo* info, const char* name,
                      std::optional<int64_t> fallback = std::nullopt);
float attribute_float(const char* op, const KernelInfo* info, const char* name,
                      std::optional<float> fallback = std::nullopt);
// Whether an op may take its AVX-512 path: the CPU has AVX-512 F/BW/VL (the flags every
// *_avx512.cpp here is built with), plus VNNI when `vnni`, and RAG_ENGINE_ISA does not ask
// for a lower path (scalar / avx2), as for rag_engine._C's kernels. Read at kernel creation.
bool use_avx512(bool vnni);

// The optional `swiglu` attribute of the GEMM ops (gemm_f32.h): with 1, the N columns are
// (gate, up) pairs of 16, so N must be a multiple of 32.
bool swiglu_attribute(const char* op, const KernelInfo* info, int64_t n);

// Runs fn(data, i) for i in [0, total) on the session's intra-op thread pool.
void parallel_for(KernelContext* ctx, void (*fn)(void*, size_t), size_t total, void* data);
std::string shape_str(const std::vector<int64_t>& dims);

// OrtCustomOp for a kernel class K with:
//   static constexpr const char* kName; static const int kInputTypes[]; kInputs, kOptionalFrom,
//   kOutputs; K(const KernelInfo*) (may throw Error); void compute(KernelContext*) (may throw).
template <class K>
CustomOp make_custom_op() {
  CustomOp op{};
  op.version = kOrtApiVersion;
  op.GetName = [](const CustomOp*) { return K::kName; };
  op.GetExecutionProviderType = [](const CustomOp*) { return "CPUExecutionProvider"; };
  op.GetInputType = [](const CustomOp*, size_t index) { return index < K::kInputs ? K::kInputTypes[index] : 0; };
  op.GetInputTypeCount = [](const CustomOp*) -> size_t { return K::kInputs; };
  op.GetOutputType = [](const CustomOp*, size_t) { return static_cast<int>(kFloat); };
  op.GetOutputTypeCount = [](const CustomOp*) -> size_t { return K::kOutputs; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<K*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t index) { return index >= K::kOptionalFrom ? 1 : 0; };
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return 0; };
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = [](const CustomOp*, const Api*, const KernelInfo* info, void** out) -> Status* {
    try {
      *out = new K(info);
      return nullptr;
    } catch (const Error& err) {
      return err.status;
    } catch (const std::exception& err) {
      return make_status(K::kName, kFail, err.what());
    }
  };
  op.KernelComputeV2 = [](void* kernel, KernelContext* ctx) -> Status* {
    try {
      static_cast<K*>(kernel)->compute(ctx);
      return nullptr;
    } catch (const Error& err) {
      return err.status;
    } catch (const std::exception& err) {
      return make_status(K::kName, kFail, err.what());
    }
  };
  op.GetStartVersion = [](const CustomOp*) { return 1; };
  op.GetEndVersion = [](const CustomOp*) { return 2147483647; };
  return op;
}

}  // namespace rag_engine::ort
