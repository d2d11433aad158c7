// ai.rag_engine::DecoderAttention (CPU): grouped-query self-attention over a KV cache that is
// updated in place (attention.h), the drop-in for com.microsoft::GroupQueryAttention in
// rag_engine's decoder graphs (packed QKV, rotary inside, past and present bound to one
// buffer).
//
//   inputs:  qkv fp32 [B, S, (heads + 2 kv_heads) * head_dim]; past_key, past_value fp32
//            [B, kv_heads, P, head_dim]; seqlens_k int32 [B] (row length - 1 after this
//            call); total_sequence_length int32 scalar; cos_cache, sin_cache fp32
//            [positions, rotary_dim / 2] (optional: only with do_rotary)
//   outputs: out fp32 [B, S, heads * head_dim]; present_key, present_value fp32
//            [B, kv_heads, max(P, total_sequence_length), head_dim] (when bound to the past
//            buffers, nothing is copied: the new positions are written in place)
//   attributes: num_heads, kv_num_heads, scale (0: 1/sqrt(head_dim)), do_rotary
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "attention.h"
#include "ort_kernel.h"

namespace rag_engine::attention {

namespace {

// New tokens per attention task: a long prompt's queries are shared out across threads.
constexpr int64_t kTokensPerTask = 16;

struct Task {
  const Params* p;
  bool avx512;
  int64_t chunks;  // token chunks per (row, kv head)
};

void run_attend(void* data, size_t index);

void run_store(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t b = static_cast<int64_t>(index) / t.p->kv_heads, h = static_cast<int64_t>(index) % t.p->kv_heads;
  if (t.avx512)
    store_kv_avx512(*t.p, b, h);
  else
    store_kv_scalar(*t.p, b, h);
}

// Up to kTokensPerTask new tokens (decode): one task per (row, kv head) stores its keys and
// values, then attends (nothing else reads them), so a layer costs one pass of the pool.
void run_store_attend(void* data, size_t index) {
  run_store(data, index);
  run_attend(data, index);
}

void run_attend(void* data, size_t index) {
  const Task& t = *static_cast<const Task*>(data);
  const int64_t item = static_cast<int64_t>(index) / t.chunks, chunk = static_cast<int64_t>(index) % t.chunks;
  const int64_t b = item / t.p->kv_heads, h = item % t.p->kv_heads;
  const int64_t s0 = chunk * kTokensPerTask, s1 = std::min(t.p->seq, s0 + kTokensPerTask);
  thread_local std::vector<float> scratch;
  scratch.resize(scratch_floats(*t.p));
  if (t.avx512)
    attend_avx512(*t.p, b, h, s0, s1, scratch.data());
  else
    attend_scalar(*t.p, b, h, s0, s1, scratch.data());
}

}  // namespace

struct DecoderAttention {
  static constexpr const char* kName = "DecoderAttention";
  static constexpr size_t kInputs = 7, kOptionalFrom = 5, kOutputs = 3;
  static constexpr int kInputTypes[kInputs] = {ort::kFloat, ort::kFloat, ort::kFloat, ort::kInt32,
                                               ort::kInt32, ort::kFloat, ort::kFloat};

  int64_t heads, kv_heads;
  float scale;
  bool rotary, avx512;

  explicit DecoderAttention(const ort::KernelInfo* info)
      : heads(ort::attribute_int(kName, info, "num_heads")), kv_heads(ort::attribute_int(kName, info, "kv_num_heads")),
        scale(ort::attribute_float(kName, info, "scale", 0.0f)),
        rotary(ort::attribute_int(kName, info, "do_rotary", 0) != 0), avx512(ort::use_avx512(/*vnni=*/false)) {
    if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || !(scale >= 0.0f) || std::isinf(scale))
      ort::fail(kName, "attributes must be num_heads >= 1 a multiple of kv_num_heads >= 1 and scale >= 0, got " +
                           std::to_string(heads) + ", " + std::to_string(kv_heads) + ", " + std::to_string(scale));
  }

