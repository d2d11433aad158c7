"""topk_ip, fusion_softmax and rag_token_marg for CUDA tensors (called by rag_engine.ops).

Each op checks its inputs once (rag_engine.gpu), computes u = W_aᵀ h_in or
the key layout it needs, and runs one of three backends on the inputs'
device: `cuda` (rag_engine._C_cuda), `triton` (rag_engine.kernels) or
`torch` (plain torch ops, also the two-pass path for topk_ip when k is
beyond what the kernels keep in shared memory / registers). Results are
torch tensors on that device, with the same contracts as the CPU ops.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from rag_engine import gpu
from rag_engine.gpu import (
    DeviceCorpus,
    as_tensor,
    check_devices,
    check_finite,
    check_tensor,
    ptr,
    require_torch,
)

_FLOATS = ("float32", "bfloat16", "float16")


def _programs(device: Any, per_sm: int = 4) -> int:
    """About how many programs fill the device (a few for the interpreter on CPU)."""
    torch = require_torch()
    if device.type != "cuda":
        return 4
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _on_device(device: Any):
    """`torch.cuda.device(device)`, or nothing when it is already current (saves a set/restore per call)."""
    torch = require_torch()
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _run_cuda(device: Any, fn, *args) -> None:
    with _on_device(device):
        fn(*args, gpu.stream_handle(device))


def _interpret_errstate():
    """The interpreter runs kernels in numpy: masked-off lanes may compute inf - inf."""
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


# ---------------------------------------------------------------------------
# topk_ip
# ---------------------------------------------------------------------------


def topk_ip(backend: str, queries: Any, corpus: Any, k: int, ids_filter: Any = None) -> tuple[Any, Any]:
    """Device topk_ip: scores [Q, min(k, N)] float32 and ids int64 (1-D for a 1-D query)."""
    op = "topk_ip"
    torch = require_torch()
    q = as_tensor(op, "queries", queries)
    one = q.dim() == 1
    q = q[None] if one else q
    c = DeviceCorpus.wrap(corpus, op)
    dev = check_devices(op, backend, queries=q, corpus=c.data, scales=c.scales)
    check_tensor(op, "queries", q, 2, ("float32",))
    if c.n == 0:
        raise ValueError(f"{op}: corpus is empty (N=0)")
    if q.shape[1] != c.dim:
        raise ValueError(f"{op}: queries have D={q.shape[1]} but the corpus has D={c.dim}")
    check_finite(op, "queries", q)
    allow = None if ids_filter is None else gpu.allow_mask(op, ids_filter, c.n, dev)
    kk = min(k, c.n)
    if q.shape[0] == 0:
        s, i = torch.empty((0, kk), device=dev), torch.empty((0, kk), dtype=torch.int64, device=dev)
    elif backend == "cuda" and kk <= gpu.require_cuda_ext().topk_ip_max_k:
        s, i = _topk_cuda(op, q, c, k, allow)
    elif backend == "triton" and kk <= gpu.require_kernels().TOPK_IP_MAX_K:
        s, i = _topk_triton(op, q, c, kk, allow)
    else:  # torch, or k beyond the kernels' in-chip limit: the two-pass path
        s, i = _topk_torch(op, q, c, kk, allow)
    return (s[0], i[0]) if one else (s, i)


def _raise_bad_row(op: str, row: int) -> None:
    raise ValueError(f"{op}: corpus row {row} gives a non-finite score "
                     "(NaN/Inf in the corpus, or float32 overflow)")


def _topk_cuda(op, q, c: DeviceCorpus, k, allow):
    torch = require_torch()
    ext = gpu.require_cuda_ext()
    nq, d = q.shape
    kk = min(k, c.n)
    scores = torch.empty((nq, kk), dtype=torch.float32, device=q.device)
    ids = torch.empty((nq, kk), dtype=torch.int64, device=q.device)
    bitmap = None if allow is None else gpu.pack_bits(allow)
    with _on_device(q.device):
        ws_bytes = ext.topk_ip_workspace(nq, d, c.dtype, c.n, k)
    ws = torch.empty(max(ws_bytes, 8), dtype=torch.uint8, device=q.device)
    bad = gpu.new_bad(q.device, -1)
    _run_cuda(q.device, ext.topk_ip, ptr(q), nq, d, ptr(c.data), c.dtype, c.n, ptr(c.scales), ptr(bitmap), k,
              ptr(scores), ptr(ids), ptr(ws), ws.numel(), ptr(bad))
    row = int(bad.item())
    if row != -1:
        _raise_bad_row(op, row)
    return scores, ids


def _topk_triton(op, q, c: DeviceCorpus, kk, allow):
    kernels = gpu.require_kernels()
    kp = 1 << max(0, (kk - 1).bit_length())
    qblocks = -(-q.shape[0] // 16)
    programs = max(1, _programs(q.device) // qblocks)
    allow_u8 = None if allow is None else allow.to(require_torch().uint8)
    with _interpret_errstate():
        keys, bad = kernels.topk_ip_keys(q, c.data, c.scales, allow_u8, kp, programs,
                                         interpret=q.device.type != "cuda")
    row = int(bad.item())
    if row != c.n:
        _raise_bad_row(op, row)
    return gpu.select_keys(keys, kk)


def _topk_torch(op, q, c: DeviceCorpus, kk, allow, chunk: int = 1 << 16):
    """Two passes per chunk of rows: fp32 matmul, then top-k over (chunk + kept) keys."""
    torch = require_torch()
    best = torch.full((q.shape[0], 0), gpu.EMPTY_KEY, dtype=torch.int64, device=q.device)
    first_bad = torch.full((), c.n, dtype=torch.int64, device=q.device)  # read once, after the scan
    for a in range(0, c.n, chunk):
        b = min(c.n, a + chunk)
        s = q @ c.rows(a, b).T
        rows = torch.arange(a, b, device=q.device)
        first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(s).all(0), c.n, rows).min())
        keys = gpu.pack_keys(s, rows[None, :])
        if allow is not None:
            keys = keys.masked_fill(~allow[None, a:b], gpu.EMPTY_KEY)
        best = torch.cat([best, keys], 1)
        best = torch.topk(best, min(kk, best.shape[1]), dim=1).values
    row = int(first_bad.item())
    if row != c.n:
        _raise_bad_row(op, row)
    return gpu.select_keys(best, kk)


# ---------------------------------------------------------------------------
# fusion_softmax / fusion_softmax_gather
# ---------------------------------------------------------------------------


def fusion_softmax(backend: str, h_in: Any, docs: Any, W_a: Any = None, mask: Any = None,
                   return_scores: bool = False) -> tuple:
    """Device fusion_softmax over dense docs [B, K, D] (see ops.fusion_softmax)."""
    op = "fusion_softmax"
    d = as_tensor(op, "docs", docs)
    check_tensor(op, "docs", d, 3, _FLOATS)
    return _fusion(op, backend, h_in, W_a, mask, return_scores, d, None, None)


def fusion_softmax_gather(backend: str, h_in: Any, corpus: Any, ids: Any, W_a: Any = None, mask: Any = None,
                          return_scores: bool = False) -> tuple:
    """Device fusion_softmax over corpus rows ids [B, K] (-1 = empty slot)."""
    op = "fusion_softmax_gather"
    torch = require_torch()
    c = DeviceCorpus.wrap(corpus, op)
    i = as_tensor(op, "ids", ids)
    if i.dtype.is_floating_point or i.dtype == torch.bool or i.dim() != 2:
        raise TypeError(f"{op}: ids must be an integer [B, K] tensor, got {i.dtype} of shape {tuple(i.shape)}")
    i = i.to(torch.int64).contiguous()
    if i.numel() and (int(i.min()) < -1 or int(i.max()) >= c.n):
        raise ValueError(f"{op}: ids must lie in [0, N={c.n}) or be -1 (empty slot), "
                         f"got range [{int(i.min())}, {int(i.max())}]")
    return _fusion(op, backend, h_in, W_a, mask, return_scores, c.data, c.scales, i)


def _fusion(op, backend, h_in, W_a, mask, return_scores, docs, scales, ids):
    torch = require_torch()
    h = as_tensor(op, "h_in", h_in)
    check_tensor(op, "h_in", h, 2, ("float32",))
    b, dim = h.shape
    k = ids.shape[1] if ids is not None else docs.shape[1]
    if k == 0:
        raise ValueError(f"{op}: K must be > 0 (at least one document slot per row), got K=0")
    if (ids is not None and (ids.shape[0] != b or docs.shape[1] != dim)) or \
            (ids is None and (docs.shape[0] != b or docs.shape[2] != dim)):
        raise ValueError(f"{op}: documents must match h_in [B={b}, D={dim}], got "
                         f"{'ids ' + str(list(ids.shape)) + ' and corpus ' if ids is not None else 'docs '}"
                         f"{list(docs.shape)}")
    w = None if W_a is None else as_tensor(op, "W_a", W_a)
    m = None if mask is None else as_tensor(op, "mask", mask)
    dev = check_devices(op, backend, h_in=h, docs=docs, scales=scales, ids=ids, W_a=w, mask=m)
    if w is not None:
        check_tensor(op, "W_a", w, 2, ("float32",))
        if tuple(w.shape) != (dim, dim):
            raise ValueError(f"{op}: W_a must be [D, D] = [{dim}, {dim}], got {list(w.shape)}")
    if m is not None:
        check_tensor(op, "mask", m, 2, ("bool",))
        if tuple(m.shape) != (b, k):
            raise ValueError(f"{op}: mask must be [B, K] = [{b}, {k}], got {list(m.shape)}")
    # torch, or a row too long for the Triton kernel's registers: the torch expressions
    kernel = backend == "cuda" or (backend == "triton" and dim <= gpu.require_kernels().FUSION_MAX_D)
    if kernel and b > 0:  # read with the kernel's flag (_check_fusion): one host sync per call
        h_ok = torch.isfinite(h).all()
    else:
        check_finite(op, "h_in", h)
    u = h if w is None else h @ w  # u[b] = W_aᵀ h_in[b]: one GEMM for the batch
    if b == 0:
        z = torch.zeros((0, k), device=dev)
        out = (z, torch.zeros((0, dim), device=dev), z)
    elif not kernel:
        out = _fusion_torch(op, u, docs, scales, ids, m, k)
    elif backend == "cuda":
        *out, bad = _fusion_cuda(op, u.contiguous(), docs, scales, ids, m, k)
        _check_fusion(op, h, h_ok, bad, -1, k)
    else:
        with _interpret_errstate():
            *out, bad = gpu.require_kernels().fusion_softmax(u.contiguous(), docs, ids, scales, m)
        _check_fusion(op, h, h_ok, bad, 2**62, k)
    return tuple(out) if return_scores else tuple(out[:2])


def _read_flags(bad: Any, flag: Any) -> tuple[int, int]:
    """A kernel's error slot and a bool check computed beside it, read in one host sync."""
    torch = require_torch()
    slot, value = torch.stack([bad.reshape(()), flag.to(torch.int64)]).tolist()
    return slot, value


