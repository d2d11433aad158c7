// rag_engine._C_cuda: one thin function per op over raw device pointers.
//
// No libtorch: Python hands over the integer addresses of device buffers
// (torch CUDA tensors, CuPy arrays: anything with __cuda_array_interface__ or
// DLPack) and the integer handle of the CUDA stream to launch on; outputs and
// scratch are allocated by the caller. Everything the kernels rely on is
// checked here first: each pointer is device memory on the current device
// (a host pointer is refused, never dereferenced), alignment, sizes, and that
// this build has kernels for the device's architecture. Launches are
// asynchronous; the GIL is released around them.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>

#include "../checks.h"
#include "ops_cuda.h"

namespace py = pybind11;
using namespace rag_engine;

#ifndef RAG_ENGINE_CUDA_ARCHS_STR
#define RAG_ENGINE_CUDA_ARCHS_STR "unknown"
#endif

namespace {

constexpr int kMinArch = 80;  // bf16 loads and the shared-memory budget assume sm_80+

void check_cuda(const char* op, cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(cat_message(op, what, ": ", cudaGetErrorName(err), " (",
                                         cudaGetErrorString(err), ")"));
}

int current_device(const char* op) {
  int dev = -1;
  check_cuda(op, cudaGetDevice(&dev), "no usable CUDA device");
  return dev;
}

// The current device must be one this build can run.
void check_device(const char* op) {
  const int dev = current_device(op);
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  const int arch = major * 10 + minor;
  RAG_CHECK(op, arch >= kMinArch, "CUDA device ", dev, " is sm_", arch, "; the CUDA backend needs sm_",
            kMinArch, " or newer (built for ", RAG_ENGINE_CUDA_ARCHS_STR, "); use backend='triton' or 'torch'");
  const cudaError_t probe = cuda_kernels_probe();
  if (probe != cudaSuccess) {
    cudaGetLastError();  // the probe error is not sticky: clear it so later calls are unaffected
    RAG_CHECK(op, false, "this build has no kernels for sm_", arch, " (built for ", RAG_ENGINE_CUDA_ARCHS_STR,
              "; rebuild with RAG_ENGINE_CUDA_ARCHS=", arch, "): ", cudaGetErrorString(probe));
  }
}

// `ptr` must address device (or managed) memory of the current device, aligned to `align`.
template <typename T>
T* device_ptr(const char* op, const char* name, uintptr_t ptr, size_t align, bool optional = false) {
  if (ptr == 0) {
    RAG_CHECK(op, optional, name, " is a null pointer");
    return nullptr;
  }
  RAG_CHECK(op, ptr % align == 0, name, " must be ", align, "-byte aligned, got address ", ptr);
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<void*>(ptr));
  if (err != cudaSuccess) cudaGetLastError();
  RAG_CHECK(op, err == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged),
            name, " must be CUDA device memory, got a host or unknown pointer");
  const int dev = current_device(op);
  RAG_CHECK(op, attr.device == dev, name, " is on cuda:", attr.device, " but the current device is cuda:", dev,
            "; put every input on one device (torch.cuda.set_device / tensor.to)");
  return reinterpret_cast<T*>(ptr);
}

DType parse_dtype(const char* op, const std::string& s) {
  if (s == "fp32") return DType::kF32;
  if (s == "bf16") return DType::kBF16;
  if (s == "fp16") return DType::kF16;
  if (s == "int8") return DType::kI8;
  throw py::type_error(cat_message(op, "unknown dtype '", s, "' (expected fp32, bf16, fp16 or int8)"));
}

size_t elem_size(DType t) { return t == DType::kF32 ? 4 : (t == DType::kI8 ? 1 : 2); }

void launch(const char* op, cudaError_t (*fn)(const void*), const void* args) {
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = fn(args);
  }
  check_cuda(op, err, "kernel launch failed");
}

size_t topk_ip_workspace(int64_t nq, int64_t d, const std::string& dtype, int64_t n, int64_t k) {
  constexpr const char* op = "topk_ip";
  check_device(op);
  RAG_CHECK(op, nq > 0 && d > 0 && n > 0 && k > 0, "nq, d, n and k must be > 0");
  const char* error = nullptr;
  const size_t bytes = topk_ip_cuda_workspace(nq, d, parse_dtype(op, dtype), n, k, &error);
  RAG_CHECK(op, error == nullptr, "D=", d, ", k=", k, ": ", error);
  return bytes;
}

