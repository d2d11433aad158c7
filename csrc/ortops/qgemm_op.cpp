// ai.rag_engine::MatMulInt8Block and MatMulInt4Block (CPU): the block-quantised GEMMs of
// qgemm_int8.h (8-bit and 4-bit weights, int8 activations).
//
//   inputs:  A fp32 [..., K]; q uint8 and scales fp32 in the layout of qgemm_int8.h
//   outputs: Y fp32 [..., N]
//   attributes: K, N, block_size, swiglu (optional, 0: with 1 the N columns are pairs of 16
//               (gate, up) and Y [..., N / 2] = silu(gate) * up, see gemm_f32.h)
//
// Work is shared out on the session's intra-op thread pool, so the op follows the
// session's thread count.
#include <algorithm>
#include <string>
#include <vector>

#include "gemm_f32.h"
#include "ort_kernel.h"
#include "qgemm_int8.h"

namespace rag_engine::qgemm {
namespace {

// 64 columns a task: measured (30 x 576x3072, 2 threads) against 32, 128 and 256 columns
// and against two contiguous halves, 4 groups was fastest at M = 1 and M = 8.
constexpr int64_t kGroupsPerTask = 4;
constexpr int64_t kRowsPerTask = 16;

struct Task {
  const Weights* w;
  const Activations* a;
  const float* x;
  float* y;  // the op's output, or (swiglu) the [m, n] gate/up products
  float* act;  // swiglu: the output [m, n / 2]
  bool vnni;
};

void run_gemm_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t g0 = static_cast<int64_t>(index) * kGroupsPerTask;
  const int64_t g1 = std::min(t.w->groups, g0 + kGroupsPerTask);
  if (t.vnni)
    gemm_groups_avx512(*t.w, *t.a, g0, g1, t.y);
  else
    gemm_groups_scalar(*t.w, *t.a, g0, g1, t.y);
  if (t.act != nullptr) {  // this task's (gate, up) pairs of 16 columns: groups g0..g1 (even)
    if (t.vnni)
      gemm_f32::swiglu_avx512(t.y, t.w->n, t.act, t.w->n / 2, t.a->m, g0 / 2, g1 / 2);
    else
      gemm_f32::swiglu_scalar(t.y, t.w->n, t.act, t.w->n / 2, t.a->m, g0 / 2, g1 / 2);
  }
}

void run_quantize_task(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t m0 = static_cast<int64_t>(index) * kRowsPerTask;
  const int64_t m1 = std::min(t.a->m, m0 + kRowsPerTask);
  if (t.vnni)
    quantize_rows_avx512(t.x, m0, m1, *t.w, *t.a);
  else
    quantize_rows_scalar(t.x, m0, m1, *t.w, *t.a);
}

}  // namespace

template <int BITS>
struct MatMulBlock {
  static constexpr const char* kName = BITS == 8 ? "MatMulInt8Block" : "MatMulInt4Block";
  static constexpr size_t kInputs = 3, kOptionalFrom = 3, kOutputs = 1;
  static constexpr int kInputTypes[kInputs] = {ort::kFloat, ort::kUint8, ort::kFloat};
  static constexpr int64_t kBlockMultiple = BITS == 8 ? 4 : 8;  // k per VNNI operand run

  int64_t k = 0, n = 0, block = 0, groups = 0, blocks = 0;
  bool vnni = false, swiglu = false;

  explicit MatMulBlock(const ort::KernelInfo* info)
      : k(ort::attribute_int(kName, info, "K")), n(ort::attribute_int(kName, info, "N")),
        block(ort::attribute_int(kName, info, "block_size")), swiglu(ort::swiglu_attribute(kName, info, n)) {
    if (k < 1 || n < 1 || block < kBlockMultiple || block % kBlockMultiple != 0)
      ort::fail(kName, "attributes must be K >= 1, N >= 1 and block_size a positive multiple of " +
                           std::to_string(kBlockMultiple) + ", got K=" + std::to_string(k) + " N=" + std::to_string(n) +
                           " block_size=" + std::to_string(block));
    groups = (n + 15) / 16;
    blocks = (k + block - 1) / block;
    vnni = ort::use_avx512(/*vnni=*/true);
  }

  void compute(ort::KernelContext* ctx) const {
    const ort::Tensor a_in = ort::input(kName, ctx, 0);
    if (a_in.type != ort::kFloat || a_in.dims.empty() || a_in.dims.back() != k)
      ort::fail(kName, "A must be float32 [..., K=" + std::to_string(k) + "], got " + a_in.shape());
    const int64_t expect[2] = {groups * blocks * block * 16 * BITS / 8, groups * blocks * 16};
    const char* names[2] = {"q", "scales"};
    ort::Tensor parts[2];
    for (int i = 0; i < 2; ++i) {
      parts[i] = ort::input(kName, ctx, static_cast<size_t>(i + 1));
      if (parts[i].type != kInputTypes[i + 1] || parts[i].numel() != expect[i])
        ort::fail(kName, std::string(names[i]) + " must hold " + std::to_string(expect[i]) +
                             " elements of the packed layout, got " + parts[i].shape());
    }
    const int64_t m = a_in.numel() / k;
    std::vector<int64_t> y_dims = a_in.dims;
    y_dims.back() = swiglu ? n / 2 : n;
    float* y = static_cast<float*>(ort::output(ctx, 0, y_dims));
    if (m == 0) return;
    thread_local std::vector<float> products;  // swiglu: gate and up before the epilogue
    if (swiglu) products.resize(static_cast<size_t>(m * n));

    const Weights w{static_cast<const uint8_t*>(parts[0].data), static_cast<const float*>(parts[1].data), k, n,
                    groups, blocks, block, BITS};
    // Per calling thread: concurrent Run calls on one session each get their own buffers.
    thread_local std::vector<int8_t> xq;
    thread_local std::vector<float> xs;
    thread_local std::vector<int32_t> xsum;
    xq.resize(static_cast<size_t>(m * blocks * block));
    xs.resize(static_cast<size_t>(m * blocks));
    xsum.resize(static_cast<size_t>(m * blocks));
    const Activations a{xq.data(), xs.data(), xsum.data(), m};
    Task task{&w, &a, static_cast<const float*>(a_in.data), swiglu ? products.data() : y, swiglu ? y : nullptr, vnni};
    ort::parallel_for(ctx, run_quantize_task, static_cast<size_t>((m + kRowsPerTask - 1) / kRowsPerTask), &task);
    ort::parallel_for(ctx, run_gemm_task, static_cast<size_t>((groups + kGroupsPerTask - 1) / kGroupsPerTask), &task);
  }
};

ort::CustomOp make_matmul_int8_block_op() { return ort::make_custom_op<MatMulBlock<8>>(); }
ort::CustomOp make_matmul_int4_block_op() { return ort::make_custom_op<MatMulBlock<4>>(); }

}  // namespace rag_engine::qgemm