def _check_fusion(op, h, h_ok, bad, sentinel, k) -> None:
    slot, ok = _read_flags(bad, h_ok)
    if not ok:
        check_finite(op, "h_in", h)  # raises, naming the row
    _check_slot(op, slot, sentinel, k)


def _check_slot(op: str, slot: int, sentinel: int, k: int) -> None:
    if slot != sentinel:
        raise ValueError(f"{op}: document (b={slot // k}, k={slot % k}) gives a non-finite score "
                         "(NaN/Inf in h_in, W_a or the document, or float32 overflow)")


def _fusion_cuda(op, u, docs, scales, ids, m, k):
    torch = require_torch()
    ext = gpu.require_cuda_ext()
    b, dim = u.shape
    alpha = torch.empty((b, k), dtype=torch.float32, device=u.device)
    h_aug = torch.empty((b, dim), dtype=torch.float32, device=u.device)
    scores = torch.empty((b, k), dtype=torch.float32, device=u.device)
    bad = gpu.new_bad(u.device, -1)
    dtype = gpu.storage_name(docs)
    n = docs.shape[0] if ids is not None else 0
    _run_cuda(u.device, ext.fusion_softmax, ptr(u), b, dim, k, ptr(docs), dtype, ptr(scales), ptr(ids), n,
              ptr(None if m is None else m.view(torch.uint8)), ptr(alpha), ptr(h_aug), ptr(scores), ptr(bad))
    return alpha, h_aug, scores, bad


