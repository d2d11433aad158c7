// ONNX Runtime custom-op library: rag_engine's int8 block GEMM as the op
// `ai.rag_engine::MatMulInt8Block` (CPU).
//
//   inputs:  A fp32 [..., K]; q uint8 and scales fp32 in the layout of qgemm_int8.h
//   outputs: Y fp32 [..., N]
//   attributes: K, N, block_size
//
// Loaded with SessionOptions.register_custom_ops_library(path); ONNX Runtime calls
// RegisterCustomOps below. Work is shared out on the session's intra-op thread pool
// (KernelContext_ParallelFor), so the op follows the session's thread count.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "ort_abi.h"
#include "qgemm_int8.h"

namespace rag_engine::qgemm {

bool use_avx512_vnni() {
#if defined(__x86_64__)
  static const bool cpu = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  const char* env = std::getenv("RAG_ENGINE_ISA");
  const bool forced_lower = env != nullptr && (std::string(env) == "scalar" || std::string(env) == "avx2");
  return cpu && !forced_lower;
#else
  return false;
#endif
}

}  // namespace rag_engine::qgemm

namespace {

using namespace rag_engine;
using ort::Api;
using ort::Slot;
using ort::Status;

constexpr const char* kDomain = "ai.rag_engine";
constexpr const char* kOpName = "MatMulInt8Block";
// 64 columns a task: measured (30 x 576x3072, 2 threads) against 32, 128 and 256 columns
// and against two contiguous halves, 4 groups was fastest at M = 1 and M = 8.
constexpr int64_t kGroupsPerTask = 4;

const Api* g_api = nullptr;

Status* make_status(int code, const std::string& msg) {
  using Fn = Status* (*)(int, const char*);
  return ort::api_fn<Fn>(g_api, ort::kCreateStatus)(code, (std::string(kOpName) + ": " + msg).c_str());
}

// Throws the ONNX Runtime status as a C++ exception carrying the Status* (caught in compute).
struct OrtError {
  Status* status;
};

void check(Status* status) {
  if (status != nullptr) throw OrtError{status};
}

std::vector<int64_t> dims_of(const ort::Value* value, int* type) {
  ort::TensorInfo* info = nullptr;
  check(ort::api_fn<Status* (*)(const ort::Value*, ort::TensorInfo**)>(g_api, ort::kGetTensorTypeAndShape)(value, &info));
  size_t count = 0;
  Status* st = ort::api_fn<Status* (*)(const ort::TensorInfo*, size_t*)>(g_api, ort::kGetDimensionsCount)(info, &count);
  std::vector<int64_t> dims(count);
  if (st == nullptr)
    st = ort::api_fn<Status* (*)(const ort::TensorInfo*, int64_t*, size_t)>(g_api, ort::kGetDimensions)(info, dims.data(), count);
  if (st == nullptr)
    st = ort::api_fn<Status* (*)(const ort::TensorInfo*, int*)>(g_api, ort::kGetTensorElementType)(info, type);
  ort::api_fn<void (*)(ort::TensorInfo*)>(g_api, ort::kReleaseTensorTypeAndShapeInfo)(info);
  check(st);
  return dims;
}

const ort::Value* input(ort::KernelContext* ctx, size_t index) {
  const ort::Value* value = nullptr;
  check(ort::api_fn<Status* (*)(const ort::KernelContext*, size_t, const ort::Value**)>(g_api, ort::kKernelContextGetInput)(ctx, index, &value));
  if (value == nullptr) throw OrtError{make_status(ort::kInvalidArgument, "input " + std::to_string(index) + " is missing")};
  return value;
}

void* data_of(const ort::Value* value) {
  void* data = nullptr;
  check(ort::api_fn<Status* (*)(ort::Value*, void**)>(g_api, ort::kGetTensorMutableData)(const_cast<ort::Value*>(value), &data));
  return data;
}

int64_t numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

struct Kernel {
  int64_t k = 0, n = 0, block = 0, groups = 0, blocks = 0;
  bool vnni = false;
};

struct Task {
  const qgemm::Weights* w;
  const qgemm::Activations* a;
  const float* x;
  float* y;
  int64_t rows_per_task;
  bool vnni;
};

void run_gemm_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t g0 = static_cast<int64_t>(index) * kGroupsPerTask;
  const int64_t g1 = std::min(t.w->groups, g0 + kGroupsPerTask);
  if (t.vnni)
    qgemm::gemm_groups_avx512(*t.w, *t.a, g0, g1, t.y);
  else
    qgemm::gemm_groups_scalar(*t.w, *t.a, g0, g1, t.y);
}

