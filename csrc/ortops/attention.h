// Decoder self-attention over an in-place KV cache, for ai.rag_engine::DecoderAttention.
//
// One call appends S tokens per row to the cache and attends each of them causally, with
// grouped-query heads (G = heads / kv_heads query heads share a key/value head) and an
// optional rotary embedding (non-interleaved halves, as Llama). Row b holds
// L_b = seqlens[b] + 1 tokens after the call; its S new tokens sit at cache positions
// start_b = max(0, L_b - S) onwards (decode: S = 1 at L_b - 1; a first prompt: from 0, with
// positions past L_b being right padding whose outputs are zero and which are not stored).
#pragma once

#include <cstddef>
#include <cstdint>

namespace rag_engine::attention {

struct Params {
  int64_t batch, seq, heads, kv_heads, head_dim;
  int64_t rot_half;    // rotary pairs (rotary_dim / 2); 0: no rotary embedding
  int64_t cache_len;   // positions in the cache (its third dimension)
  float scale;         // applied to q . k
  const float* qkv;    // [batch, seq, (heads + 2 kv_heads) * head_dim]: q heads, k heads, v heads
  float* key;          // [batch, kv_heads, cache_len, head_dim], written at the new positions
  float* value;
  const int32_t* seqlens;  // [batch]
  const float* cos;        // [rotary positions, rot_half]
  const float* sin;
  float* out;              // [batch, seq, heads * head_dim]
};

inline int64_t row_length(const Params& p, int64_t b) { return static_cast<int64_t>(p.seqlens[b]) + 1; }
inline int64_t first_position(const Params& p, int64_t b) {
  const int64_t start = row_length(p, b) - p.seq;
  return start > 0 ? start : 0;
}

// Rotates (when p.rot_half) and stores the new keys and values of row b, kv head h.
void store_kv_scalar(const Params& p, int64_t b, int64_t h);
void store_kv_avx512(const Params& p, int64_t b, int64_t h);

// Outputs of row b, kv head h's G query heads for the new tokens [s0, s1). `scratch` holds
// scratch_floats(p) floats.
void attend_scalar(const Params& p, int64_t b, int64_t h, int64_t s0, int64_t s1, float* scratch);
void attend_avx512(const Params& p, int64_t b, int64_t h, int64_t s0, int64_t s1, float* scratch);

inline size_t scratch_floats(const Params& p) {
  const int64_t group = p.heads / p.kv_heads;
  return static_cast<size_t>(group * (p.cache_len + p.head_dim) + 64);
}

}  // namespace rag_engine::attention
