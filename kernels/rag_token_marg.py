"""rag_token_marg as Triton kernels: partial logsumexp per row, then the combination.

Pass 1: programs over (row b*K+i, V split) stream their slice once and keep a
running (max, Σ exp(x - max)) per lane, one exp per logit. Pass 2: programs
over (b, V block) merge the partials into lse_i and compute, per token,
logsumexp_i(log_alpha_i - lse_i + x_i / T) online over the K documents;
for decode-sized B*K*V the second read of the logits is served from L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

BV = 1024


@triton.jit
def _lse_partial_kernel(x_ptr, pm_ptr, ps_ptr, bad_ptr, v, chunk, splits, inv_t, BV: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    m = tl.full([BV], float("-inf"), tl.float32)
    s = tl.zeros([BV], tl.float32)
    flagged = tl.zeros([BV], tl.int1)
    start = split * chunk
    for v0 in range(0, chunk, BV):
        rv = start + v0 + tl.arange(0, BV)
        x = tl.load(x_ptr + row.to(tl.int64) * v + rv, mask=(rv < v) & (v0 + tl.arange(0, BV) < chunk),
                    other=float("-inf")).to(tl.float32) * inv_t
        flagged = flagged | (x != x) | (x == float("inf"))
        x = tl.where(x == float("inf"), float("-inf"), tl.where(x != x, float("-inf"), x))
        m_new = tl.maximum(m, x)
        live = m_new > float("-inf")
        s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
    tl.atomic_min(bad_ptr, tl.where(tl.max(flagged.to(tl.int32), 0) > 0, row.to(tl.int64), 2**62))
    mm = tl.max(m, 0)
    ss = tl.sum(tl.where(m > float("-inf"), s * tl.exp(m - mm), 0.0), 0)
    tl.store(pm_ptr + row * splits + split, mm)
    tl.store(ps_ptr + row * splits + split, ss)


@triton.jit
def _combine_kernel(x_ptr, la_ptr, pm_ptr, ps_ptr, out_ptr, bad_ptr, k, v, splits, inv_t,
                    BV: tl.constexpr, SP: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    rv = blk * BV + tl.arange(0, BV)
    vmask = rv < v
    rs = tl.arange(0, SP)
    m = tl.full([BV], float("-inf"), tl.float32)
    s = tl.zeros([BV], tl.float32)
    for i in range(0, k):
        row = b * k + i
        pm = tl.load(pm_ptr + row * splits + rs, mask=rs < splits, other=float("-inf"))
        ps = tl.load(ps_ptr + row * splits + rs, mask=rs < splits, other=0.0)
        top = tl.max(pm, 0)
        empty = top == float("-inf")  # no finite logit in the row
        tl.atomic_min(bad_ptr, tl.where(empty, row.to(tl.int64), 2**62))
        # log_alpha - (lse - top): the row max stays out of the offset, and x * inv_t - top is one
        # rounding (fma), so logits far from 0 do not cancel against an offset of their size
        lsum = tl.log(tl.sum(tl.where(pm > float("-inf"), ps * tl.exp(pm - top), 0.0), 0))
        c = tl.where(empty, float("-inf"), tl.load(la_ptr + row) - lsum)
        xv = tl.load(x_ptr + row.to(tl.int64) * v + rv, mask=vmask, other=float("-inf")).to(tl.float32)
        x = tl.fma(xv, inv_t, -top) + c
        x = tl.where(x != x, float("-inf"), x)  # NaN/+Inf rows are already flagged
        m_new = tl.maximum(m, x)
        live = m_new > float("-inf")
        s = tl.where(live, s * tl.exp(m - m_new) + tl.exp(x - m_new), 0.0)
        m = m_new
    out = tl.where(m > float("-inf"), m + tl.log(s), float("-inf"))
    tl.store(out_ptr + b.to(tl.int64) * v + rv, out, mask=vmask)


def rag_token_marg(log_alpha, logits, inv_temperature: float, programs: int):
    """log p [B, V] float32 and bad [1] int64 (first row b*K+i holding NaN/+Inf
    or no finite value, or 2^62). log_alpha [B, K] float32; logits [B, K, V]
    float32/bfloat16/float16; `programs`: about how many pass-1 programs to run."""
    import torch

    b, k, v = logits.shape
    dev = logits.device
    splits = max(1, min(triton.cdiv(programs, b * k), triton.cdiv(v, 4 * BV)))
    chunk = triton.cdiv(triton.cdiv(v, splits), BV) * BV
    splits = triton.cdiv(v, chunk)
    pm = torch.empty((b * k, splits), dtype=torch.float32, device=dev)
    ps = torch.empty((b * k, splits), dtype=torch.float32, device=dev)
    out = torch.empty((b, v), dtype=torch.float32, device=dev)
    bad = torch.full((1,), 2**62, dtype=torch.int64, device=dev)
    _lse_partial_kernel[(b * k, splits)](logits, pm, ps, bad, v, chunk, splits, inv_temperature, BV=BV)
    _combine_kernel[(triton.cdiv(v, BV), b)](logits, log_alpha, pm, ps, out, bad, k, v, splits,
                                             inv_temperature, BV=BV, SP=triton.next_power_of_2(splits))
    return out, bad