void run_quantize_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t m0 = static_cast<int64_t>(index) * t.rows_per_task;
  const int64_t m1 = std::min(t.a->m, m0 + t.rows_per_task);
  if (t.vnni)
    qgemm::quantize_rows_avx512(t.x, m0, m1, *t.w, *t.a);
  else
    qgemm::quantize_rows_scalar(t.x, m0, m1, *t.w, *t.a);
}

void parallel_for(ort::KernelContext* ctx, void (*fn)(void*, size_t), size_t total, Task* task) {
  if (total == 1) return fn(task, 0);
  using Fn = Status* (*)(const ort::KernelContext*, void (*)(void*, size_t), size_t, size_t, void*);
  check(ort::api_fn<Fn>(g_api, ort::kKernelContextParallelFor)(ctx, fn, total, 0, task));
}

void compute(const Kernel& kern, ort::KernelContext* ctx) {
  int type = 0;
  const ort::Value* a_value = input(ctx, 0);
  std::vector<int64_t> a_dims = dims_of(a_value, &type);
  if (type != ort::kFloat || a_dims.empty() || a_dims.back() != kern.k)
    throw OrtError{make_status(ort::kInvalidArgument, "A must be float32 [..., K=" + std::to_string(kern.k) +
                                                          "], got " + shape_str(a_dims))};
  const int64_t expect[2] = {kern.groups * kern.blocks * kern.block * 16, kern.groups * kern.blocks * 16};
  const int expect_type[2] = {ort::kUint8, ort::kFloat};
  const char* names[2] = {"q", "scales"};
  void* parts[2];
  for (int i = 0; i < 2; ++i) {
    const ort::Value* v = input(ctx, static_cast<size_t>(i + 1));
    std::vector<int64_t> d = dims_of(v, &type);
    if (type != expect_type[i] || numel(d) != expect[i])
      throw OrtError{make_status(ort::kInvalidArgument, std::string(names[i]) + " must hold " + std::to_string(expect[i]) +
                                                            " elements of the packed layout, got " + shape_str(d))};
    parts[i] = data_of(v);
  }
  const int64_t m = numel(a_dims) / kern.k;
  std::vector<int64_t> y_dims = a_dims;
  y_dims.back() = kern.n;
  ort::Value* y_value = nullptr;
  using GetOutput = Status* (*)(ort::KernelContext*, size_t, const int64_t*, size_t, ort::Value**);
  check(ort::api_fn<GetOutput>(g_api, ort::kKernelContextGetOutput)(ctx, 0, y_dims.data(), y_dims.size(), &y_value));
  if (m == 0) return;
  float* y = static_cast<float*>(data_of(y_value));

  const qgemm::Weights w{static_cast<const uint8_t*>(parts[0]), static_cast<const float*>(parts[1]), kern.k, kern.n,
                         kern.groups, kern.blocks, kern.block};
  // Per calling thread: concurrent Run calls on one session each get their own buffers.
  thread_local std::vector<int8_t> xq_buf;
  thread_local std::vector<float> xs_buf;
  thread_local std::vector<int32_t> xsum_buf;
  xq_buf.resize(static_cast<size_t>(m * kern.blocks * kern.block));
  xs_buf.resize(static_cast<size_t>(m * kern.blocks));
  xsum_buf.resize(static_cast<size_t>(m * kern.blocks));
  const qgemm::Activations a{xq_buf.data(), xs_buf.data(), xsum_buf.data(), m};
  Task task{&w, &a, static_cast<const float*>(data_of(a_value)), y, 16, kern.vnni};
  parallel_for(ctx, run_quantize_task, static_cast<size_t>((m + task.rows_per_task - 1) / task.rows_per_task), &task);
  parallel_for(ctx, run_gemm_task, static_cast<size_t>((kern.groups + kGroupsPerTask - 1) / kGroupsPerTask), &task);
}

int64_t attribute(const ort::KernelInfo* info, const char* name) {
  int64_t value = 0;
  using Fn = Status* (*)(const ort::KernelInfo*, const char*, int64_t*);
  check(ort::api_fn<Fn>(g_api, ort::kKernelInfoGetAttributeInt64)(info, name, &value));
  return value;
}

