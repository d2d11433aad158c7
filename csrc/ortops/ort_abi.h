// The slice of ONNX Runtime's C ABI that a custom-op library needs.
//
// ONNX Runtime hands a custom-op library an `OrtApiBase*` in RegisterCustomOps;
// `GetApi(version)` returns the API table, a struct of function pointers that only ever
// grows at its end (the ABI is stable across releases). We call the few entries we use
// through their slot in that table, and describe `OrtCustomOp` (the struct ONNX Runtime
// reads an op's callbacks from), so the library builds without ONNX Runtime's headers
// and loads into any ONNX Runtime whose API version is at least kOrtApiVersion.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rag_engine::ort {

// Opaque ONNX Runtime handles.
struct Status;
struct Api;
struct KernelInfo;
struct KernelContext;
struct Value;
struct TensorInfo;
struct SessionOptions;
struct CustomOpDomain;

// API version requested from GetApi: KernelContext_ParallelFor appeared in 17 (1.17).
constexpr uint32_t kOrtApiVersion = 17;

struct ApiBase {
  const Api*(*GetApi)(uint32_t version);
  const char*(*GetVersionString)();
};

// ONNXTensorElementDataType values used here.
enum ElementType : int { kFloat = 1, kUint8 = 2, kInt8 = 3, kInt32 = 6, kInt64 = 7 };
// OrtErrorCode values used here.
enum ErrorCode : int { kFail = 1, kInvalidArgument = 2 };

// Slots of the API table (index of the function pointer in the struct).
enum Slot : size_t {
  kCreateStatus = 0,
  kGetErrorMessage = 2,
  kCreateCustomOpDomain = 26,
  kCustomOpDomainAdd = 27,
  kAddCustomOpDomain = 28,
  kGetTensorMutableData = 51,
  kGetTensorElementType = 60,
  kGetDimensionsCount = 61,
  kGetDimensions = 62,
  kGetTensorTypeAndShape = 65,
  kKernelInfoGetAttributeFloat = 85,
  kKernelInfoGetAttributeInt64 = 86,
  kKernelContextGetInputCount = 88,
  kKernelContextGetInput = 90,
  kKernelContextGetOutput = 91,
  kReleaseStatus = 93,
  kReleaseTensorTypeAndShapeInfo = 99,
  kKernelContextParallelFor = 274,
};

template <class Fn>
inline Fn api_fn(const Api* api, Slot slot) {
  return reinterpret_cast<Fn const*>(api)[slot];
}

// What ONNX Runtime reads an op's callbacks from; `version` caps which fields it reads
// (fields past the version's own are never touched). Layout of API version 20.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp* op, const Api* api, const KernelInfo* info);
  const char* (*GetName)(const CustomOp* op);
  const char* (*GetExecutionProviderType)(const CustomOp* op);
  int (*GetInputType)(const CustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const CustomOp* op);
  int (*GetOutputType)(const CustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const CustomOp* op);
  void (*KernelCompute)(void* kernel, KernelContext* context);
  void (*KernelDestroy)(void* kernel);
  int (*GetInputCharacteristic)(const CustomOp* op, size_t index);   // 0 = required
  int (*GetOutputCharacteristic)(const CustomOp* op, size_t index);
  int (*GetInputMemoryType)(const CustomOp* op, size_t index);       // 0 = default (CPU)
  int (*GetVariadicInputMinArity)(const CustomOp* op);
  int (*GetVariadicInputHomogeneity)(const CustomOp* op);
  int (*GetVariadicOutputMinArity)(const CustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const CustomOp* op);
  Status* (*CreateKernelV2)(const CustomOp* op, const Api* api, const KernelInfo* info, void** kernel);
  Status* (*KernelComputeV2)(void* kernel, KernelContext* context);
  Status* (*InferOutputShapeFn)(const CustomOp* op, void* shape_context);
  int (*GetStartVersion)(const CustomOp* op);
  int (*GetEndVersion)(const CustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // namespace rag_engine::ort
