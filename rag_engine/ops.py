"""The one dispatch point for every op.

`ops.<op>(..., backend=None)` picks the implementation: the `backend=`
argument, else the RAG_ENGINE_BACKEND environment variable, else the best
available for the inputs' device (CUDA tensors: cuda -> triton, with topk_ip
on 16 or more queries going to triton when it is there; otherwise: cpu (C++
extension) -> torch). A backend asked for explicitly that is not
available raises BackendUnavailableError: never a silent fallback.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from rag_engine import _ext, gpu_ops, reference
from rag_engine.corpus import CorpusMatrix, as_numpy
from rag_engine.errors import BackendUnavailableError
from rag_engine.gpu import DEVICE_BACKENDS

BACKENDS = ("cuda", "triton", "cpu", "torch")
# topk_ip on CUDA tensors, backend chosen automatically: from this many queries
# the Triton kernel (tensor-core dot) beats the CUDA one (H100: Q=16 27.9 vs
# 34.2 ms, Q=256 425 vs 548 ms at N=10M, D=768 bf16; Q=1 the CUDA scan, 6.1 ms).
TRITON_TOPK_MIN_QUERIES = 16
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
    if type(x) is np.ndarray:
        return False
    dev = getattr(x, "device", None)
    if dev is not None and getattr(dev, "type", None) == "cuda":
        return True
    return hasattr(x, "__cuda_array_interface__")


def _env_reader(name: str) -> Callable[[], str | None]:
    """A reader of one environment variable that sees os.environ changes made at
    run time (monkeypatch.setenv, os.environ[...] = ...) at a fraction of the
    cost of os.environ.get, which re-encodes the key on every call: this runs on
    every op call, where a few hundred nanoseconds are a visible share."""
    data = getattr(os.environ, "_data", None)
    encodekey, decodevalue = getattr(os.environ, "encodekey", None), getattr(os.environ, "decodevalue", None)
    if not isinstance(data, dict) or encodekey is None or decodevalue is None:
        return lambda: os.environ.get(name)
    key = encodekey(name)

    def read() -> str | None:
        v = data.get(key)
        return None if v is None else decodevalue(v)

    return read


_backend_env = _env_reader(BACKEND_ENV)
_threads_env = _env_reader(THREADS_ENV)
# The default backend per (implemented backends, CUDA inputs): availability is
# fixed for the life of the process (extension import, torch import, device).
_DEFAULT_BACKEND: dict[tuple[tuple[str, ...], bool], str] = {}


def resolve_backend(op: str, backend: str | None, implemented: Sequence[str], on_cuda: bool) -> str:
    """Name of the backend that runs `op` (see module docstring for the rule)."""
    requested = backend if backend is not None else (_backend_env() or None)
    if requested is None:
        key = (tuple(implemented), on_cuda)
        name = _DEFAULT_BACKEND.get(key)
        if name is None:
            order = ("cuda", "triton", "torch") if on_cuda else ("cpu", "torch")
            name = next((b for b in order if b in implemented and _AVAILABLE[b]()), None)
            if name is None:
                raise BackendUnavailableError(
                    f"{op}: no backend available for {'CUDA' if on_cuda else 'CPU'} inputs")
            _DEFAULT_BACKEND[key] = name
        return name
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


def available_backends(op_impls: Sequence[str] = BACKENDS) -> list[str]:
    return [b for b in op_impls if _AVAILABLE[b]()]


def resolve_threads(op: str, threads: int | None) -> int:
    """0 means the OpenMP default (OMP_NUM_THREADS, else all cores)."""
    if type(threads) is int and threads >= 1:  # the common case, checked cheaply
        return threads
    if threads is None:
        env = _threads_env()
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
_TOPK_IP_BACKENDS = (*_TOPK_IP_IMPLS, *DEVICE_BACKENDS)


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
    name = resolve_backend(op, backend, _TOPK_IP_BACKENDS, on_cuda)
    if on_cuda:  # CUDA tensors in, CUDA tensors out (rag_engine.gpu_ops)
        shape = getattr(queries, "shape", ())
        if (name == "cuda" and backend is None and not _backend_env() and len(shape) == 2
                and shape[0] >= TRITON_TOPK_MIN_QUERIES and _AVAILABLE["triton"]()):
            name = "triton"  # tensor-core tiles (the CUDA scan runs on FMA units)
        return gpu_ops.topk_ip(name, queries, corpus, check_k(op, k), ids_filter)
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


# ---------------------------------------------------------------------------
# fusion_softmax / fusion_softmax_gather
# ---------------------------------------------------------------------------


def _array(op: str, name: str, x: Any, ndim: int, dtypes: tuple = (np.float32,)) -> np.ndarray:
    """Zero-copy C-contiguous view of rank `ndim` in one of `dtypes`.

    No finiteness scan here (it would cost more than the kernel): the kernels
    detect non-finite values where they matter and raise naming the position.
    bfloat16 (ml_dtypes or torch) comes back as its uint16 bits.
    """
    a = x if type(x) is np.ndarray else as_numpy(x, name, op)
    kind = a.dtype.type  # identity tests on the scalar type: the cheap check on this hot path
    if kind is ml_dtypes.bfloat16:
        a, kind = a.view(np.uint16), np.uint16
    if kind not in dtypes:
        want = " or ".join("bfloat16 (uint16 bits)" if t == np.uint16 else np.dtype(t).name for t in dtypes)
        raise TypeError(f"{op}: {name} must be {want}, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (got strides {a.strides}); "
                         "pass np.ascontiguousarray(x) / x.contiguous()")
    return a


def _fusion_inputs(op: str, h_in: Any, W_a: Any, mask: Any, k: int) -> tuple:
    h = _array(op, "h_in", h_in, 2)
    b, d = h.shape
    if k <= 0:
        raise ValueError(f"{op}: K must be > 0 (at least one document slot per row), got K={k}")
    w = None if W_a is None else _array(op, "W_a", W_a, 2)
    if w is not None and w.shape != (d, d):
        raise ValueError(f"{op}: W_a must be [D, D] = [{d}, {d}], got {list(w.shape)}")
    m = None if mask is None else _array(op, "mask", mask, 2, (np.bool_,))
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
    on_cuda = is_cuda(h_in) or is_cuda(docs)
    name = resolve_backend(op, backend, _FUSION_SOFTMAX_BACKENDS, on_cuda)
    if on_cuda:
        return gpu_ops.fusion_softmax(name, h_in, docs, W_a, mask, return_scores)
    d = _array(op, "docs", docs, 3, (np.float32, np.float16, np.uint16))
    h, w, m = _fusion_inputs(op, h_in, W_a, mask, d.shape[1])
    if d.shape[0] != h.shape[0] or d.shape[2] != h.shape[1]:
        raise ValueError(f"{op}: docs must be [B, K, D] with B={h.shape[0]} and D={h.shape[1]} "
                         f"(from h_in), got {list(d.shape)}")
    out = _FUSION_SOFTMAX_IMPLS[name](h, d, w, m, return_scores, resolve_threads(op, threads), isa)
    return out if return_scores else out[:2]


def _gather_cpu(h, c, ids, w, m, return_scores, threads, isa):
    ext = _ext.require_cpu_ext()
    return ext.fusion_softmax_gather(h, c.data, c.scales, ids, w, m, return_scores, threads, isa or "")


def _gather_torch(h, c, ids, w, m, return_scores, threads, isa):
    if ids.size and (ids.min() < -1 or ids.max() >= c.n):  # the C++ kernel checks its own
        raise ValueError(f"fusion_softmax_gather: ids must lie in [0, N={c.n}) or be -1 (empty slot), "
                         f"got range [{ids.min()}, {ids.max()}]")
    valid = ids >= 0 if m is None else m & (ids >= 0)
    return _fusion_torch("fusion_softmax_gather", h, reference.gather_rows(c, ids), w, valid, return_scores)


def as_corpus_matrix(x: Any, op: str = "as_corpus_matrix") -> CorpusMatrix:
    """CorpusMatrix over a float32/float16/bfloat16 [N, D] array or tensor, without copying
    (a uint16 array is bfloat16 bits); a CorpusMatrix is returned as is."""
    if isinstance(x, CorpusMatrix):
        return x
    a = _array(op, "corpus", x, 2, (np.float32, np.float16, np.uint16))
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
    i = ids if type(ids) is np.ndarray else as_numpy(ids, "ids", op)
    if i.dtype.kind not in "iu" or i.ndim != 2:
        raise TypeError(f"{op}: ids must be an integer [B, K] array, got {i.dtype} of shape {tuple(i.shape)}")
    if i.dtype.type is not np.int64 or not i.flags.c_contiguous:
        i = np.ascontiguousarray(i, np.int64)
    h, w, m = _fusion_inputs(op, h_in, W_a, mask, i.shape[1])
    if i.shape[0] != h.shape[0] or c.dim != h.shape[1]:
        raise ValueError(f"{op}: need ids [B={h.shape[0]}, K] and corpus [N, D={h.shape[1]}], "
                         f"got ids {list(i.shape)} and corpus {list(c.shape)}")
    out = _FUSION_SOFTMAX_GATHER_IMPLS[name](h, c, i, w, m, return_scores, resolve_threads(op, threads), isa)
    return out if return_scores else out[:2]



# ---------------------------------------------------------------------------
# rag_token_marg / rag_token_sample
# ---------------------------------------------------------------------------


def _marg_inputs(op: str, log_alpha: Any, logits: Any) -> tuple[np.ndarray, np.ndarray]:
    la, x = _array(op, "log_alpha", log_alpha, 2), _array(op, "logits", logits, 3)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: logits must be [B, K, V] with K > 0 and V > 0, got {list(x.shape)}")
    if la.shape != x.shape[:2]:
        raise ValueError(f"{op}: log_alpha must be [B, K] = {list(x.shape[:2])} (from logits), got {list(la.shape)}")
    if np.isnan(la).any() or (la == np.inf).any() or not np.isfinite(la).any(axis=1).all():
        raise ValueError(f"{op}: log_alpha must be finite or -inf with a finite entry per row, got {la}")
    return la, x


def _number(op: str, name: str, x: Any, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not np.isfinite(x) \
            or x < low or x > high or (low_open and x == low):
        raise ValueError(f"{op}: {name} must be in {'(' if low_open else '['}{low}, {high}], got {x!r}")
    return float(x)


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
    t = _number(op, "temperature", temperature, 0.0, np.inf, low_open=True)
    if is_cuda(logits):
        return gpu_ops.rag_token_marg(name, log_alpha, logits, t)
    la, x = _marg_inputs(op, log_alpha, logits)
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
    Applied in the generator's order: temperature on the marginal log-probs (0 =
    greedy argmax), top_k (ties kept), top_p, min_p, then the inverse CDF in
    token-id order (see reference.sample_log_probs). Random stream: row b uses
    the b-th of `generator.random(B)`, generator = np.random.default_rng(seed)
    when not given, so the reference reproduces every draw.
    Returns (tokens [B] int64, logprobs [B] float32: marginal log-prob of each token).
    """
    op = "rag_token_sample"
    name = resolve_backend(op, backend, ("cpu", "torch"), is_cuda(logits))
    get = lambda attr, default: default if sampling is None else getattr(sampling, attr, default)  # noqa: E731
    temperature = _number(op, "temperature", get("temperature", 1.0), 0.0, np.inf)
    top_p = _number(op, "top_p", get("top_p", 1.0), 0.0, 1.0, low_open=True)
    min_p = _number(op, "min_p", get("min_p", 0.0), 0.0, 1.0)
    top_k = get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < -1:
        raise ValueError(f"{op}: top_k must be an int >= -1 (0 or -1: off), got {top_k!r}")
    la, x = _marg_inputs(op, log_alpha, logits)
    rng = generator if generator is not None else np.random.default_rng(get("seed", None))
    u = rng.random(la.shape[0])
    if name == "torch":
        lp = _marg_torch(op, la, x, 1.0)
        tokens = reference.sample_log_probs(lp, u, temperature, int(top_k), top_p, min_p)
        return tokens, lp[np.arange(lp.shape[0]), tokens]
    return _ext.require_cpu_ext().rag_token_sample(
        la, x, temperature, max(int(top_k), 0), top_p, min_p, u, resolve_threads(op, threads), isa or "")
