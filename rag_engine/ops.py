"""The one dispatch point for every op.

`ops.<op>(..., backend=None)` picks the implementation: the `backend=`
argument, else the RAG_ENGINE_BACKEND environment variable, else the best
available for the inputs' device (CUDA tensors: cuda -> triton; otherwise:
cpu (C++ extension) -> torch). A backend asked for explicitly that is not
available raises BackendUnavailableError: never a silent fallback.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rag_engine import _ext, reference
from rag_engine.corpus import CorpusMatrix, as_numpy
from rag_engine.errors import BackendUnavailableError

BACKENDS = ("cuda", "triton", "cpu", "torch")
BACKEND_ENV = "RAG_ENGINE_BACKEND"
THREADS_ENV = "RAG_ENGINE_NUM_THREADS"

_AVAILABLE: dict[str, Callable[[], bool]] = {
    "cuda": lambda: _ext.cuda_ext() is not None and _ext.has_cuda_device(),
    "triton": _ext.has_triton,
    "cpu": lambda: _ext.cpu_ext() is not None,
    "torch": lambda: _ext.torch_module() is not None,
}


def is_cuda(x: Any) -> bool:
    """True for a torch CUDA tensor (or anything exposing __cuda_array_interface__)."""
    dev = getattr(x, "device", None)
    if dev is not None and getattr(dev, "type", None) == "cuda":
        return True
    return hasattr(x, "__cuda_array_interface__")


def resolve_backend(op: str, backend: str | None, implemented: Sequence[str], on_cuda: bool) -> str:
    """Name of the backend that runs `op` (see module docstring for the rule)."""
    requested = backend if backend is not None else (os.environ.get(BACKEND_ENV) or None)
    if requested is not None:
        source = "backend=" if backend is not None else f"{BACKEND_ENV}="
        if requested not in BACKENDS:
            raise ValueError(f"{op}: {source}{requested!r} is not a backend; expected one of {BACKENDS}")
        if requested not in implemented:
            raise BackendUnavailableError(
                f"{op}: {source}{requested!r} does not implement this op (implemented: {tuple(implemented)})"
            )
        if not _AVAILABLE[requested]():
            raise BackendUnavailableError(f"{op}: {source}{requested!r} is not available on this machine")
        if on_cuda != (requested in ("cuda", "triton")) and requested != "torch":
            where = "CUDA" if on_cuda else "CPU"
            raise ValueError(f"{op}: {source}{requested!r} cannot take {where} inputs")
        return requested
    order = ("cuda", "triton", "torch") if on_cuda else ("cpu", "torch")
    for name in order:
        if name in implemented and _AVAILABLE[name]():
            return name
    raise BackendUnavailableError(f"{op}: no backend available for {'CUDA' if on_cuda else 'CPU'} inputs")


def available_backends(op_impls: Sequence[str] = BACKENDS) -> list[str]:
    return [b for b in op_impls if _AVAILABLE[b]()]


def resolve_threads(op: str, threads: int | None) -> int:
    """0 means the OpenMP default (OMP_NUM_THREADS, else all cores)."""
    if threads is None:
        env = os.environ.get(THREADS_ENV)
        if not env:
            return 0
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"{op}: {THREADS_ENV} must be an integer, got {env!r}") from None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"{op}: threads must be a positive integer or None, got {threads!r}")
    return int(threads)


def check_k(op: str, k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{op}: k must be an int, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"{op}: k must be > 0, got {k}")
    return int(k)


def float32_matrix(op: str, name: str, x: Any, allow_1d: bool = False) -> np.ndarray:
    """Zero-copy float32, C-contiguous, finite `[rows, D]` view (a 1-D vector is one row)."""
    a = as_numpy(x, name, op)
    if a.dtype != np.float32:
        raise TypeError(f"{op}: {name} must be float32, got {a.dtype}")
    if a.ndim == 1 and allow_1d:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{op}: {name} must be 2-D [rows, D], got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (got strides {a.strides}); "
                         "pass np.ascontiguousarray(x) / x.contiguous()")
    if not np.isfinite(a).all():
        row = int(np.argwhere(~np.isfinite(a))[0][0])
        raise ValueError(f"{op}: {name} contains NaN/Inf (first at row {row})")
    return a


# ---------------------------------------------------------------------------
# topk_ip
# ---------------------------------------------------------------------------


def id_filter_bitmap(ids_filter: Any, n: int, op: str = "topk_ip") -> np.ndarray:
    """Packed allow-list bitmap (uint8, ceil(n/8) bytes, bit i LSB-first = row i).

    ids_filter: a bool mask [n], an already packed uint8 bitmap of ceil(n/8)
    bytes, or an integer array of allowed ids (any order, duplicates allowed).
    """
    f = as_numpy(ids_filter, "ids_filter", op)
    if f.ndim != 1:
        raise ValueError(f"{op}: ids_filter must be 1-D, got shape {f.shape}")
    if f.dtype == np.bool_:
        if f.shape[0] != n:
            raise ValueError(f"{op}: a bool ids_filter must have N={n} entries, got {f.shape[0]}")
        return np.packbits(f, bitorder="little")
    if f.dtype == np.uint8:
        if f.shape[0] != (n + 7) // 8:
            raise ValueError(f"{op}: a uint8 ids_filter is a packed bitmap of ceil(N/8)={(n + 7) // 8} "
                             f"bytes, got {f.shape[0]} (pass int64 ids for an id list)")
        return np.ascontiguousarray(f)
    if f.dtype.kind in "iu":
        if f.size and (f.min() < 0 or f.max() >= n):
            raise ValueError(f"{op}: ids_filter ids must lie in [0, {n}), got range [{f.min()}, {f.max()}]")
        mask = np.zeros(n, np.bool_)
        mask[f] = True
        return np.packbits(mask, bitorder="little")
    raise TypeError(f"{op}: ids_filter must be a bool mask, a uint8 bitmap or integer ids, got {f.dtype}")


def _topk_ip_cpu(q, c, k, bitmap, threads, isa):
    ext = _ext.require_cpu_ext()
    return ext.topk_ip(q, c.data, c.dtype, c.scales, k, bitmap, threads, isa or "")


def _topk_ip_torch(q, c, k, bitmap, threads, isa):
    allow = None
    if bitmap is not None:
        allow = np.unpackbits(bitmap, bitorder="little")[: c.n].astype(bool)
    return reference.topk_ip_torch(q, c, k, allow)


_TOPK_IP_IMPLS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "cpu": _topk_ip_cpu,
    "torch": _topk_ip_torch,
}


def topk_ip(
    queries: Any,
    corpus: CorpusMatrix | Any,
    k: int,
    *,
    ids_filter: Any = None,
    threads: int | None = None,
    backend: str | None = None,
    isa: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k corpus rows by inner product with each query.

    queries: [Q, D] (or [D]) float32. corpus: CorpusMatrix (fp32/bf16/fp16/int8)
    or a float32/float16/bfloat16 [N, D] array (wrapped without copying).
    Returns (scores [Q, min(k, N)] float32, ids [Q, min(k, N)] int64), sorted by
    score descending, ties broken by the lower id; a 1-D query gives 1-D results.
    ids_filter: allow-list (bool mask [N], packed uint8 bitmap, or int ids); slots
    it leaves unfilled hold score -inf and id -1.
    Non-finite values are refused: NaN/Inf queries at the boundary, a corpus row
    giving a non-finite score inside the scan (ValueError naming the row).
    threads: CPU threads (default RAG_ENGINE_NUM_THREADS, else OpenMP's default).
    isa: force a CPU path ("scalar", "avx2", "avx512"; default RAG_ENGINE_ISA or best).
    """
    op = "topk_ip"
    on_cuda = is_cuda(queries) or (not isinstance(corpus, CorpusMatrix) and is_cuda(corpus))
    name = resolve_backend(op, backend, tuple(_TOPK_IP_IMPLS), on_cuda)
    q = float32_matrix(op, "queries", queries, allow_1d=True)
    c = CorpusMatrix.wrap(corpus, op)
    k = check_k(op, k)
    if c.n == 0:
        raise ValueError(f"{op}: corpus is empty (N=0)")
    if not c.data.flags.c_contiguous:
        raise ValueError(f"{op}: corpus must be C-contiguous (got strides {c.data.strides})")
    if q.shape[1] != c.dim:
        raise ValueError(f"{op}: queries have D={q.shape[1]} but the corpus has D={c.dim}")
    bitmap = None if ids_filter is None else id_filter_bitmap(ids_filter, c.n, op)
    nthreads = resolve_threads(op, threads)
    scores, ids = _TOPK_IP_IMPLS[name](q, c, k, bitmap, nthreads, isa)
    if as_numpy(queries, "queries", op).ndim == 1:
        return scores[0], ids[0]
    return scores, ids