  void compute(ort::KernelContext* ctx) const {
    const ort::Tensor qkv = ort::input(kName, ctx, 0), past_k = ort::input(kName, ctx, 1),
                      past_v = ort::input(kName, ctx, 2), seqlens = ort::input(kName, ctx, 3),
                      total = ort::input(kName, ctx, 4);
    if (qkv.type != ort::kFloat || qkv.dims.size() != 3)
      ort::fail(kName, "qkv must be float32 [batch, seq, (num_heads + 2 kv_num_heads) * head_dim], got " + qkv.shape());
    const int64_t batch = qkv.dims[0], seq = qkv.dims[1];
    if (qkv.dims[2] % (heads + 2 * kv_heads) != 0 || qkv.dims[2] == 0)
      ort::fail(kName, "qkv's last dimension must be (num_heads + 2 kv_num_heads) * head_dim = " +
                           std::to_string(heads + 2 * kv_heads) + " * head_dim, got " + qkv.shape());
    const int64_t d = qkv.dims[2] / (heads + 2 * kv_heads);
    for (const ort::Tensor* past : {&past_k, &past_v})
      if (past->type != ort::kFloat || past->dims.size() != 4 || past->dims[0] != batch || past->dims[1] != kv_heads ||
          past->dims[3] != d)
        ort::fail(kName, "past_key/past_value must be float32 [batch=" + std::to_string(batch) + ", kv_num_heads=" +
                             std::to_string(kv_heads) + ", past, head_dim=" + std::to_string(d) + "], got " + past->shape());
    if (past_k.dims != past_v.dims)
      ort::fail(kName, "past_key " + past_k.shape() + " and past_value " + past_v.shape() + " differ");
    if (seqlens.type != ort::kInt32 || seqlens.numel() != batch)
      ort::fail(kName, "seqlens_k must be int32 [batch=" + std::to_string(batch) + "], got " + seqlens.shape());
    if (total.type != ort::kInt32 || total.numel() != 1)
      ort::fail(kName, "total_sequence_length must be an int32 scalar, got " + total.shape());
    const int64_t past_len = past_k.dims[2];
    const int64_t cache_len = std::max<int64_t>(past_len, *static_cast<const int32_t*>(total.data));
    const int32_t* lens = static_cast<const int32_t*>(seqlens.data);
    for (int64_t b = 0; b < batch; ++b)
      if (lens[b] < 0 || lens[b] >= cache_len)
        ort::fail(kName, "seqlens_k[" + std::to_string(b) + "] = " + std::to_string(lens[b]) + " is outside [0, " +
                             std::to_string(cache_len) + ") (the cache's positions)");

    Params p{batch, seq, heads, kv_heads, d, 0, cache_len, scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(d)),
             static_cast<const float*>(qkv.data), nullptr, nullptr, lens, nullptr, nullptr, nullptr};
    if (rotary) {
      const ort::Tensor cos = ort::input(kName, ctx, 5, false), sin = ort::input(kName, ctx, 6, false);
      if (cos.value == nullptr || sin.value == nullptr)
        ort::fail(kName, "do_rotary=1 needs cos_cache and sin_cache");
      if (cos.type != ort::kFloat || cos.dims.size() != 2 || cos.dims != sin.dims || sin.type != ort::kFloat ||
          cos.dims[1] * 2 > d || cos.dims[1] < 1)
        ort::fail(kName, "cos_cache and sin_cache must be float32 [positions, rotary_dim / 2] with rotary_dim <= head_dim=" +
                             std::to_string(d) + ", got " + cos.shape() + " and " + sin.shape());
      for (int64_t b = 0; b < batch; ++b)
        if (lens[b] >= cos.dims[0])
          ort::fail(kName, "position " + std::to_string(lens[b]) + " is past the rotary cache's " +
                               std::to_string(cos.dims[0]) + " positions");
      p.rot_half = cos.dims[1];
      p.cos = static_cast<const float*>(cos.data);
      p.sin = static_cast<const float*>(sin.data);
    }
    p.out = static_cast<float*>(ort::output(ctx, 0, {batch, seq, heads * d}));
    const std::vector<int64_t> present_dims{batch, kv_heads, cache_len, d};
    p.key = static_cast<float*>(ort::output(ctx, 1, present_dims));
    p.value = static_cast<float*>(ort::output(ctx, 2, present_dims));
    // Not bound in place: the present buffers start as a copy of the past, and a row's new
    // tokens must follow its past directly (positions [past, start) would hold no keys).
    if (p.key != past_k.data || p.value != past_v.data)
      for (int64_t b = 0; b < batch; ++b)
        if (first_position(p, b) > past_len)
          ort::fail(kName, "row " + std::to_string(b) + "'s " + std::to_string(seq) + " new tokens start at position " +
                               std::to_string(first_position(p, b)) + ", past the " + std::to_string(past_len) +
                               " positions of past_key (seqlens_k[b] + 1 must be <= past + seq unless the present "
                               "is bound to the past buffer)");
    const std::pair<float*, const ort::Tensor*> pairs[2] = {{p.key, &past_k}, {p.value, &past_v}};
    for (const auto& [present, past] : pairs) {
      if (present != past->data)
        for (int64_t bh = 0; bh < batch * kv_heads; ++bh)
          std::memcpy(present + bh * cache_len * d, static_cast<const float*>(past->data) + bh * past_len * d,
                      sizeof(float) * static_cast<size_t>(past_len * d));
    }
    if (batch == 0 || seq == 0) return;
    Task task{&p, avx512, (seq + kTokensPerTask - 1) / kTokensPerTask};
    if (task.chunks == 1) {
      ort::parallel_for(ctx, run_store_attend, static_cast<size_t>(batch * kv_heads), &task);
    } else {  // a token chunk attends to keys that other tasks store: all stores first
      ort::parallel_for(ctx, run_store, static_cast<size_t>(batch * kv_heads), &task);
      ort::parallel_for(ctx, run_attend, static_cast<size_t>(batch * kv_heads * task.chunks), &task);
    }
  }
};

ort::CustomOp make_decoder_attention_op() { return ort::make_custom_op<DecoderAttention>(); }

}  // namespace rag_engine::attention
