"""fusion_softmax (bilinear attention fusion) and fusion_softmax_gather."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rag_engine import _ext, gpu_ops, reference
from rag_engine.corpus import CorpusMatrix, as_numpy
from rag_engine.gpu import DEVICE_BACKENDS
from rag_engine.ops.dispatch import (
    backend_env,
    checked_array,
    is_cuda,
    resolve_backend,
    resolve_threads,
)


def _fusion_inputs(op: str, h_in: Any, W_a: Any, mask: Any, k: int) -> tuple:
    h = checked_array(op, "h_in", h_in, 2)
    b, d = h.shape
    if k <= 0:
        raise ValueError(f"{op}: K must be > 0 (at least one document slot per row), got K={k}")
    w = None if W_a is None else checked_array(op, "W_a", W_a, 2)
    if w is not None and w.shape != (d, d):
        raise ValueError(f"{op}: W_a must be [D, D] = [{d}, {d}], got {list(w.shape)}")
    m = None if mask is None else checked_array(op, "mask", mask, 2, (np.bool_,))
    if m is not None and m.shape != (b, k):
        raise ValueError(f"{op}: mask must be [B, K] = [{b}, {k}], got {list(m.shape)}")
    return h, w, m


def _fusion_torch(op, h, docs, w, m, return_scores):
    alpha, h_aug, s = (x.numpy() for x in reference.fusion_softmax_torch(h, docs, w, m))
    bad = np.argwhere(np.isnan(s) | (s == np.inf) | ((s == -np.inf) & (m is None or m)))
    if bad.size:
        raise ValueError(f"{op}: document (b={bad[0][0]}, k={bad[0][1]}) gives a non-finite score "
                         "(NaN/Inf in h_in, W_a or the document, or float32 overflow)")
    return alpha, h_aug, s


def _fusion_softmax_cpu(h, docs, w, m, return_scores, threads, isa):
    return _ext.require_cpu_ext().fusion_softmax(h, docs, w, m, return_scores, threads, isa or "")


def _fusion_softmax_torch(h, docs, w, m, return_scores, threads, isa):
    return _fusion_torch("fusion_softmax", h, docs, w, m, return_scores)


_FUSION_SOFTMAX_IMPLS: dict[str, Callable[..., tuple]] = {
    "cpu": _fusion_softmax_cpu,
    "torch": _fusion_softmax_torch,
}
_FUSION_SOFTMAX_BACKENDS = (*_FUSION_SOFTMAX_IMPLS, *DEVICE_BACKENDS)


def fusion_softmax(
    h_in: Any, docs: Any, W_a: Any = None, *, mask: Any = None, return_scores: bool = False,
    threads: int | None = None, backend: str | None = None, isa: str | None = None,
) -> tuple[np.ndarray, ...]:
    """Bilinear attention over retrieved documents: alpha, h_aug (and scores).

    h_in [B, D] float32; docs [B, K, D] float32, float16 or bfloat16 (uint16 bits
    = CorpusMatrix bf16 storage); W_a [D, D] float32 or None (identity);
    mask [B, K] bool (False = padded slot). alpha [B, K] = softmax_k(h_inᵀ W_a d_k),
    h_aug [B, D] = Σ_k alpha_k d_k, scores [B, K] = the raw h_inᵀ W_a d_k (-inf
    where masked), all float32 numpy. A row with every slot masked gets alpha 0
    and h_aug 0. A non-finite score (NaN/Inf inputs) raises ValueError naming it.
    Returns (alpha, h_aug), or (alpha, h_aug, scores) with return_scores=True.
    """
    op = "fusion_softmax"
    if (type(h_in) is np.ndarray and type(docs) is np.ndarray and docs.dtype.type is np.float32
            and mask is None and backend is None and isa is None and type(threads) is int and threads >= 1
            and (W_a is None or type(W_a) is np.ndarray) and not backend_env()
            and (ext := _ext.cpu_ext()) is not None):
        # The per-step case (float32 numpy, threads given): the extension checks dtypes,
        # ranks, layout and shapes itself with the same messages, so go straight there.
        out = ext.fusion_softmax(h_in, docs, W_a, None, return_scores, threads, "")
        return out if return_scores else out[:2]
    on_cuda = is_cuda(h_in) or is_cuda(docs)
    name = resolve_backend(op, backend, _FUSION_SOFTMAX_BACKENDS, on_cuda)
    if on_cuda:
        return gpu_ops.fusion_softmax(name, h_in, docs, W_a, mask, return_scores)
    d = checked_array(op, "docs", docs, 3, (np.float32, np.float16, np.uint16))
    h, w, m = _fusion_inputs(op, h_in, W_a, mask, d.shape[1])
    if d.shape[0] != h.shape[0] or d.shape[2] != h.shape[1]:
        raise ValueError(f"{op}: docs must be [B, K, D] with B={h.shape[0]} and D={h.shape[1]} "
                         f"(from h_in), got {list(d.shape)}")
    out = _FUSION_SOFTMAX_IMPLS[name](h, d, w, m, return_scores, resolve_threads(op, threads), isa)
    return out if return_scores else out[:2]


def _gather_cpu(h, c, ids, w, m, return_scores, threads, isa):
    ext = _ext.require_cpu_ext()
    return ext.fusion_softmax_gather(h, c.data, c.scales, ids, w, m, return_scores, threads, isa or "")


def checked_gather_ids(op: str, ids: Any, n: int | None = None) -> np.ndarray:
    """ids as a C-contiguous int64 [B, K] array; with ``n``, also each in [0, n) or -1."""
    i = ids if type(ids) is np.ndarray else as_numpy(ids, "ids", op)
    if i.dtype.kind not in "iu" or i.ndim != 2:
        raise TypeError(f"{op}: ids must be an integer [B, K] array, got {i.dtype} of shape {tuple(i.shape)}")
    if i.dtype.type is not np.int64 or not i.flags.c_contiguous:
        i = np.ascontiguousarray(i, np.int64)
    if n is not None and i.size and (i.min() < -1 or i.max() >= n):
        raise ValueError(f"{op}: ids must lie in [0, N={n}) or be -1 (empty slot), got range [{i.min()}, {i.max()}]")
    return i


def _gather_torch(h, c, ids, w, m, return_scores, threads, isa):
    checked_gather_ids("fusion_softmax_gather", ids, c.n)  # the C++ kernel checks its own
    valid = ids >= 0 if m is None else m & (ids >= 0)
    return _fusion_torch("fusion_softmax_gather", h, reference.gather_rows(c, ids), w, valid, return_scores)


def as_corpus_matrix(x: Any, op: str = "as_corpus_matrix") -> CorpusMatrix:
    """CorpusMatrix over a float32/float16/bfloat16 [N, D] array or tensor, without copying
    (a uint16 array is bfloat16 bits); a CorpusMatrix is returned as is."""
    if isinstance(x, CorpusMatrix):
        return x
    a = checked_array(op, "corpus", x, 2, (np.float32, np.float16, np.uint16))
    return CorpusMatrix(a, {np.float32: "fp32", np.float16: "fp16", np.uint16: "bf16"}[a.dtype.type])


_FUSION_SOFTMAX_GATHER_IMPLS: dict[str, Callable[..., tuple]] = {"cpu": _gather_cpu, "torch": _gather_torch}
_FUSION_SOFTMAX_GATHER_BACKENDS = (*_FUSION_SOFTMAX_GATHER_IMPLS, *DEVICE_BACKENDS)


def fusion_softmax_gather(
    h_in: Any, corpus: CorpusMatrix | Any, ids: Any, W_a: Any = None, *, mask: Any = None,
    return_scores: bool = False, threads: int | None = None, backend: str | None = None,
    isa: str | None = None,
) -> tuple[np.ndarray, ...]:
    """fusion_softmax over corpus rows ids [B, K] (e.g. topk_ip's ids), read in place.

    corpus: CorpusMatrix (fp32/bf16/fp16/int8) or a float32/float16/bfloat16 [N, D]
    array; ids: integer [B, K], -1 = empty slot (treated as masked). No [B, K, D]
    copy is made. Same outputs and rules as fusion_softmax.
    """
    op = "fusion_softmax_gather"
    on_cuda = is_cuda(h_in) or is_cuda(ids) or is_cuda(corpus)
    name = resolve_backend(op, backend, _FUSION_SOFTMAX_GATHER_BACKENDS, on_cuda)
    if on_cuda:
        return gpu_ops.fusion_softmax_gather(name, h_in, corpus, ids, W_a, mask, return_scores)
    c = as_corpus_matrix(corpus, op)
    i = checked_gather_ids(op, ids)
    h, w, m = _fusion_inputs(op, h_in, W_a, mask, i.shape[1])
    if i.shape[0] != h.shape[0] or c.dim != h.shape[1]:
        raise ValueError(f"{op}: need ids [B={h.shape[0]}, K] and corpus [N, D={h.shape[1]}], "
                         f"got ids {list(i.shape)} and corpus {list(c.shape)}")
    out = _FUSION_SOFTMAX_GATHER_IMPLS[name](h, c, i, w, m, return_scores, resolve_threads(op, threads), isa)
    return out if return_scores else out[:2]