def merge_topk(
    results: Sequence[tuple[Any, Any]], k: int, offsets: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k results into the global top-k.

    results: one (scores [Q, k_i], ids [Q, k_i]) per shard; offsets: optional
    per-shard id offsets added to the shard-local ids (-1 padding is kept).
    Returns (scores [Q, min(k, sum k_i)], ids) with the same order and tie rule
    as topk_ip.
    """
    op = "merge_topk"
    k = check_k(op, k)
    if len(results) == 0:
        raise ValueError(f"{op}: results is empty; expected one (scores, ids) pair per shard")
    if offsets is not None and len(offsets) != len(results):
        raise ValueError(f"{op}: got {len(offsets)} offsets for {len(results)} shards")
    all_s, all_i = [], []
    for j, (s, i) in enumerate(results):
        s = np.atleast_2d(as_numpy(s, f"results[{j}] scores", op)).astype(np.float32, copy=False)
        i = np.atleast_2d(as_numpy(i, f"results[{j}] ids", op))
        if i.dtype.kind not in "iu":
            raise TypeError(f"{op}: results[{j}] ids must be integers, got {i.dtype}")
        if s.shape != i.shape or (all_s and s.shape[0] != all_s[0].shape[0]):
            raise ValueError(f"{op}: results[{j}] has scores {s.shape} and ids {i.shape}; "
                             f"expected matching [Q, k_i] with Q={all_s[0].shape[0] if all_s else s.shape[0]}")
        i = i.astype(np.int64)
        if offsets is not None:
            i = np.where(i >= 0, i + int(offsets[j]), -1)
        all_s.append(s)
        all_i.append(i)
    s, i = np.concatenate(all_s, 1), np.concatenate(all_i, 1)
    return reference.sort_topk(s, i, min(k, s.shape[1]))