void topk_ip(uintptr_t queries, int64_t nq, int64_t d, uintptr_t corpus, const std::string& dtype_name,
             int64_t n, uintptr_t scales, uintptr_t allow, int64_t k, uintptr_t out_scores,
             uintptr_t out_ids, uintptr_t workspace, size_t workspace_bytes, uintptr_t bad,
             uintptr_t stream) {
  constexpr const char* op = "topk_ip";
  const DType dtype = parse_dtype(op, dtype_name);
  RAG_CHECK(op, n < (int64_t{1} << 31) - 1, "the CUDA backend takes N < 2^31 rows, got ", n,
            " (shard the corpus and merge with merge_topk)");
  RAG_CHECK(op, nq < (int64_t{1} << 31) - 1, "too many queries: ", nq);
  RAG_CHECK(op, std::min(k, n) <= kTopkIpCudaMaxK, "the CUDA kernel takes min(k, N) <= ", kTopkIpCudaMaxK,
            ", got ", std::min(k, n));
  const size_t need = topk_ip_workspace(nq, d, dtype_name, n, k);
  RAG_CHECK(op, workspace_bytes >= need, "workspace has ", workspace_bytes, " bytes, needs ", need);
  TopkIpCudaArgs a;
  a.queries = device_ptr<const float>(op, "queries", queries, 4);
  a.nq = nq;
  a.d = d;
  a.corpus = device_ptr<const void>(op, "corpus", corpus, elem_size(dtype));
  a.dtype = dtype;
  a.scales = device_ptr<const float>(op, "scales", scales, 4, dtype != DType::kI8);
  RAG_CHECK(op, (a.scales != nullptr) == (dtype == DType::kI8), "scales go with an int8 corpus only");
  a.allow = device_ptr<const uint8_t>(op, "ids_filter bitmap", allow, 1, true);
  a.n = n;
  a.k = k;
  a.out_scores = device_ptr<float>(op, "out_scores", out_scores, 4);
  a.out_ids = device_ptr<int64_t>(op, "out_ids", out_ids, 8);
  a.workspace = device_ptr<void>(op, "workspace", workspace, 8, need == 0);
  a.bad = device_ptr<unsigned long long>(op, "bad", bad, 8);
  a.stream = reinterpret_cast<cudaStream_t>(stream);
  launch(op, [](const void* p) { return topk_ip_cuda(*static_cast<const TopkIpCudaArgs*>(p)); }, &a);
}

void fusion_softmax(uintptr_t u, int64_t b, int64_t d, int64_t k, uintptr_t docs, const std::string& dtype_name,
                    uintptr_t scales, uintptr_t ids, int64_t n, uintptr_t mask, uintptr_t alpha,
                    uintptr_t h_aug, uintptr_t scores, uintptr_t bad, uintptr_t stream) {
  constexpr const char* op = "fusion_softmax";
  check_device(op);
  const DType dtype = parse_dtype(op, dtype_name);
  RAG_CHECK(op, b > 0 && d > 0 && k > 0, "B, D and K must be > 0, got B=", b, " D=", d, " K=", k);
  RAG_CHECK(op, b < (int64_t{1} << 31) - 1, "too many rows: B=", b);
  const char* error = nullptr;
  fusion_softmax_cuda_smem(d, k, &error);
  RAG_CHECK(op, error == nullptr, "D=", d, ", K=", k, ": ", error);
  FusionSoftmaxCudaArgs a;
  a.u = device_ptr<const float>(op, "u", u, 4);
  a.b = b;
  a.d = d;
  a.k = k;
  a.docs = device_ptr<const void>(op, ids ? "corpus" : "docs", docs, elem_size(dtype));
  a.dtype = dtype;
  a.scales = device_ptr<const float>(op, "scales", scales, 4, dtype != DType::kI8);
  a.ids = device_ptr<const int64_t>(op, "ids", ids, 8, true);
  RAG_CHECK(op, a.scales == nullptr || a.ids != nullptr, "int8 documents need the gather form (corpus + ids)");
  a.n = n;
  a.mask = device_ptr<const uint8_t>(op, "mask", mask, 1, true);
  a.alpha = device_ptr<float>(op, "alpha", alpha, 4);
  a.h_aug = device_ptr<float>(op, "h_aug", h_aug, 4);
  a.scores = device_ptr<float>(op, "scores", scores, 4, true);
  a.bad = device_ptr<unsigned long long>(op, "bad", bad, 8);
  a.stream = reinterpret_cast<cudaStream_t>(stream);
  launch(op, [](const void* p) {
    return fusion_softmax_cuda(*static_cast<const FusionSoftmaxCudaArgs*>(p)); }, &a);
}

size_t rag_token_marg_workspace(int64_t b, int64_t k, int64_t v) {
  constexpr const char* op = "rag_token_marg";
  check_device(op);
  RAG_CHECK(op, b > 0 && k > 0 && v > 0, "B, K and V must be > 0");
  return rag_token_marg_cuda_workspace(b, k, v);
}

