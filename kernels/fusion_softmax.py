"""fusion_softmax as a Triton kernel: one program per batch row, online softmax.

The row's K documents are read once each: score = <u, doc> (times the corpus
row scale for int8), then the running max / sum and the h_aug accumulator are
rescaled as in flash-attention. u = W_aᵀ h_in is computed by the caller (one
GEMM for the batch). Masked slots (mask False, gather id < 0) get alpha 0
and score -inf; a row with every slot masked gets alpha 0 and h_aug 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_D = 16384  # the whole row sits in one block of registers


@triton.jit
def _fusion_softmax_kernel(u_ptr, docs_ptr, ids_ptr, scale_ptr, mask_ptr, alpha_ptr, h_ptr, scores_ptr,
                           bad_ptr, k, d, GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
                           HAS_MASK: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0)
    rd = tl.arange(0, BD)
    dmask = rd < d
    u = tl.load(u_ptr + b * d + rd, mask=dmask, other=0.0)
    acc = tl.zeros([BD], tl.float32)
    m = tl.full([], float("-inf"), tl.float32)
    lsum = tl.full([], 0.0, tl.float32)
    for j in range(0, k):
        slot = b * k + j
        valid = slot >= 0  # a scalar True
        if HAS_MASK:
            valid = tl.load(mask_ptr + slot).to(tl.int32) != 0
        row = slot
        if GATHER:
            row = tl.load(ids_ptr + slot)
            valid = valid & (row >= 0)
            row = tl.maximum(row, 0)
        # the row is in bounds (clamped above), so load it and zero it when the slot is empty
        x = tl.load(docs_ptr + row.to(tl.int64) * d + rd, mask=dmask, other=0).to(tl.float32)
        x = tl.where(valid, x, 0.0)
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row)
        s = tl.sum(u * x, 0) * scale
        finite = tl.abs(s) <= 3.4028234663852886e38
        tl.atomic_min(bad_ptr, tl.where(valid & ~finite, slot.to(tl.int64), 2**62))
        use = valid & finite
        s = tl.where(use, s, float("-inf"))
        tl.store(scores_ptr + slot, s)
        m_new = tl.where(use, tl.maximum(m, s), m)
        corr = tl.where(use, tl.exp(m - m_new), 1.0)  # exp(-inf) = 0 at the first used slot
        p = tl.where(use, tl.exp(s - m_new), 0.0)
        lsum = lsum * corr + p
        acc = acc * corr + (p * scale) * x
        m = m_new
    inv = tl.where(lsum > 0, 1.0 / lsum, 0.0)
    tl.store(h_ptr + b * d + rd, acc * inv, mask=dmask)
    for j in range(0, k):
        s = tl.load(scores_ptr + b * k + j)
        tl.store(alpha_ptr + b * k + j, tl.where(s == float("-inf"), 0.0, tl.exp(s - m) * inv))


def fusion_softmax(u, docs, ids, scales, mask):
    """alpha [B, K], h_aug [B, D], scores [B, K] (float32) and bad [1] int64.

    u [B, D] float32; docs [B, K, D] (ids None) or a corpus [N, D] with ids
    [B, K] int64 (< 0 = empty slot); float32/bfloat16/float16 (int8 with
    scales [N] in the gather form); mask [B, K] bool or None. bad holds the
    first slot b*K + j with a non-finite score, or 2^62.
    """
    import torch

    b, d = u.shape
    k = ids.shape[1] if ids is not None else docs.shape[1]
    dev = u.device
    alpha = torch.empty((b, k), dtype=torch.float32, device=dev)
    h_aug = torch.empty((b, d), dtype=torch.float32, device=dev)
    scores = torch.empty((b, k), dtype=torch.float32, device=dev)
    bad = torch.full((1,), 2**62, dtype=torch.int64, device=dev)
    _fusion_softmax_kernel[(b,)](
        u, docs, ids if ids is not None else u, scales if scales is not None else u,
        mask.view(torch.uint8) if mask is not None else u, alpha, h_aug, scores, bad, k, d,
        GATHER=ids is not None, HAS_SCALE=scales is not None, HAS_MASK=mask is not None,
        BD=triton.next_power_of_2(d))
    return alpha, h_aug, scores, bad
