"""Blockwise weight-only quantisation in the ONNX Runtime ``MatMulNBits`` layout.

A ``[K, N]`` MatMul weight becomes ``packed`` uint8 ``[N, K/block, block*bits/8]`` and fp32
``scales`` ``[N, K/block]``; symmetric round-to-nearest with the implicit zero point
``2**(bits-1)`` that MatMulNBits and GatherBlockQuantized assume when none is given. As in
MLAS, a block's scale is signed so that its largest-magnitude weight lands exactly on the
grid's extreme ``-2**(bits-1)``: all ``2**bits`` levels are used (``absmax / (2**(bits-1) - 1)``
would leave one unused and make every step 8/7 wider at 4 bits).
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (4, 8)


def quantize_blockwise(w: np.ndarray, bits: int, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Quantise ``w`` ``[K, N]`` fp32 along K in blocks; returns (packed ``[N, nb, block*bits/8]``, scales ``[N, nb]``)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D [K, N] weight, got shape {w.shape}")
    k, n = w.shape
    nb = -(-k // block)
    wt = np.zeros((n, nb * block), np.float32)
    wt[:, :k] = w.T
    wt = wt.reshape(n, nb, block)
    qmax = 2 ** (bits - 1) - 1
    extreme = np.take_along_axis(wt, np.abs(wt).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    scales = np.where(extreme != 0, extreme / -(qmax + 1), 1.0).astype(np.float32)
    q = np.clip(np.rint(wt / scales[:, :, None]), -qmax - 1, qmax).astype(np.int16) + (qmax + 1)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scales


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`quantize_blockwise`: back to fp32 ``[K, N]``."""
    if bits == 4:
        q = np.empty(packed.shape[:2] + (packed.shape[2] * 2,), np.int16)
        q[:, :, 0::2] = packed & 0x0F
        q[:, :, 1::2] = packed >> 4
    else:
        q = packed.astype(np.int16)
    w = (q - 2 ** (bits - 1)).astype(np.float32) * scales[:, :, None]
    return np.ascontiguousarray(w.reshape(w.shape[0], -1)[:, :k].T)


def pack_int8_vnni(w: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``w`` ``[K, N]`` fp32 -> (q uint8, scales fp32) for ``ai.rag_engine::MatMulInt8Block``.

    The bytes and scales of :func:`quantize_blockwise` with 8 bits (so the same weights as
    MatMulNBits), laid out for VNNI (csrc/ortops/qgemm_int8.h): columns in groups of 16
    (N padded with zero columns), each block's ``block`` rows as ``block/4`` runs of 4
    consecutive k for 16 columns. q ``[groups, blocks, block/4, 16, 4]`` (the value + 128),
    scales ``[groups, blocks, 16]``.
    """
    if block < 4 or block % 4:
        raise ValueError(f"block must be a positive multiple of 4, got {block}")
    packed, scales = quantize_blockwise(w, 8, block)  # [N, nb, block] uint8 (+128), [N, nb]
    n, nb, _ = packed.shape
    groups = -(-n // 16)
    q = np.full((groups * 16, nb, block), 128, np.uint8)
    q[:n] = packed
    s = np.ones((groups * 16, nb), np.float32)
    s[:n] = scales
    q = q.reshape(groups, 16, nb, block // 4, 4).transpose(0, 2, 3, 1, 4)
    s = s.reshape(groups, 16, nb).transpose(0, 2, 1)
    return np.ascontiguousarray(q), np.ascontiguousarray(s)


def pack_f32_panels(w: np.ndarray, panel: int = 32) -> np.ndarray:
    """``w`` ``[K, N]`` fp32 -> ``[ceil(N / panel), K, panel]`` for ``ai.rag_engine::MatMulF32Panels``
    (csrc/ortops/gemm_f32.h): each panel of columns is one contiguous stream; columns past N are zero."""
    k, n = w.shape
    panels = -(-n // panel)
    out = np.zeros((k, panels * panel), np.float32)
    out[:, :n] = w
    return np.ascontiguousarray(out.reshape(k, panels, panel).transpose(1, 0, 2))


def pack_int4_vnni(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``w`` ``[K, N]`` fp32 -> (q uint8, scales fp32) for ``ai.rag_engine::MatMulInt4Block``.

    The values and scales of :func:`quantize_blockwise` with 4 bits (MatMulNBits' weights),
    laid out for VNNI (csrc/ortops/qgemm_int8.h): columns in groups of 16, each block as
    ``block/8`` runs of 64 bytes in which column c's dword j-th byte holds k = 8r + j (low
    nibble) and k = 8r + 4 + j (high nibble). q ``[groups, blocks, block/8, 16, 4]``, scales
    ``[groups, blocks, 16]``.
    """
    if block < 8 or block % 8:
        raise ValueError(f"block must be a positive multiple of 8, got {block}")
    packed, scales = quantize_blockwise(w, 4, block)  # [N, nb, block/2]: k even low nibble
    n, nb, _ = packed.shape
    groups = -(-n // 16)
    values = np.full((groups * 16, nb, block), 8, np.uint8)  # padding: weight 0
    values[:n, :, 0::2] = packed & 0x0F
    values[:n, :, 1::2] = packed >> 4
    runs = values.reshape(groups * 16, nb, block // 8, 2, 4)  # [..., r, low/high half, j]
    q = (runs[..., 0, :] | (runs[..., 1, :] << 4)).astype(np.uint8)  # [N16, nb, runs, 4]
    q = q.reshape(groups, 16, nb, block // 8, 4).transpose(0, 2, 3, 1, 4)
    s = np.ones((groups * 16, nb), np.float32)
    s[:n] = scales
    s = s.reshape(groups, 16, nb).transpose(0, 2, 1)
    return np.ascontiguousarray(q), np.ascontiguousarray(s)
