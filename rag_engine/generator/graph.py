"""Build the decoder ONNX graph directly from a ``DecoderSpec`` and its weights.

The graph is emitted already fused with the ONNX Runtime contrib ops that
``onnxruntime.transformers.optimizer`` and the onnxruntime-genai model builder produce
(GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization/SkipLayerNormalization,
FastGelu), so no pattern-matching pass is needed afterwards.

I/O (optimum / onnxruntime-genai names):
  input_ids ``[B, S]`` int64 (or ``inputs_embeds`` ``[B, S, hidden]`` fp32),
  attention_mask ``[B, T]`` int64 (T = past + S; each row's ones form a prefix: rows are
  right-padded and every row owns its KV slots ``[0, len_b)``),
  position_ids ``[B, S]`` int64 (GPT-2 position embeddings; Llama-family rotary only with
  ``explicit_rotary`` — otherwise GroupQueryAttention rotates each token at its cache slot),
  past_key_values.{i}.key/value ``[B, kv_heads, P, head_dim]`` fp32;
  outputs logits ``[B, S, V]`` (``all_logits``) or ``[B, 1, V]`` at each row's last valid token,
  present.{i}.key/value. Bind past and present to the same ``[B, kv_heads, max_len, head_dim]``
  buffer and GroupQueryAttention updates the cache in place.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rag_engine.generator.ortops import DOMAIN as RAG_DOMAIN
from rag_engine.generator.quant import (
    pack_f32_panels,
    pack_int4_vnni,
    pack_int8_vnni,
    quantize_blockwise,
)
from rag_engine.generator.spec import DecoderSpec

MS = "com.microsoft"
OPSET = 17


class _Graph:
    """Minimal node/initializer accumulator with unique names."""

    def __init__(self, bits: int | None = None, block: int = 32, accuracy_level: int = 4,
                 custom_ops: bool = False, f32_op: bool = False) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: set[str] = set()
        self.bits, self.block, self.accuracy_level = bits, block, accuracy_level
        self.custom_ops = custom_ops  # DecoderAttention instead of GroupQueryAttention where it applies
        # MatMulInt{bits}Block instead of MatMulNBits: it always quantises activations to int8,
        # as MatMulNBits does at accuracy_level 4 (other levels keep MatMulNBits)
        self.block_op = custom_ops and bits in (4, 8) and accuracy_level == 4
        self.f32_op = f32_op and bits is None  # MatMulF32Panels instead of MatMul
        self.domains: set[str] = set()
        self.quantized: dict[str, tuple[str, str]] = {}  # weight key -> (packed, scales) names

    def matmul(self, x: str, w: dict, key: str, swiglu: bool = False) -> str:
        """``x @ w[key]`` — fp32 MatMul (or MatMulF32Panels), or MatMulNBits / MatMulInt{4,8}Block when quantised."""
        weight = w[key]
        extra = dict(swiglu=1) if swiglu else {}  # our ops only: see _mlp
        if self.f32_op:
            self.domains.add(RAG_DOMAIN)
            k, n = weight.shape
            return self.one("MatMulF32Panels", [x, self.init(key + "_panels", pack_f32_panels(weight))],
                            domain=RAG_DOMAIN, K=k, N=n, **extra)
        if self.bits is None:
            return self.one("MatMul", [x, self.init(key, weight)])
        if self.block_op:
            q, scales = (pack_int8_vnni if self.bits == 8 else pack_int4_vnni)(weight, self.block)
            names = [self.init(key + "_qv", q), self.init(key + "_sv", scales)]
            k, n = weight.shape
            self.domains.add(RAG_DOMAIN)
            return self.one(f"MatMulInt{self.bits}Block", [x, *names], domain=RAG_DOMAIN, K=k, N=n,
                            block_size=self.block, **extra)
        packed, scales = quantize_blockwise(weight, self.bits, self.block)
        names = (self.init(key + "_q", packed), self.init(key + "_scales", scales))
        self.quantized[key] = names
        k, n = weight.shape
        return self.one("MatMulNBits", [x, *names], domain=MS, K=k, N=n, bits=self.bits,
                        block_size=self.block, accuracy_level=self.accuracy_level)

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, *values: int) -> str:
        """A 1-D int64 constant, shared between users."""
        name = "const_" + "_".join(str(v) for v in values)
        if name not in self._consts:
            self._consts.add(self.init(name, np.array(values, np.int64)))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        self._count += 1
        name = f"/{op_type}_{self._count}"
        outs = [f"{name}/out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


def _linear(g: _Graph, x: str, w: dict, key: str) -> str:
    y = g.matmul(x, w, key)
    if key + "_b" in w:
        y = g.one("Add", [y, g.init(key + "_b", w[key + "_b"])])
    return y


def _mask_inputs(g: _Graph, embeds: bool) -> tuple[str, str, str]:
    """seqlens_k ``[B]`` int32 (row length - 1), total length scalar int32, last-token index int64."""
    one = g.init("const_one", np.array(1, np.int64))
    zero = g.init("const_zero", np.array(0, np.int64))
    axis1 = g.const(1)
    lengths = g.one("ReduceSum", ["attention_mask", axis1], keepdims=0)
    len_minus_1 = g.one("Sub", [lengths, one])
    seqlens = g.one("Cast", [len_minus_1], to=TensorProto.INT32)
    total64 = g.one("Gather", [g.one("Shape", ["attention_mask"]), one], axis=0)
    total = g.one("Cast", [total64], to=TensorProto.INT32)
    step = g.one("Gather", [g.one("Shape", ["inputs_embeds" if embeds else "input_ids"]), one], axis=0)
    # last valid row index inside this call: len - 1 - (T - S), clamped at 0 for ragged decode rows
    last = g.one("Sub", [len_minus_1, g.one("Sub", [total64, step])])
    last = g.one("Max", [last, zero])
    return seqlens, total, last


def _attention(g: _Graph, spec: DecoderSpec, w: dict, i: int, h: str, mask: tuple[str, str],
               explicit_rotary: bool) -> str:
    """QKV projection + GroupQueryAttention over the in-place cache.

    Default: packed QKV straight into GroupQueryAttention, which applies the rotary embedding
    at each token's cache slot (slot = position in this runtime, as in onnxruntime-genai;
    measured: separate Split + RotaryEmbedding nodes cost ~1 ms per SmolLM2 decode step).
    ``explicit_rotary``: RotaryEmbedding nodes driven by ``position_ids`` (arbitrary positions).
    """
    p = f"layers.{i}."
    qkv = _linear(g, h, w, p + "qkv")
    seqlens, total = mask
    rope = spec.family == "llama"
    if explicit_rotary and rope:
        kv_size = spec.num_kv_heads * spec.head_dim
        q, k, v = g.op("Split", [qkv, g.const(spec.num_heads * spec.head_dim, kv_size, kv_size)], 3, axis=-1)
        attrs = dict(domain=MS, interleaved=0, rotary_embedding_dim=spec.head_dim)
        q = g.one("RotaryEmbedding", [q, "position_ids", "rope_cos", "rope_sin"], num_heads=spec.num_heads, **attrs)
        k = g.one("RotaryEmbedding", [k, "position_ids", "rope_cos", "rope_sin"], num_heads=spec.num_kv_heads, **attrs)
        qkv_in, rope = [q, k, v], False
    else:
        qkv_in = [qkv, "", ""]
    out = f"/attn_{i}/out"
    cache_in = [f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total]
    cache_in += ["rope_cos", "rope_sin"] if rope else []
    if g.custom_ops and qkv_in[1] == "" and spec.sliding_window < 0:
        # rag_engine's op: the same inputs and in-place cache as GroupQueryAttention's packed form
        g.domains.add(RAG_DOMAIN)
        g.nodes.append(helper.make_node(
            "DecoderAttention", [qkv, *cache_in], [out, f"present.{i}.key", f"present.{i}.value"], name=f"/attn_{i}",
            domain=RAG_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, scale=spec.attn_scale,
            do_rotary=int(rope)))
        return g.matmul(out, w, p + "o")
    inputs = [*qkv_in, *cache_in]
    g.nodes.append(helper.make_node(
        "GroupQueryAttention", inputs, [out, f"present.{i}.key", f"present.{i}.value"],
        name=f"/attn_{i}", domain=MS, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
        scale=spec.attn_scale, local_window_size=spec.sliding_window, do_rotary=int(rope),
        rotary_interleaved=0))
    return g.matmul(out, w, p + "o")


def _mlp(g: _Graph, spec: DecoderSpec, w: dict, i: int, h: str) -> str:
    p = f"layers.{i}."
    if spec.family == "gpt2":
        fc = g.matmul(h, w, p + "fc")
        gelu = "FastGelu" if spec.activation != "gelu" else "BiasGelu"
        act = g.one(gelu, [fc, g.init(p + "fc_b", w[p + "fc_b"])], domain=MS)
        return g.matmul(act, w, p + "down")
    inter = w[p + "gate"].shape[1]
    if (g.f32_op or g.block_op) and inter % 16 == 0:
        # our GEMM ops: one call over gate and up, interleaved in pairs of 16 columns, whose
        # epilogue writes silu(gate) * up (no separate Sigmoid/Mul nodes, one pool pass)
        gate_up = np.stack([w[p + "gate"].reshape(-1, inter // 16, 16), w[p + "up"].reshape(-1, inter // 16, 16)],
                           axis=2).reshape(-1, 2 * inter)
        act = g.matmul(h, {p + "gate_up": gate_up}, p + "gate_up", swiglu=True)
        return g.matmul(act, w, p + "down")
    # two MatMuls, not one fused [hidden, 2*inter] + Split: the Split node costs more than
    # the extra MatMul call at batch 1 (as in onnxruntime-genai's graphs)
    gate, up = g.matmul(h, w, p + "gate"), g.matmul(h, w, p + "up")
    act = g.one("Mul", [g.one("Mul", [gate, g.one("Sigmoid", [gate])]), up])
    return g.matmul(act, w, p + "down")


def _norm(g: _Graph, spec: DecoderSpec, w: dict, x: str, key: str, skip: str | None = None,
          bias: str | None = None) -> tuple[str, str]:
    """(normed, residual sum) — plain norm when ``skip`` is None, else the fused Skip* form."""
    eps = spec.norm_eps
    gamma = g.init(key, w[key])
    beta = [g.init(key + "_b", w[key + "_b"])] if key + "_b" in w else []
    if skip is None:
        op = "SimplifiedLayerNormalization" if spec.family == "llama" else "LayerNormalization"
        return g.one(op, [x, gamma, *beta], axis=-1, epsilon=eps, stash_type=1), x
    if spec.family == "llama":
        outs = g.op("SkipSimplifiedLayerNormalization", [x, skip, gamma], 4, domain=MS, epsilon=eps)
    else:
        outs = g.op("SkipLayerNormalization", [x, skip, gamma, *beta, *([bias] if bias else [])], 4,
                    domain=MS, epsilon=eps)
    g.nodes[-1].output[1:3] = ["", ""]  # mean / inv_std_var are training outputs: not computed
    return outs[0], outs[3]


def build_graph(spec: DecoderSpec, w: dict[str, np.ndarray], *, all_logits: bool = False,
                inputs_embeds: bool = False, bits: int | None = None, block: int = 32,
                accuracy_level: int = 4, explicit_rotary: bool = False,
                custom_ops: bool = False, f32_op: bool = False) -> onnx.ModelProto:
    """Return the decoder ``ModelProto`` for ``spec`` with fp32 weights ``w`` (see module doc).

    ``bits`` = 4 or 8 quantises every MatMul weight (and the embedding table) blockwise into
    MatMulNBits / GatherBlockQuantized; ``accuracy_level`` 4 lets ONNX Runtime compute them with
    int8 activations (VNNI), as onnxruntime-genai does. ``custom_ops``: rag_engine's own ops
    (csrc/ortops) where they apply: ``ai.rag_engine::DecoderAttention`` for the attention (packed
    QKV, no sliding window) and ``MatMulInt8Block`` / ``MatMulInt4Block`` over the same quantised
    weights.
    ``f32_op`` (an fp32 graph whose MatMuls no later pass rewrites): the layers' fp32 weight
    GEMMs are ``ai.rag_engine::MatMulF32Panels`` (the lm_head stays a Gemm/MatMul).
    """
    g = _Graph(bits, block, accuracy_level, custom_ops, f32_op and custom_ops)
    seqlens, total, last = _mask_inputs(g, inputs_embeds)
    tied = np.array_equal(w["embed"], w["lm_head"].T)
    x = "inputs_embeds" if inputs_embeds else _embed(g, spec, w, tied)
    if spec.family == "llama":
        g.init("rope_cos", w["rope_cos"])
        g.init("rope_sin", w["rope_sin"])
    else:
        x = g.one("Add", [x, g.one("Gather", [g.init("pos_embed", w["pos_embed"]), "position_ids"], axis=0)])
    h, residual = _norm(g, spec, w, x, "layers.0.ln1")
    pending_bias = None  # GPT-2 projection biases fold into the next SkipLayerNormalization
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        a = _attention(g, spec, w, i, h, (seqlens, total), explicit_rotary)
        bias = g.init(p + "o_b", w[p + "o_b"]) if p + "o_b" in w else None
        if spec.family == "llama" and bias is not None:
            a, bias = g.one("Add", [a, bias]), None
        h, residual = _norm(g, spec, w, a, p + "ln2", residual, bias)
        m = _mlp(g, spec, w, i, h)
        pending_bias = g.init(p + "down_b", w[p + "down_b"]) if p + "down_b" in w else None
        nxt = f"layers.{i + 1}.ln1" if i + 1 < spec.num_layers else "norm"
        h, residual = _norm(g, spec, w, m, nxt, residual, pending_bias)
    if not all_logits:  # each row's last valid hidden state: [B, S, H] -> [B, H]
        h = g.one("GatherND", [h, g.one("Unsqueeze", [last, g.const(1)])], batch_dims=1)
    _lm_head(g, spec, w, h, tied and not inputs_embeds, flat=not all_logits)
    return _model(g, spec, inputs_embeds)


def _embed(g: _Graph, spec: DecoderSpec, w: dict, tied: bool) -> str:
    """Token embedding lookup; quantised graphs gather from the block-quantised table.

    A tied model shares that table with the (quantised) lm_head MatMulNBits, so the
    embedding is stored once; with MatMulInt{4,8}Block the lm_head keeps its own copy in
    their layout (GatherBlockQuantized reads only MatMulNBits' layout).
    """
    if g.bits is None or spec.hidden_size % g.block:
        return g.one("Gather", [g.init("embed", w["embed"]), "input_ids"], axis=0)
    packed, scales = quantize_blockwise(w["lm_head"] if tied else w["embed"].T, g.bits, g.block)
    key = "lm_head" if tied else "embed"
    names = (g.init(key + "_q", packed), g.init(key + "_scales", scales))
    if tied:
        g.quantized["lm_head"] = names
    flat = g.const(spec.vocab_size, -1)
    table = g.one("Reshape", [names[0], flat])
    return g.one("GatherBlockQuantized", [table, "input_ids", names[1]], domain=MS, bits=g.bits,
                 block_size=g.block, gather_axis=0, quantize_axis=1)


def _lm_head(g: _Graph, spec: DecoderSpec, w: dict, h: str, tied: bool, flat: bool) -> None:
    """logits = h @ lm_head, reusing the embedding table when the weights are tied.

    ``flat``: h is ``[B, H]`` (last tokens) and logits come out ``[B, 1, V]``; else ``[B, S, *]``.
    """
    if g.bits is not None:
        if "lm_head" in g.quantized and not g.block_op:
            k, n = w["lm_head"].shape
            out = g.one("MatMulNBits", [h, *g.quantized["lm_head"]], domain=MS, K=k, N=n,
                        bits=g.bits, block_size=g.block, accuracy_level=g.accuracy_level)
        else:
            out = g.matmul(h, w, "lm_head")
    elif tied:
        # Gemm(transB=1) reads the [V, hidden] embedding table directly: no transposed copy.
        if flat:
            out = g.one("Gemm", [h, "embed"], transB=1)
        else:
            lead = g.one("Slice", [g.one("Shape", [h]), g.const(0), g.const(2)])
            out = g.one("Gemm", [g.one("Reshape", [h, g.const(-1, spec.hidden_size)]), "embed"], transB=1)
            out = g.one("Reshape", [out, g.one("Concat", [lead, g.const(spec.vocab_size)], axis=0)])
    else:
        out = g.one("MatMul", [h, g.init("lm_head", w["lm_head"])])
    if flat:
        out = g.one("Unsqueeze", [out, g.const(1)])
    g.nodes[-1].output[0] = "logits"


def _model(g: _Graph, spec: DecoderSpec, inputs_embeds: bool) -> onnx.ModelProto:
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = [spec.num_kv_heads, spec.head_dim]
    if inputs_embeds:
        first = helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", spec.hidden_size])
    else:
        first = helper.make_tensor_value_info("input_ids", i64, ["batch", "seq"])
    inputs = [first,
              helper.make_tensor_value_info("attention_mask", i64, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", i64, ["batch", "seq"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "logits_seq", spec.vocab_size])]
    for i in range(spec.num_layers):
        for part in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{part}", f32,
                                                        ["batch", kv[0], "past", kv[1]]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{part}", f32,
                                                         ["batch", kv[0], "present", kv[1]]))
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    opsets += [helper.make_opsetid(domain, 1) for domain in sorted(g.domains)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="rag-engine")
