"""Bilinear attention fusion of retrieved documents as a torch module.

    alpha_k = softmax_k(h_inᵀ W_a d_k),   h_aug = Σ_k alpha_k d_k

with a learnable W_a [dim, dim] initialised to the identity, where alpha is the
standard RAG document posterior p(z|x). The forward pass runs the fused CPU
kernel (ops.fusion_softmax) for float32 CPU tensors and the torch reference
otherwise (e.g. float64); gradients come from FusionSoftmaxFunction's analytic
backward, so training never differentiates through the kernel. An optional
projection P [dim, m * hidden] turns h_aug into m soft-prompt embeddings for
the generator (the `latent` mode).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from rag_engine import ops, reference
from rag_engine.ops.fusion import checked_gather_ids

_KERNEL_DOC_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_forward(h_in: torch.Tensor, docs: torch.Tensor, w: torch.Tensor | None,
                   mask: torch.Tensor | None, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha [B, K], h_aug [B, D] without autograd: the kernel where it applies, else torch."""
    on_kernel = (h_in.device.type == "cpu" and h_in.dtype == torch.float32 and docs.dtype in _KERNEL_DOC_DTYPES
                 and (w is None or w.dtype == torch.float32) and backend != "torch")
    if not on_kernel:
        with torch.no_grad():
            alpha, h_aug, _ = reference.fusion_softmax_torch(h_in, docs, w, mask)
        return alpha, h_aug.to(h_in.dtype)
    alpha, h_aug = ops.fusion_softmax(h_in.detach().contiguous(), docs.detach().contiguous(),
                                      None if w is None else w.detach().contiguous(),
                                      mask=None if mask is None else mask.contiguous(), backend=backend)
    return torch.from_numpy(alpha), torch.from_numpy(h_aug)


def _bool_mask(mask: Any, op: str) -> torch.Tensor | None:
    """A bool [B, K] tensor from a tensor or an array (the op's rule: bool only)."""
    if mask is None:
        return None
    t = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if t.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be bool, got {t.dtype}")
    return t


class FusionSoftmaxFunction(torch.autograd.Function):
    """(h_in [B, D], docs [B, K, D], W_a [D, D] or None, mask [B, K] or None) -> (alpha, h_aug).

    Backward, with u = h_in W_a and s_k = <u, d_k>:
      g_s = alpha * (g_alpha + <g_h, d_k> - Σ_j alpha_j (g_alpha_j + <g_h, d_j>))
      g_d_k = alpha_k g_h + g_s_k u,   g_u = Σ_k g_s_k d_k,
      g_h_in = g_u W_aᵀ,   g_W_a = h_inᵀ g_u.
    Masked slots have alpha = 0, hence no gradient.
    """

    @staticmethod
    def forward(ctx: Any, h_in, docs, w, mask, backend=None):  # noqa: D102
        alpha, h_aug = _fused_forward(h_in, docs, w, mask, backend)
        ctx.save_for_backward(h_in, docs, w, alpha)
        return alpha, h_aug

    @staticmethod
    def backward(ctx: Any, g_alpha, g_h):  # noqa: D102
        h_in, docs, w, alpha = ctx.saved_tensors
        d = docs.to(h_in.dtype)
        alpha = alpha.to(h_in.dtype)
        g_a = torch.zeros_like(alpha) if g_alpha is None else g_alpha
        if g_h is not None:
            g_a = g_a + torch.einsum("bd,bkd->bk", g_h, d)
        g_s = alpha * (g_a - (alpha * g_a).sum(-1, keepdim=True))
        u = h_in if w is None else h_in @ w
        g_u = torch.einsum("bk,bkd->bd", g_s, d)
        g_docs = None
        if ctx.needs_input_grad[1]:
            g_docs = g_s[..., None] * u[:, None, :]
            if g_h is not None:
                g_docs = g_docs + alpha[..., None] * g_h[:, None, :]
            g_docs = g_docs.to(docs.dtype)
        g_in = g_u if w is None else g_u @ w.T
        g_w = None if w is None or not ctx.needs_input_grad[2] else h_in.T @ g_u
        return g_in, g_docs, g_w, None, None


class BilinearFusion(nn.Module):
    """Learnable bilinear attention over K retrieved documents (see module docstring).

    dim: vector width D. soft_prompts, hidden_size: if both > 0, a projection
    P [dim, soft_prompts * hidden_size] (no bias) maps h_aug to soft prompts.
    backend: passed to ops.fusion_softmax ("cpu", "torch" or None = best).
    """

    def __init__(self, dim: int, soft_prompts: int = 0, hidden_size: int = 0,
                 backend: str | None = None) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"BilinearFusion: dim must be > 0, got {dim}")
        self.W_a = nn.Parameter(torch.eye(dim))
        self.backend = backend
        self.soft_prompts, self.hidden_size = soft_prompts, hidden_size
        self.P = nn.Linear(dim, soft_prompts * hidden_size, bias=False) if soft_prompts and hidden_size else None
        # Zero-initialised per-prompt gate: an untrained P yields zero soft prompts, which stay zero
        # through a bias-free (Llama) decoder and add nothing to the attention values.
        self.gate = nn.Parameter(torch.zeros(soft_prompts)) if self.P is not None else None

    def forward(self, h_in: torch.Tensor, docs: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h_in [B, D], docs [B, K, D], mask [B, K] bool (False = padded) -> alpha [B, K], h_aug [B, D]."""
        w = self.W_a if self.W_a.dtype == h_in.dtype else self.W_a.to(h_in.dtype)
        return FusionSoftmaxFunction.apply(h_in, docs, w, _bool_mask(mask, "BilinearFusion.forward"), self.backend)

    def forward_gather(self, h_in: torch.Tensor, corpus: Any, ids: Any,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same over corpus rows ids [B, K] (-1 = empty slot), e.g. straight from topk_ip.

        Without gradients the rows are read in place (ops.fusion_softmax_gather);
        when W_a or h_in needs a gradient they are gathered once into [B, K, D].
        """
        if torch.is_grad_enabled() and (self.W_a.requires_grad or h_in.requires_grad):
            # the checks of ops.fusion_softmax_gather, so training refuses what inference refuses
            op = "BilinearFusion.forward_gather"
            c = ops.as_corpus_matrix(corpus, op)
            idx = checked_gather_ids(op, ids, c.n)
            valid = torch.from_numpy(idx >= 0)
            mask = _bool_mask(mask, op)
            docs = torch.from_numpy(reference.gather_rows(c, idx)).to(h_in.dtype)
            return self(h_in, docs, valid if mask is None else valid & mask)
        alpha, h_aug = ops.fusion_softmax_gather(h_in.detach(), corpus, ids, self.W_a.detach(), mask=mask,
                                                 backend=self.backend)
        return torch.from_numpy(alpha), torch.from_numpy(h_aug)

    def project(self, h_aug: torch.Tensor) -> torch.Tensor:
        """h_aug [B, D] -> soft-prompt embeddings gate[j] * (P h_aug)[j], [B, soft_prompts, hidden_size]."""
        if self.P is None:
            raise ValueError("BilinearFusion.project: built without soft_prompts and hidden_size")
        soft = self.P(h_aug).view(h_aug.shape[0], self.soft_prompts, self.hidden_size)
        return soft * self.gate.to(soft.dtype)[:, None]
