#include "ort_kernel.h"

#include <cstdlib>

namespace rag_engine::ort {

const Api* g_api = nullptr;

Status* make_status(const char* op, int code, const std::string& msg) {
  using Fn = Status* (*)(int, const char*);
  return api_fn<Fn>(g_api, kCreateStatus)(code, (std::string(op) + ": " + msg).c_str());
}

void fail(const char* op, const std::string& msg) { throw Error{make_status(op, kInvalidArgument, msg)}; }

void check(Status* status) {
  if (status != nullptr) throw Error{status};
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::string Tensor::shape() const { return shape_str(dims); }

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

Tensor input(const char* op, KernelContext* ctx, size_t index, bool required) {
  Tensor t;
  check(api_fn<Status* (*)(const KernelContext*, size_t, const Value**)>(g_api, kKernelContextGetInput)(ctx, index, &t.value));
  if (t.value == nullptr) {
    if (required) fail(op, "input " + std::to_string(index) + " is missing");
    return t;
  }
  TensorInfo* info = nullptr;
  check(api_fn<Status* (*)(const Value*, TensorInfo**)>(g_api, kGetTensorTypeAndShape)(t.value, &info));
  size_t count = 0;
  Status* st = api_fn<Status* (*)(const TensorInfo*, size_t*)>(g_api, kGetDimensionsCount)(info, &count);
  t.dims.resize(count);
  if (st == nullptr)
    st = api_fn<Status* (*)(const TensorInfo*, int64_t*, size_t)>(g_api, kGetDimensions)(info, t.dims.data(), count);
  if (st == nullptr) st = api_fn<Status* (*)(const TensorInfo*, int*)>(g_api, kGetTensorElementType)(info, &t.type);
  api_fn<void (*)(TensorInfo*)>(g_api, kReleaseTensorTypeAndShapeInfo)(info);
  check(st);
  check(api_fn<Status* (*)(Value*, void**)>(g_api, kGetTensorMutableData)(const_cast<Value*>(t.value), &t.data));
  return t;
}

void* output(KernelContext* ctx, size_t index, const std::vector<int64_t>& dims) {
  Value* value = nullptr;
  using GetOutput = Status* (*)(KernelContext*, size_t, const int64_t*, size_t, Value**);
  check(api_fn<GetOutput>(g_api, kKernelContextGetOutput)(ctx, index, dims.data(), dims.size(), &value));
  void* data = nullptr;
  check(api_fn<Status* (*)(Value*, void**)>(g_api, kGetTensorMutableData)(value, &data));
  return data;
}

template <class T>
static T attribute(const char* op, const KernelInfo* info, const char* name, std::optional<T> fallback, Slot slot,
                   const char* type) {
  T value{};
  Status* st = api_fn<Status* (*)(const KernelInfo*, const char*, T*)>(g_api, slot)(info, name, &value);
  if (st == nullptr) return value;
  api_fn<void (*)(Status*)>(g_api, kReleaseStatus)(st);
  if (fallback) return *fallback;
  fail(op, std::string("the node needs the ") + type + " attribute '" + name + "'");
}

int64_t attribute_int(const char* op, const KernelInfo* info, const char* name, std::optional<int64_t> fallback) {
  return attribute<int64_t>(op, info, name, fallback, kKernelInfoGetAttributeInt64, "int");
}

float attribute_float(const char* op, const KernelInfo* info, const char* name, std::optional<float> fallback) {
  return attribute<float>(op, info, name, fallback, kKernelInfoGetAttributeFloat, "float");
}

bool use_avx512(bool vnni) {
#if defined(__x86_64__)
  static const bool avx512 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  static const bool has_vnni = avx512 && __builtin_cpu_supports("avx512vnni");
  const char* env = std::getenv("RAG_ENGINE_ISA");
  const bool lower = env != nullptr && (std::string(env) == "scalar" || std::string(env) == "avx2");
  return (vnni ? has_vnni : avx512) && !lower;
#else
  (void)vnni;
  return false;
#endif
}

bool swiglu_attribute(const char* op, const KernelInfo* info, int64_t n) {
  const bool swiglu = attribute_int(op, info, "swiglu", 0) != 0;
  if (swiglu && n % 32 != 0)
    fail(op, "swiglu=1 needs N (gate and up columns, in pairs of 16) to be a multiple of 32, got N=" +
                 std::to_string(n));
  return swiglu;
}

void parallel_for(KernelContext* ctx, void (*fn)(void*, size_t), size_t total, void* data) {
  if (total == 0) return;
  if (total == 1) return fn(data, 0);
  using Fn = Status* (*)(const KernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
  check(api_fn<Fn>(g_api, kKernelContextParallelFor)(ctx, fn, total, 0, data));
}

}  // namespace rag_engine::ort