Status* create_kernel(const ort::CustomOp*, const Api*, const ort::KernelInfo* info, void** out) {
  try {
    auto kern = new Kernel;
    kern->k = attribute(info, "K");
    kern->n = attribute(info, "N");
    kern->block = attribute(info, "block_size");
    if (kern->k < 1 || kern->n < 1 || kern->block < 4 || kern->block % 4 != 0) {
      const std::string msg = "attributes must be K >= 1, N >= 1 and block_size a positive multiple of 4, got K=" +
                              std::to_string(kern->k) + " N=" + std::to_string(kern->n) +
                              " block_size=" + std::to_string(kern->block);
      delete kern;
      return make_status(ort::kInvalidArgument, msg);
    }
    kern->groups = (kern->n + 15) / 16;
    kern->blocks = (kern->k + kern->block - 1) / kern->block;
    kern->vnni = qgemm::use_avx512_vnni();
    *out = kern;
    return nullptr;
  } catch (const OrtError& err) {
    return err.status;
  } catch (const std::exception& err) {
    return make_status(ort::kFail, err.what());
  }
}

Status* compute_kernel(void* kernel, ort::KernelContext* ctx) {
  try {
    compute(*static_cast<const Kernel*>(kernel), ctx);
    return nullptr;
  } catch (const OrtError& err) {
    return err.status;
  } catch (const std::exception& err) {
    return make_status(ort::kFail, err.what());
  }
}

void destroy_kernel(void* kernel) { delete static_cast<Kernel*>(kernel); }

int input_type(const ort::CustomOp*, size_t index) {
  static const int types[3] = {ort::kFloat, ort::kUint8, ort::kFloat};
  return index < 3 ? types[index] : 0;
}

ort::CustomOp make_op() {
  ort::CustomOp op{};
  op.version = ort::kOrtApiVersion;
  op.GetName = [](const ort::CustomOp*) { return kOpName; };
  op.GetExecutionProviderType = [](const ort::CustomOp*) { return "CPUExecutionProvider"; };
  op.GetInputType = input_type;
  op.GetInputTypeCount = [](const ort::CustomOp*) -> size_t { return 3; };
  op.GetOutputType = [](const ort::CustomOp*, size_t) { return static_cast<int>(ort::kFloat); };
  op.GetOutputTypeCount = [](const ort::CustomOp*) -> size_t { return 1; };
  op.KernelDestroy = destroy_kernel;
  op.GetInputCharacteristic = [](const ort::CustomOp*, size_t) { return 0; };
  op.GetOutputCharacteristic = [](const ort::CustomOp*, size_t) { return 0; };
  op.GetInputMemoryType = [](const ort::CustomOp*, size_t) { return 0; };
  op.GetVariadicInputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const ort::CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const ort::CustomOp*) { return 1; };
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute_kernel;
  op.GetStartVersion = [](const ort::CustomOp*) { return 1; };
  op.GetEndVersion = [](const ort::CustomOp*) { return 2147483647; };
  return op;
}

const ort::CustomOp g_op = make_op();

}  // namespace

extern "C" __attribute__((visibility("default"))) Status* RegisterCustomOps(ort::SessionOptions* options,
                                                                              const ort::ApiBase* base) {
  const Api* api = base->GetApi(ort::kOrtApiVersion);
  if (api == nullptr) return nullptr;  // ONNX Runtime older than 1.17: it reports the op as unknown
  g_api = api;
  ort::CustomOpDomain* domain = nullptr;
  using CreateDomain = Status* (*)(const char*, ort::CustomOpDomain**);
  using AddOp = Status* (*)(ort::CustomOpDomain*, const ort::CustomOp*);
  using AddDomain = Status* (*)(ort::SessionOptions*, ort::CustomOpDomain*);
  if (Status* st = ort::api_fn<CreateDomain>(api, ort::kCreateCustomOpDomain)(kDomain, &domain)) return st;
  if (Status* st = ort::api_fn<AddOp>(api, ort::kCustomOpDomainAdd)(domain, &g_op)) return st;
  // The domain must outlive every session that uses it: it is never released.
  return ort::api_fn<AddDomain>(api, ort::kAddCustomOpDomain)(options, domain);
}
