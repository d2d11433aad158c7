"""topk_ip as a Triton kernel: tensor-core tile scores + in-register top-K.

Each program owns a block of BQ queries and a strided set of BN-row corpus
tiles. A tile's scores come from `tl.dot` (tensor cores on a GPU; fp32
operands run as tf32x3 for bf16/fp16/int8 corpora, whose values tf32 holds
exactly, and as IEEE fp32 for an fp32 corpus), then become 64-bit keys
(order-preserving score bits, inverted row id) so that one integer sort
orders by score and breaks ties by the lower id. The program keeps its best
BN keys per query: sort the tile, take the elementwise max against the
reversed running best (the top half of a bitonic merge), sort again; a
tile with no key above any query's current KP-th best skips both sorts (after
the first tiles, nearly all of them on real data). Pass 2
(`select_keys`, torch) picks the k best of the programs' winners.
"""

from __future__ import annotations

import triton
import triton.language as tl

EMPTY_KEY = -(2**63)  # below every real key; decodes to (-inf, -1)
MAX_K = 128  # larger k: the caller's two-pass torch path (a [16, BN] sort of more spills)


@triton.jit
def pack_keys(s, rows):
    """int64 key, ordered as (score desc, row asc) under signed compare; -0 folds into +0."""
    s = tl.where(s == 0.0, 0.0, s)
    i = s.to(tl.int32, bitcast=True)
    o = tl.where(i >= 0, i, i ^ 0x7FFFFFFF)
    return (o.to(tl.int64) << 32) | (0xFFFFFFFF - rows.to(tl.int64))


@triton.jit
def _topk_ip_kernel(q_ptr, c_ptr, scale_ptr, allow_ptr, keys_ptr, bad_ptr, nq, n, d, tiles_per_prog,
                    HAS_SCALE: tl.constexpr, HAS_ALLOW: tl.constexpr, BQ: tl.constexpr,
                    BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr, PRECISION: tl.constexpr):
    pid_q = tl.program_id(0)
    pid_n = tl.program_id(1)
    nprog = tl.num_programs(1)
    rq = pid_q * BQ + tl.arange(0, BQ)
    qmask = rq < nq
    best = tl.full([BQ, BN], -(2**63), tl.int64)
    cols = tl.arange(0, BN)
    for t in range(0, tiles_per_prog):
        rn = (pid_n + t * nprog) * BN + tl.arange(0, BN)
        nmask = rn < n
        acc = tl.zeros([BQ, BN], tl.float32)
        for d0 in range(0, d, BD):
            rd = d0 + tl.arange(0, BD)
            dmask = rd < d
            qt = tl.load(q_ptr + rq[:, None] * d + rd[None, :], mask=qmask[:, None] & dmask[None, :], other=0.0)
            ct = tl.load(c_ptr + rn.to(tl.int64)[:, None] * d + rd[None, :], mask=nmask[:, None] & dmask[None, :], other=0)
            acc = tl.dot(qt, tl.trans(ct.to(tl.float32)), acc, input_precision=PRECISION)
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + rn, mask=nmask, other=0.0)[None, :]
        live = qmask[:, None] & nmask[None, :]
        finite = tl.abs(acc) <= 3.4028234663852886e38  # False for NaN and +-Inf
        bad_rows = tl.where(live & ~finite, rn[None, :].to(tl.int64), n)  # n: int, or a constant when N = 1
        tl.atomic_min(bad_ptr, tl.min(tl.min(bad_rows, 1), 0))
        ok = live & finite
        if HAS_ALLOW:
            ok = ok & (tl.load(allow_ptr + rn, mask=nmask, other=0) != 0)[None, :]
        keys = tl.where(ok, pack_keys(acc, rn[None, :]), -(2**63))
        # Threshold: the query's KP-th best key so far (best is sorted). Once the
        # kept set is full, most tiles hold no key above it and skip both sorts.
        kth = tl.max(tl.where(cols[None, :] == KP - 1, best, -(2**63)), 1)
        if tl.max(tl.max(tl.where(keys > kth[:, None], 1, 0), 1), 0) > 0:
            new = tl.sort(keys, dim=1, descending=True)
            best = tl.sort(tl.maximum(best, tl.flip(new, dim=1)), dim=1, descending=True)
    out = keys_ptr + (rq[:, None] * nprog + pid_n) * KP + cols[None, :]
    tl.store(out, best, mask=qmask[:, None] & (cols < KP)[None, :])


def topk_ip_keys(queries, corpus, scales, allow, kp: int, programs: int, interpret: bool):
    """Pass 1: per query, the KP best keys of each of `programs` tile sets.

    queries [Q, D] float32; corpus [N, D] float32/bfloat16/float16/int8; scales
    [N] float32 or None; allow [N] uint8 (1 = allowed) or None; kp a power of two
    <= MAX_K. Returns (keys [Q, programs * kp] int64, bad [1] int64: the first row
    with a non-finite score, or N).
    """
    import torch

    nq, d = queries.shape
    n = corpus.shape[0]
    bq, bn, bd = 16, max(64, kp), 64
    ntiles = triton.cdiv(n, bn)
    programs = max(1, min(programs, ntiles))
    keys = torch.empty((nq, programs * kp), dtype=torch.int64, device=queries.device)
    bad = torch.full((1,), n, dtype=torch.int64, device=queries.device)
    exact = interpret or corpus.dtype == torch.float32
    grid = (triton.cdiv(nq, bq), programs)
    _topk_ip_kernel[grid](
        queries, corpus, scales if scales is not None else queries, allow if allow is not None else queries,
        keys, bad, nq, n, d, triton.cdiv(ntiles, programs),
        HAS_SCALE=scales is not None, HAS_ALLOW=allow is not None, BQ=bq, BN=bn, BD=bd, KP=kp,
        PRECISION="ieee" if exact else "tf32x3", num_warps=8)
    return keys, bad
