"""Plain numpy/torch versions of every op: the truth the kernels are tested against.

Readable, not fast. Results follow the same contracts as the kernels
(shapes, dtypes, ordering, tie rule) so tests can compare them directly.
"""

from __future__ import annotations

from typing import Any

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
        part = CorpusMatrix(*_rows(corpus, c0, c0 + chunk))
        s = (q @ torch.from_numpy(part.to_float()).T).numpy()
        ids = np.broadcast_to(np.arange(c0, c0 + part.n, dtype=np.int64), s.shape)
        if allow is not None:
            m = allow[c0 : c0 + part.n][None, :]
            s, ids = np.where(m, s, -np.inf), np.where(m, ids, -1)
        best_s, best_i = sort_topk(np.concatenate([best_s, s], 1), np.concatenate([best_i, ids], 1), kk)
    return best_s.astype(np.float32), best_i


def _rows(c: CorpusMatrix, a: int, b: int) -> tuple[np.ndarray, str, np.ndarray | None]:
    return c.data[a:b], c.dtype, None if c.scales is None else c.scales[a:b]
