"""rag_token_marg (RAG-Token marginalisation) and rag_token_sample."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from rag_engine import _ext, gpu_ops, reference
from rag_engine.gpu import DEVICE_BACKENDS
from rag_engine.ops.dispatch import (
    checked_array,
    checked_number,
    is_cuda,
    resolve_backend,
    resolve_threads,
)


def _marg_inputs(op: str, log_alpha: Any, logits: Any, scan: bool) -> tuple[np.ndarray, np.ndarray]:
    """Checked views; `scan`: also check log_alpha's values here (the extension checks them
    itself, with the same message, so its callers skip this numpy pass: ~4 us a call)."""
    la, x = checked_array(op, "log_alpha", log_alpha, 2), checked_array(op, "logits", logits, 3)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: logits must be [B, K, V] with K > 0 and V > 0, got {list(x.shape)}")
    if la.shape != x.shape[:2]:
        raise ValueError(f"{op}: log_alpha must be [B, K] = {list(x.shape[:2])} (from logits), got {list(la.shape)}")
    if scan and (np.isnan(la).any() or (la == np.inf).any() or not np.isfinite(la).any(axis=1).all()):
        raise ValueError(f"{op}: log_alpha must be finite or -inf with a finite entry per row, got {la}")
    return la, x


def _marg_torch(op: str, la: np.ndarray, x: np.ndarray, temperature: float) -> np.ndarray:
    import torch

    out = reference.rag_token_marg_torch(torch.from_numpy(la), torch.from_numpy(x), temperature).numpy()
    if np.isnan(out).any() or (out == np.inf).any():
        b, i = np.argwhere(np.isnan(x).any(-1) | (x == np.inf).any(-1) | ~np.isfinite(x).any(-1))[0]
        raise ValueError(f"{op}: logits row (b={b}, k={i}) contains NaN or +Inf, or has no finite value")
    return out


_MARG_BACKENDS = ("cpu", "torch", *DEVICE_BACKENDS)


def rag_token_marg(
    log_alpha: Any, logits: Any, *, temperature: float = 1.0, threads: int | None = None,
    backend: str | None = None, isa: str | None = None,
) -> np.ndarray:
    """RAG-Token marginal: log p [B, V] = logsumexp_i(log_alpha_i + log_softmax(logits_i / T)).

    log_alpha [B, K] float32 (finite or -inf, used as given); logits [B, K, V]
    float32 (-inf allowed; NaN/+Inf, or a row with no finite value, raise).
    temperature > 0. Returns float32 numpy [B, V].
    """
    op = "rag_token_marg"
    name = resolve_backend(op, backend, _MARG_BACKENDS, is_cuda(logits))
    t = checked_number(op, "temperature", temperature, 0.0, np.inf, low_open=True)
    if is_cuda(logits):
        return gpu_ops.rag_token_marg(name, log_alpha, logits, t)
    la, x = _marg_inputs(op, log_alpha, logits, scan=name == "torch")
    if name == "torch":
        return _marg_torch(op, la, x, t)
    return _ext.require_cpu_ext().rag_token_marg(la, x, t, resolve_threads(op, threads), isa or "")


def rag_token_sample(
    log_alpha: Any, logits: Any, sampling: Any = None, *, generator: np.random.Generator | None = None,
    threads: int | None = None, backend: str | None = None, isa: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one token per row from the RAG-Token marginal (temperature-1 rag_token_marg).

    sampling: any object with temperature, top_k, top_p, min_p, seed (e.g.
    rag_engine.generator.SamplingParams); None = plain sampling at temperature 1.
    Applied in the generator's order: temperature on the marginal log-probs (below 1e-5 =
    greedy argmax), top_k (ties kept), top_p, min_p, then the inverse CDF in
    token-id order (see reference.sample_log_probs). Random stream: row b uses
    the b-th of `generator.random(B)`, generator = np.random.default_rng(seed)
    when not given, so the reference reproduces every draw.
    Returns (tokens [B] int64, logprobs [B] float32: marginal log-prob of each token).
    """
    op = "rag_token_sample"
    name = resolve_backend(op, backend, ("cpu", "torch"), is_cuda(logits))
    get = lambda attr, default: default if sampling is None else getattr(sampling, attr, default)  # noqa: E731
    temperature = checked_number(op, "temperature", get("temperature", 1.0), 0.0, np.inf)
    top_p = checked_number(op, "top_p", get("top_p", 1.0), 0.0, 1.0, low_open=True)
    min_p = checked_number(op, "min_p", get("min_p", 0.0), 0.0, 1.0)
    top_k = get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < -1:
        raise ValueError(f"{op}: top_k must be an int >= -1 (0 or -1: off), got {top_k!r}")
    la, x = _marg_inputs(op, log_alpha, logits, scan=name == "torch")
    rng = generator if generator is not None else np.random.default_rng(get("seed", None))
    u = rng.random(la.shape[0])
    if name == "torch":
        lp = _marg_torch(op, la, x, 1.0)
        tokens = reference.sample_log_probs(lp, u, temperature, int(top_k), top_p, min_p)
        return tokens, lp[np.arange(lp.shape[0]), tokens]
    return _ext.require_cpu_ext().rag_token_sample(
        la, x, temperature, max(int(top_k), 0), top_p, min_p, u, resolve_threads(op, threads), isa or "")
