"""Plain numpy/torch versions of every op: the truth the kernels are tested against.

Readable, not fast. Results follow the same contracts as the kernels
(shapes, dtypes, ordering, tie rule) so tests can compare them directly.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from rag_engine.corpus import CorpusMatrix


def sort_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score desc, id asc) of candidate (scores, ids) `[Q, M]`.

    Entries with id -1 (padding) always sort last.
    """
    order = np.lexsort((ids, ids < 0, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def topk_ip(
    queries: np.ndarray,
    corpus: CorpusMatrix | np.ndarray,
    k: int,
    allow: np.ndarray | None = None,
    dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, computed in `dtype` (float64 by default).

    queries [Q, D]; corpus [N, D]; allow: optional bool mask [N].
    Returns scores [Q, min(k, N)] (in `dtype`) and ids int64, score-descending,
    ties by lower id; rows the mask leaves unfilled get -inf / -1.
    """
    c = corpus.to_float(dtype) if isinstance(corpus, CorpusMatrix) else np.asarray(corpus, dtype)
    s = np.asarray(queries, dtype) @ c.T
    n = c.shape[0]
    ids = np.broadcast_to(np.arange(n, dtype=np.int64), s.shape).copy()
    if allow is not None:
        s = np.where(allow[None, :], s, -np.inf)
        ids = np.where(allow[None, :], ids, -1)
    return sort_topk(s, ids, min(k, n))


def topk_ip_torch(queries: Any, corpus: CorpusMatrix, k: int, allow: np.ndarray | None = None,
                  chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """float32 torch version (the `torch` backend): chunked matmul, exact tie rule."""
    import torch

    q = torch.as_tensor(np.asarray(queries, np.float32))
    best_s = np.empty((q.shape[0], 0), np.float32)
    best_i = np.empty((q.shape[0], 0), np.int64)
    kk = min(k, corpus.n)
    for c0 in range(0, corpus.n, chunk):
        data, dtype, scales = _rows(corpus, c0, c0 + chunk)
        # int8 rows: score the integers, then scale (as the kernel does; scaling the rows first
        # rounds differently and breaks exact ties the other way)
        raw = data.astype(np.float32) if dtype == "int8" else CorpusMatrix(data, dtype).to_float()
        s = (q @ torch.from_numpy(raw).T).numpy()
        if scales is not None:
            s = s * scales[None, :]
        if not np.isfinite(s).all():
            row = c0 + int(np.argwhere(~np.isfinite(s))[:, 1].min())
            raise ValueError(f"topk_ip: corpus row {row} gives a non-finite score (NaN/Inf in the corpus, "
                             "or float32 overflow)")
        ids = np.broadcast_to(np.arange(c0, c0 + data.shape[0], dtype=np.int64), s.shape)
        if allow is not None:
            m = allow[c0 : c0 + data.shape[0]][None, :]
            s, ids = np.where(m, s, -np.inf), np.where(m, ids, -1)
        best_s, best_i = sort_topk(np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1), kk)
    return best_s.astype(np.float32), best_i


def _rows(c: CorpusMatrix, a: int, b: int) -> tuple[np.ndarray, str, np.ndarray | None]:
    return c.data[a:b], c.dtype, None if c.scales is None else c.scales[a:b]


# ---------------------------------------------------------------------------
# fusion_softmax
# ---------------------------------------------------------------------------


def doc_values(docs: Any, dtype: Any = np.float64) -> np.ndarray:
    """Document rows as floats: uint16 arrays are bfloat16 bits (CorpusMatrix bf16 storage)."""
    d = np.asarray(docs)
    if d.dtype == np.uint16:
        d = d.view(ml_dtypes.bfloat16)
    return d.astype(dtype)


def fusion_softmax(
    h_in: Any, docs: Any, W_a: Any = None, mask: Any = None, dtype: Any = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear attention fusion in `dtype` (float64 by default).

    h_in [B, D]; docs [B, K, D]; W_a [D, D] or None (identity); mask [B, K] bool
    (False = padded) or None. Returns alpha [B, K] = softmax_k(h_inᵀ W_a d_k) over
    the unmasked slots, h_aug [B, D] = Σ_k alpha_k d_k, and the raw scores [B, K]
    (-inf where masked). A row with every slot masked gets alpha 0 and h_aug 0.
    """
    h = np.asarray(h_in, dtype)
    d = doc_values(docs, dtype)
    u = h if W_a is None else h @ np.asarray(W_a, dtype)
    valid = np.ones(d.shape[:2], bool) if mask is None else np.asarray(mask, bool)
    s = np.where(valid, np.einsum("bd,bkd->bk", u, d), -np.inf)
    m = s.max(axis=1, keepdims=True)
    e = np.where(valid, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
    total = e.sum(axis=1, keepdims=True)
    alpha = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return alpha, np.einsum("bk,bkd->bd", alpha, np.where(valid[..., None], d, 0.0)), s


def fusion_softmax_torch(h_in: Any, docs: Any, W_a: Any = None, mask: Any = None) -> tuple[Any, Any, Any]:
    """torch version (the `torch` backend and the benchmark contender), torch tensors out.

    Same contract as `fusion_softmax`; inputs are torch tensors or numpy arrays
    (uint16 = bfloat16 bits; half/bf16 documents are widened to float32).
    """
    import torch

    def tensor(x: Any) -> Any:
        if not isinstance(x, np.ndarray):
            return x
        if x.dtype == np.uint16:  # bfloat16 bits
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(x).float() if x.dtype == np.float16 else torch.from_numpy(x)

    h_in, docs, W_a, mask = (None if x is None else tensor(x) for x in (h_in, docs, W_a, mask))
    u = h_in if W_a is None else h_in @ W_a
    s = torch.einsum("bd,bkd->bk", u, docs)
    if mask is None:
        alpha = torch.softmax(s, dim=-1)
    else:
        s = s.masked_fill(~mask, float("-inf"))
        alpha = torch.softmax(s, dim=-1).nan_to_num(0.0)  # all-masked rows: 0, not NaN
        docs = docs.masked_fill(~mask[..., None], 0.0)  # a padded slot is never read
    return alpha, torch.einsum("bk,bkd->bd", alpha, docs), s


def gather_rows(corpus: CorpusMatrix, ids: np.ndarray) -> np.ndarray:
    """float32 copy of corpus rows at ids [B, K] (-1 reads row 0: callers mask it) -> [B, K, D]."""
    if corpus.n == 0:  # every id is -1 (nothing to read): zeros
        return np.zeros((*ids.shape, corpus.dim), np.float32)
    rows = np.maximum(ids, 0).reshape(-1)
    scales = None if corpus.scales is None else corpus.scales[rows]
    return CorpusMatrix(corpus.data[rows], corpus.dtype, scales).to_float().reshape(*ids.shape, corpus.dim)


def fusion_softmax_gather_torch(h_in: Any, corpus: Any, ids: Any, W_a: Any = None) -> tuple[Any, Any, Any]:
    """torch index_select of the K rows per query, then `fusion_softmax_torch` (benchmark contender)."""
    docs = corpus.index_select(0, ids.reshape(-1)).view(ids.shape[0], ids.shape[1], corpus.shape[1])
    return fusion_softmax_torch(h_in, docs, W_a)


# ---------------------------------------------------------------------------
# rag_token_marg / rag_token_sample
# ---------------------------------------------------------------------------


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """Stable log Σ exp along `axis` (an all -inf slice gives -inf)."""
    m = x.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def rag_token_marg(log_alpha: Any, logits: Any, temperature: float = 1.0, dtype: Any = np.float64) -> np.ndarray:
    """log p [B, V] = logsumexp_i(log_alpha[:, i] + log_softmax(logits[:, i] / T)) in `dtype`.

    log_alpha [B, K], logits [B, K, V].
    """
    x = np.asarray(logits, dtype) / np.asarray(temperature, dtype)
    log_p = x - logsumexp(x, axis=-1)[..., None]
    return logsumexp(np.asarray(log_alpha, dtype)[..., None] + log_p, axis=1)


def rag_token_marg_torch(log_alpha: Any, logits: Any, temperature: float = 1.0) -> Any:
    """torch version in the inputs' dtype (the `torch` backend and the benchmark contender)."""
    import torch

    x = logits if temperature == 1.0 else logits / temperature
    return torch.logsumexp(log_alpha[..., None] + torch.log_softmax(x, dim=-1), dim=1)


def sample_log_probs(
    log_probs: Any, uniforms: Any, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    min_p: float = 0.0,
) -> np.ndarray:
    """One token per row of log_probs [B, V] float32; the rules of rag_token_sample.

    Per row: z = log_probs / temperature (float32, as the kernel divides), w = exp(z - max z)
    (float64); top_k keeps z >= the k-th largest z (ties kept); top_p keeps tokens, in
    order of z descending then id, while the mass before them is < top_p * Σw; min_p
    keeps w >= min_p (p >= min_p * p_max); the token is the first, in id order, whose
    cumulative kept weight exceeds uniforms[b] * Σw. temperature below 1e-5 (0 included):
    first argmax.
    """
    lp = np.asarray(log_probs, np.float32)
    out = np.empty(lp.shape[0], np.int64)
    for b, row in enumerate(lp):
        if temperature < 1e-5:
            out[b] = int(np.argmax(row))
            continue
        z = row / np.float32(temperature)
        w = np.exp(z.astype(np.float64) - float(z.max()))
        if 0 < top_k < z.size:
            w[z < np.partition(z, -top_k)[-top_k]] = 0.0
        if top_p < 1.0:
            order = np.lexsort((np.arange(z.size), -z))
            order = order[w[order] > 0]
            before = np.cumsum(w[order]) - w[order]
            w[order[before >= top_p * w.sum()]] = 0.0
        if min_p > 0.0:
            w[w < min_p] = 0.0
        cdf = np.cumsum(w)
        out[b] = min(int(np.searchsorted(cdf, float(uniforms[b]) * cdf[-1], side="right")), z.size - 1)
    return out