def _fusion_torch(op, u, docs, scales, ids, m, k):
    torch = require_torch()
    valid = torch.ones(u.shape[0], k, dtype=torch.bool, device=u.device) if m is None else m.clone()
    if ids is not None:
        rows = ids.clamp(min=0)
        x = docs[rows].float()
        if scales is not None:
            x = x * scales[rows][..., None]
        valid &= ids >= 0
    else:
        x = docs.float()
    s = torch.einsum("bd,bkd->bk", u, x)
    bad = valid & ~torch.isfinite(s)
    if bool(bad.any()):
        _check_slot(op, int(torch.nonzero(bad.reshape(-1))[0][0]), -1, k)
    s = s.masked_fill(~valid, float("-inf"))
    top = s.max(1, keepdim=True).values
    e = torch.where(valid, torch.exp(s - torch.where(valid.any(1, keepdim=True), top, 0.0)), 0.0)
    total = e.sum(1, keepdim=True)
    alpha = torch.where(total > 0, e / total.clamp(min=1e-38), 0.0)
    return alpha, torch.einsum("bk,bkd->bd", alpha, x), s


# ---------------------------------------------------------------------------
# rag_token_marg
# ---------------------------------------------------------------------------


def rag_token_marg(backend: str, log_alpha: Any, logits: Any, temperature: float) -> Any:
    """Device rag_token_marg: log p [B, V] float32 (see ops.rag_token_marg)."""
    op = "rag_token_marg"
    torch = require_torch()
    la, x = as_tensor(op, "log_alpha", log_alpha), as_tensor(op, "logits", logits)
    dev = check_devices(op, backend, log_alpha=la, logits=x)
    check_tensor(op, "log_alpha", la, 2, ("float32",))
    check_tensor(op, "logits", x, 3, _FLOATS)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{op}: logits must be [B, K, V] with K > 0 and V > 0, got {list(x.shape)}")
    if tuple(la.shape) != tuple(x.shape[:2]):
        raise ValueError(f"{op}: log_alpha must be [B, K] = {list(x.shape[:2])} (from logits), "
                         f"got {list(la.shape)}")
    b, k, v = x.shape
    it = 1.0 / temperature
    if b == 0:  # log_alpha is [0, K]: nothing to check
        return torch.empty((0, v), device=dev)
    # read together with the kernels' flag below: one host sync per call
    # a row's max is NaN or +inf if the row holds one, -inf if the row has no finite entry
    la_bad = ~torch.isfinite(la.amax(1)).all()
    if backend == "cuda":
        ext = gpu.require_cuda_ext()
        out = torch.empty((b, v), dtype=torch.float32, device=dev)
        with _on_device(dev):
            ws = torch.empty(max(8, ext.rag_token_marg_workspace(b, k, v)), dtype=torch.uint8, device=dev)
        bad, sentinel = gpu.new_bad(dev, -1), -1
        _run_cuda(dev, ext.rag_token_marg, ptr(la), ptr(x), gpu.storage_name(x), b, k, v, it, ptr(out), ptr(ws), ws.numel(),
                  ptr(bad))
    elif backend == "triton":
        with _interpret_errstate():
            out, bad = gpu.require_kernels().rag_token_marg(la, x, it, _programs(dev, 2))
        sentinel = 2**62
    else:
        xf = x.float() * it
        out = torch.logsumexp(la[..., None] + torch.log_softmax(xf, -1), 1)
        rows = (torch.isnan(xf) | (xf == float("inf"))).any(-1) | ~torch.isfinite(xf).any(-1)
        bad = torch.nonzero(rows.reshape(-1))[:1].reshape(-1)
        bad, sentinel = (bad, -1) if bad.numel() else (gpu.new_bad(dev, -1), -1)
    row, la_bad = _read_flags(bad, la_bad)
    if la_bad:
        raise ValueError(f"{op}: log_alpha must be finite or -inf with a finite entry per row")
    if row != sentinel:
        raise ValueError(f"{op}: logits row (b={row // k}, k={row % k}) contains NaN or +Inf, "
                         "or has no finite value")
    return out
