"""Read a Hugging Face causal LM into a flat description: architecture numbers + numpy weights.

Supported families: GPT-2 and the Llama family (Llama, Mistral, Qwen2 — same graph, Qwen2 adds
q/k/v biases, Mistral a sliding window). Weights come out in MatMul layout ``[in, out]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = (*LLAMA_FAMILY, "gpt2")
MAX_CONTEXT_CAP = 32768  # cos/sin tables and the KV buffers are sized by this at most


@dataclass(frozen=True)
class DecoderSpec:
    """Architecture numbers of a decoder-only transformer."""

    family: str  # "llama" (also Mistral/Qwen2) or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_context: int
    activation: str
    sliding_window: int = -1
    attn_scale: float = 0.0  # 0 means 1/sqrt(head_dim)


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


def _check_family(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"unsupported model_type {model_type!r}: expected one of {', '.join(SUPPORTED)}"
        )
    return "gpt2" if model_type == "gpt2" else "llama"


def read_spec(model) -> tuple[DecoderSpec, dict[str, np.ndarray]]:
    """Describe ``model`` (a transformers ``*ForCausalLM``) and copy its weights to numpy.

    Returns the spec and a dict of fp32 arrays named ``embed``, ``layers.{i}.{part}``, ``norm``,
    ``lm_head`` (``[hidden, vocab]``) and, for GPT-2, ``pos_embed`` and bias/``_b`` entries.
    """
    config = model.config
    family = _check_family(config)
    if family == "gpt2":
        return _read_gpt2(model, config)
    return _read_llama(model, config)


def _read_llama(model, config) -> tuple[DecoderSpec, dict[str, np.ndarray]]:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} for {config.model_type}: expected 'silu'")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    spec = DecoderSpec(
        family="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        norm_eps=float(config.rms_norm_eps),
        max_context=min(int(config.max_position_embeddings), MAX_CONTEXT_CAP),
        activation=act,
        sliding_window=int(window) if window else -1,
    )
    w: dict[str, np.ndarray] = {"embed": _np(model.get_input_embeddings().weight)}
    for i, layer in enumerate(model.model.layers):
        att, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}."
        w[p + "ln1"] = _np(layer.input_layernorm.weight)
        w[p + "ln2"] = _np(layer.post_attention_layernorm.weight)
        w[p + "qkv"] = np.concatenate([_np(m.weight).T for m in (att.q_proj, att.k_proj, att.v_proj)], 1)
        if att.q_proj.bias is not None:
            w[p + "qkv_b"] = np.concatenate([_np(m.bias) for m in (att.q_proj, att.k_proj, att.v_proj)])
        w[p + "o"] = _np(att.o_proj.weight).T
        if att.o_proj.bias is not None:
            w[p + "o_b"] = _np(att.o_proj.bias)
        w[p + "gate"], w[p + "up"] = _np(mlp.gate_proj.weight).T, _np(mlp.up_proj.weight).T
        w[p + "down"] = _np(mlp.down_proj.weight).T
        if getattr(mlp.down_proj, "bias", None) is not None:
            raise ValueError("mlp_bias=True Llama models are not supported: expected mlp_bias=False")
    w["norm"] = _np(model.model.norm.weight)
    w["lm_head"] = _np(model.get_output_embeddings().weight).T
    w["rope_cos"], w["rope_sin"] = _rope_tables(model, spec)
    return spec, {k: np.ascontiguousarray(v) for k, v in w.items()}


def _rope_tables(model, spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[max_context, rotary_dim/2]`` from the model's own rotary module (any rope_type)."""
    import torch

    pos = torch.arange(spec.max_context, dtype=torch.int64)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(probe, pos)
    half = cos.shape[-1] // 2
    return _np(cos[0, :, :half]), _np(sin[0, :, :half])


def _read_gpt2(model, config) -> tuple[DecoderSpec, dict[str, np.ndarray]]:
    act = config.activation_function
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"unsupported GPT-2 activation {act!r}: expected gelu_new or gelu")
    if config.scale_attn_by_inverse_layer_idx or config.reorder_and_upcast_attn:
        raise ValueError("GPT-2 configs with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
    head_dim = config.n_embd // config.n_head
    spec = DecoderSpec(
        family="gpt2",
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_layers=config.n_layer,
        num_heads=config.n_head,
        num_kv_heads=config.n_head,
        head_dim=head_dim,
        intermediate_size=config.n_inner or 4 * config.n_embd,
        norm_eps=float(config.layer_norm_epsilon),
        max_context=min(int(config.n_positions), MAX_CONTEXT_CAP),
        activation=act,
        attn_scale=0.0 if config.scale_attn_weights else 1.0,
    )
    tr = model.transformer
    w: dict[str, np.ndarray] = {"embed": _np(tr.wte.weight), "pos_embed": _np(tr.wpe.weight)}
    for i, block in enumerate(tr.h):
        p = f"layers.{i}."
        w[p + "ln1"], w[p + "ln1_b"] = _np(block.ln_1.weight), _np(block.ln_1.bias)
        w[p + "ln2"], w[p + "ln2_b"] = _np(block.ln_2.weight), _np(block.ln_2.bias)
        w[p + "qkv"], w[p + "qkv_b"] = _np(block.attn.c_attn.weight), _np(block.attn.c_attn.bias)
        w[p + "o"], w[p + "o_b"] = _np(block.attn.c_proj.weight), _np(block.attn.c_proj.bias)
        w[p + "fc"], w[p + "fc_b"] = _np(block.mlp.c_fc.weight), _np(block.mlp.c_fc.bias)
        w[p + "down"], w[p + "down_b"] = _np(block.mlp.c_proj.weight), _np(block.mlp.c_proj.bias)
    w["norm"], w["norm_b"] = _np(tr.ln_f.weight), _np(tr.ln_f.bias)
    w["lm_head"] = _np(model.get_output_embeddings().weight).T
    return spec, {k: np.ascontiguousarray(v) for k, v in w.items()}
