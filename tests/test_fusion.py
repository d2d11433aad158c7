"""BilinearFusion: kernel forward, analytic backward (gradcheck in float64), gather path, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rag_engine import CorpusMatrix, ops, reference
from rag_engine.fusion import BilinearFusion, FusionSoftmaxFunction


def tensors(b=3, k=5, d=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, d, generator=g, dtype=dtype)
    docs = torch.randn(b, k, d, generator=g, dtype=dtype)
    w = torch.eye(d, dtype=dtype) + 0.3 * torch.randn(d, d, generator=g, dtype=dtype)
    mask = torch.rand(b, k, generator=g) > 0.3
    mask[:, 0] = True
    mask[-1] = False  # all-masked row: constant zero output
    return h, docs, w, mask


@pytest.mark.parametrize("with_w", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_gradcheck_float64(with_w, with_mask):
    h, docs, w, mask = tensors()
    args = (h.requires_grad_(), docs.requires_grad_(), w.requires_grad_() if with_w else None,
            mask if with_mask else None)
    assert torch.autograd.gradcheck(lambda *a: FusionSoftmaxFunction.apply(*a), args, eps=1e-6, atol=1e-6)


def torch_autograd(h, docs, w, mask, weights):
    """Loss and gradients through plain torch autograd of the reference, in float64."""
    h, docs, w = (x.detach().double().requires_grad_() for x in (h, docs, w))
    alpha, h_aug, _ = reference.fusion_softmax_torch(h, docs, w, mask)
    loss = (alpha * weights[0].double()).sum() + (h_aug * weights[1].double()).sum()
    loss.backward()
    return alpha, h_aug, h.grad, docs.grad, w.grad


def test_kernel_forward_and_backward_match_torch_autograd():
    h, docs, w, mask = tensors(b=4, k=16, d=96, dtype=torch.float32, seed=1)
    fusion = BilinearFusion(96, backend="cpu")
    with torch.no_grad():
        fusion.W_a.copy_(w)
    weights = (torch.randn(4, 16), torch.randn(4, 96))
    hh, dd = h.clone().requires_grad_(), docs.clone().requires_grad_()
    alpha, h_aug = fusion(hh, dd, mask)
    ((alpha * weights[0]).sum() + (h_aug * weights[1]).sum()).backward()
    ref = torch_autograd(h, docs, w, mask, weights)
    for got, want in zip((alpha, h_aug, hh.grad, dd.grad, fusion.W_a.grad), ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_inference_uses_kernel_and_identity_init():
    h, docs, _, mask = tensors(b=32, k=16, d=768, dtype=torch.float32)
    fusion = BilinearFusion(768)
    assert torch.equal(fusion.W_a, torch.eye(768))
    with torch.no_grad():
        alpha, h_aug = fusion(h, docs, mask)
    want_a, want_h = ops.fusion_softmax(h, docs, torch.eye(768), mask=mask, backend="cpu")
    np.testing.assert_array_equal(alpha.numpy(), want_a)
    np.testing.assert_array_equal(h_aug.numpy(), want_h)
    plain = ops.fusion_softmax(h, docs, mask=mask, backend="cpu")  # W_a = I is the RAG posterior
    np.testing.assert_allclose(alpha.numpy(), plain[0], atol=1e-6)
    with torch.no_grad():  # bf16 documents stay bf16 into the kernel
        a16, _ = fusion(h, docs.to(torch.bfloat16), mask)
    want = reference.fusion_softmax(h.numpy(), docs.to(torch.bfloat16).float().numpy(), None, mask.numpy())[0]
    np.testing.assert_allclose(a16.numpy(), want, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_forward_gather(dtype):
    rng = np.random.default_rng(2)
    corpus = CorpusMatrix.from_float(rng.standard_normal((500, 64)) / 3, dtype)
    ids = torch.from_numpy(rng.integers(-1, 500, (4, 8)))
    h = torch.randn(4, 64)
    fusion = BilinearFusion(64)
    with torch.no_grad():
        fusion.W_a.add_(0.1 * torch.randn(64, 64))
        a_inf, h_inf = fusion.forward_gather(h, corpus, ids)
    a_tr, h_tr = fusion.forward_gather(h, corpus, ids)  # training path: gathered copy + autograd
    torch.testing.assert_close(a_inf, a_tr.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_inf, h_tr.detach(), atol=1e-5, rtol=1e-5)
    assert (a_inf[ids < 0] == 0).all()
    h_tr.sum().backward()
    assert fusion.W_a.grad is not None and torch.isfinite(fusion.W_a.grad).all()


def test_training_learns_to_attend():
    """A few Adam steps on W_a move the weight onto the document a target points at."""
    torch.manual_seed(0)
    b, k, d = 64, 4, 32
    docs = torch.randn(b, k, d)
    target = torch.randint(0, k, (b,))
    h = docs[torch.arange(b), target] @ torch.linalg.qr(torch.randn(d, d))[0]  # rotated: W_a must undo it
    fusion = BilinearFusion(d)
    opt = torch.optim.Adam(fusion.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        alpha, _ = fusion(h, docs)
        loss = -torch.log(alpha[torch.arange(b), target] + 1e-9).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_project_soft_prompts():
    fusion = BilinearFusion(16, soft_prompts=3, hidden_size=8)
    assert fusion.project(torch.randn(2, 16)).shape == (2, 3, 8)
    with pytest.raises(ValueError, match="BilinearFusion.project: built without soft_prompts"):
        BilinearFusion(16).project(torch.randn(2, 16))
    with pytest.raises(ValueError, match="BilinearFusion: dim must be > 0"):
        BilinearFusion(0)


def test_forward_gather_checks_like_the_op_in_training_and_inference():
    """Training (gathered copy with autograd) refuses what inference (the op) refuses."""
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((30, 16)).astype(np.float32)
    module = BilinearFusion(16)
    h = torch.from_numpy(rng.standard_normal((3, 16)).astype(np.float32))
    ids = rng.integers(0, 30, (3, 4))
    for bad, err, match in ((np.full((3, 4), 30), ValueError, r"ids must lie in \[0, N=30\)"),
                            (np.full((3, 4), -2), ValueError, r"ids must lie in \[0, N=30\)"),
                            (ids.astype(np.float64), TypeError, "ids must be an integer")):
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(err, match=match):
                module.forward_gather(h, corpus, bad)
    mask = np.ones((3, 4), bool)
    mask[:, 0] = False
    with torch.no_grad():
        want = module.forward_gather(h, corpus, ids, mask)
    got = module.forward_gather(h, corpus, ids, mask)  # numpy mask on the autograd path
    torch.testing.assert_close(got[0].detach(), want[0], atol=1e-6, rtol=1e-5)
    docs = torch.from_numpy(reference.gather_rows(CorpusMatrix(corpus), ids))
    assert module(h, docs, mask)[0].shape == (3, 4)  # forward() with a numpy mask
    with pytest.raises(TypeError, match="mask must be bool"):
        module(h, docs, mask.astype(np.uint8))


def test_gather_torch_backend_on_an_empty_corpus():
    h = np.ones((2, 8), np.float32)
    empty = np.zeros((0, 8), np.float32)
    ids = np.full((2, 3), -1)
    for backend in ("cpu", "torch"):
        alpha, h_aug = ops.fusion_softmax_gather(h, empty, ids, backend=backend)
        assert not alpha.any() and not h_aug.any()
