// ai.rag_engine::MatMulF32Panels (CPU): the fp32 weight GEMM of gemm_f32.h.
//
//   inputs:  A fp32 [..., K]; W fp32 [ceil(N / 32), K, 32] (panels)
//   outputs: Y fp32 [..., N]
//   attributes: K, N, swiglu (optional, 0: with 1 the N columns are pairs of 16 (gate, up) and
//               Y [..., N / 2] = silu(gate) * up)
#include <algorithm>
#include <string>
#include <vector>

#include "gemm_f32.h"
#include "ort_kernel.h"

namespace rag_engine::gemm_f32 {

namespace {

constexpr int64_t kPanelsPerTask = 2;

struct Task {
  const Problem* pr;
  int64_t panels;
  float* act;  // swiglu: the output [m, n / 2] (pr->y holds the gate/up products)
  bool avx512;
};

void run_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t p0 = static_cast<int64_t>(index) * kPanelsPerTask, p1 = std::min(t.panels, p0 + kPanelsPerTask);
  if (t.avx512)
    panels_avx512(*t.pr, p0, p1);
  else
    panels_scalar(*t.pr, p0, p1);
  if (t.act != nullptr) {  // a panel of 32 columns is one (gate, up) pair
    if (t.avx512)
      swiglu_avx512(t.pr->y, t.pr->n, t.act, t.pr->n / 2, t.pr->m, p0, p1);
    else
      swiglu_scalar(t.pr->y, t.pr->n, t.act, t.pr->n / 2, t.pr->m, p0, p1);
  }
}

}  // namespace

struct MatMulF32Panels {
  static constexpr const char* kName = "MatMulF32Panels";
  static constexpr size_t kInputs = 2, kOptionalFrom = 2, kOutputs = 1;
  static constexpr int kInputTypes[kInputs] = {ort::kFloat, ort::kFloat};

  int64_t k, n, panels;
  bool avx512, swiglu;

  explicit MatMulF32Panels(const ort::KernelInfo* info)
      : k(ort::attribute_int(kName, info, "K")), n(ort::attribute_int(kName, info, "N")), panels(0),
        avx512(ort::use_avx512(/*vnni=*/false)), swiglu(ort::swiglu_attribute(kName, info, n)) {
    if (k < 1 || n < 1)
      ort::fail(kName, "attributes must be K >= 1 and N >= 1, got K=" + std::to_string(k) + " N=" + std::to_string(n));
    panels = (n + kPanel - 1) / kPanel;
  }

  void compute(ort::KernelContext* ctx) const {
    const ort::Tensor a = ort::input(kName, ctx, 0), w = ort::input(kName, ctx, 1);
    if (a.type != ort::kFloat || a.dims.empty() || a.dims.back() != k)
      ort::fail(kName, "A must be float32 [..., K=" + std::to_string(k) + "], got " + a.shape());
    if (w.type != ort::kFloat || w.numel() != panels * k * kPanel)
      ort::fail(kName, "W must hold " + std::to_string(panels * k * kPanel) + " floats ([ceil(N/32), K, 32]), got " +
                           w.shape());
    std::vector<int64_t> y_dims = a.dims;
    y_dims.back() = swiglu ? n / 2 : n;
    float* y = static_cast<float*>(ort::output(ctx, 0, y_dims));
    const int64_t m = a.numel() / k;
    thread_local std::vector<float> products;  // swiglu: gate and up before the epilogue
    if (swiglu) products.resize(static_cast<size_t>(m * n));
    const Problem pr{static_cast<const float*>(a.data), static_cast<const float*>(w.data),
                     swiglu ? products.data() : y, m, k, n};
    if (pr.m == 0) return;
    Task task{&pr, panels, swiglu ? y : nullptr, avx512};
    ort::parallel_for(ctx, run_task, static_cast<size_t>((panels + kPanelsPerTask - 1) / kPanelsPerTask), &task);
  }
};

ort::CustomOp make_matmul_f32_panels_op() { return ort::make_custom_op<MatMulF32Panels>(); }

}  // namespace rag_engine::gemm_f32