void rag_token_marg(uintptr_t log_alpha, uintptr_t logits, const std::string& dtype_name, int64_t b, int64_t k,
                    int64_t v, double inv_temperature, uintptr_t out, uintptr_t workspace,
                    size_t workspace_bytes, uintptr_t bad, uintptr_t stream) {
  constexpr const char* op = "rag_token_marg";
  const DType dtype = parse_dtype(op, dtype_name);
  RAG_CHECK(op, dtype != DType::kI8, "logits must be float32, bfloat16 or float16");
  RAG_CHECK(op, b <= 65535, "the CUDA kernel takes B <= 65535, got ", b);
  RAG_CHECK(op, b * k < (int64_t{1} << 31) - 1, "B*K too large: ", b * k);
  RAG_CHECK(op, k * 4 <= 48 * 1024, "the CUDA kernel takes K <= 12288, got ", k);
  RAG_CHECK(op, inv_temperature > 0 && inv_temperature < std::numeric_limits<float>::infinity(),
            "1/temperature must be positive and finite, got ", inv_temperature);
  const size_t need = rag_token_marg_workspace(b, k, v);
  RAG_CHECK(op, workspace_bytes >= need, "workspace has ", workspace_bytes, " bytes, needs ", need);
  RagTokenMargCudaArgs a;
  a.log_alpha = device_ptr<const float>(op, "log_alpha", log_alpha, 4);
  a.logits = device_ptr<const void>(op, "logits", logits, elem_size(dtype));
  a.dtype = dtype;
  a.b = b;
  a.k = k;
  a.v = v;
  a.inv_temperature = static_cast<float>(inv_temperature);
  a.out = device_ptr<float>(op, "out", out, 4);
  a.workspace = device_ptr<void>(op, "workspace", workspace, 8);
  a.bad = device_ptr<unsigned long long>(op, "bad", bad, 8);
  a.stream = reinterpret_cast<cudaStream_t>(stream);
  launch(op, [](const void* p) {
    return rag_token_marg_cuda(*static_cast<const RagTokenMargCudaArgs*>(p)); }, &a);
}

py::dict device_info() {
  constexpr const char* op = "device_info";
  const int dev = current_device(op);
  int major = 0, minor = 0, sms = 0, smem = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  py::dict out;
  out["device"] = dev;
  out["arch"] = major * 10 + minor;
  out["sms"] = sms;
  out["smem_per_block_optin"] = smem;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "rag-engine CUDA kernels (raw device pointers + stream handle; see rag_engine.gpu)";
  m.attr("built_archs") = RAG_ENGINE_CUDA_ARCHS_STR;
  m.attr("topk_ip_max_k") = kTopkIpCudaMaxK;
  m.def("device_info", &device_info, "Current device: arch (e.g. 90), SM count, shared memory per block.");
  m.def("topk_ip_workspace", &topk_ip_workspace, py::arg("nq"), py::arg("d"), py::arg("dtype"), py::arg("n"),
        py::arg("k"), "Scratch bytes topk_ip needs for these sizes on the current device.");
  m.def("topk_ip", &topk_ip, py::arg("queries"), py::arg("nq"), py::arg("d"), py::arg("corpus"),
        py::arg("dtype"), py::arg("n"), py::arg("scales"), py::arg("allow"), py::arg("k"), py::arg("out_scores"),
        py::arg("out_ids"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("bad"), py::arg("stream"),
        "Fused inner-product top-K (see csrc/cuda/ops_cuda.h). Pointers are device addresses; "
        "`bad` (uint64, preset to 2^64-1) receives the first corpus row with a non-finite score.");
  m.def("fusion_softmax", &fusion_softmax, py::arg("u"), py::arg("b"), py::arg("d"), py::arg("k"),
        py::arg("docs"), py::arg("dtype"), py::arg("scales"), py::arg("ids"), py::arg("n"), py::arg("mask"),
        py::arg("alpha"), py::arg("h_aug"), py::arg("scores"), py::arg("bad"), py::arg("stream"),
        "alpha = softmax(<u, doc>) over K documents, h_aug = Σ alpha doc (dense or gathered by ids).");
  m.def("rag_token_marg_workspace", &rag_token_marg_workspace, py::arg("b"), py::arg("k"), py::arg("v"));
  m.def("rag_token_marg", &rag_token_marg, py::arg("log_alpha"), py::arg("logits"), py::arg("dtype"),
        py::arg("b"), py::arg("k"), py::arg("v"), py::arg("inv_temperature"), py::arg("out"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("bad"), py::arg("stream"),
        "out[b] = logsumexp_i(log_alpha[b, i] + log_softmax(logits[b, i] * inv_temperature)).");
}
