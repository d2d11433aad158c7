"""fusion_softmax / fusion_softmax_gather against the float64 reference on every
ISA path: the kernel's error must stay within 2x torch-float32's error (plus a
floor of a few fp32 ulps of the quantity's scale), flash-attention's rule."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag_engine import CorpusMatrix, _ext, ops, reference
from rag_engine.errors import BackendUnavailableError

ISAS = _ext.supported_isas()
BS = [1, 3, 32]
KS = [1, 2, 5, 16, 100]
DS = [8, 384, 768, 769]
EPS32 = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=4)
def weight(d: int) -> np.ndarray:
    rng = np.random.default_rng(d)
    return (np.eye(d) + rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)


def inputs(b: int, k: int, d: int, seed: int = 0, masked: bool = True):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((b, d), dtype=np.float32) / np.float32(d**0.25)
    docs = rng.standard_normal((b, k, d), dtype=np.float32) / np.float32(d**0.25)
    mask = None
    if masked:
        mask = rng.random((b, k)) > 0.3
        mask[0] = False  # all-masked row: documented zero result
        mask[-1, :] = False
        mask[-1, k // 2] = True  # all-but-one masked
        if b > 2:
            mask[1] = True
    return h, docs, mask


def check_close(got, torch_val, ref, floor, what):
    got, torch_val = np.asarray(got, np.float64), np.asarray(torch_val, np.float64)
    finite = np.isfinite(ref)
    assert (np.isfinite(got) == finite).all() and (got[~finite] == ref[~finite]).all(), what
    err = np.abs(got[finite] - ref[finite]).max(initial=0.0)
    err_torch = np.abs(torch_val[finite] - ref[finite]).max(initial=0.0)
    assert err <= 2 * err_torch + floor, f"{what}: error {err:.3g} > 2 x torch {err_torch:.3g} + {floor:.3g}"


def check_fusion(out, h, docs, w, mask, docs_f64=None):
    """Compare (alpha, h_aug, scores) with float64 and torch-float32 references."""
    d64 = reference.doc_values(docs) if docs_f64 is None else docs_f64
    ref_a, ref_h, ref_s = reference.fusion_softmax(h, d64, w, mask)
    t_a, t_h, t_s = (x.numpy() for x in reference.fusion_softmax_torch(
        h, d64.astype(np.float32), w, None if mask is None else mask))
    alpha, h_aug, scores = out
    assert alpha.dtype == h_aug.dtype == scores.dtype == np.float32
    assert alpha.shape == scores.shape == ref_a.shape and h_aug.shape == ref_h.shape
    smax = float(np.abs(ref_s[np.isfinite(ref_s)]).max(initial=1.0))
    dmax = float(np.abs(d64).max(initial=1.0))
    check_close(scores, t_s, ref_s, 8 * EPS32 * smax, "scores")
    check_close(alpha, t_a, ref_a, 8 * EPS32 * (1 + smax), "alpha")
    check_close(h_aug, t_h, ref_h, 8 * EPS32 * dmax * (1 + smax), "h_aug")
    if mask is not None:
        assert (alpha[~mask] == 0).all() and np.isneginf(scores[~mask]).all()
        empty = ~mask.any(axis=1)
        assert (alpha[empty] == 0).all() and (h_aug[empty] == 0).all()
    np.testing.assert_allclose(alpha.sum(1)[alpha.sum(1) > 0], 1.0, atol=1e-5)


def case_params():
    """Every K x D pair, cycling B and the thread count so each meets every K and D."""
    return [(BS[i % 3], k, d, 1 + (i // 3) % 2) for i, (k, d) in enumerate((k, d) for k in KS for d in DS)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("b,k,d,threads", case_params())
def test_matches_reference(b, k, d, threads, isa):
    h, docs, mask = inputs(b, k, d, seed=b + k + d)
    for w in (None, weight(d)):
        out = ops.fusion_softmax(h, docs, w, mask=mask, return_scores=True, threads=threads,
                                 backend="cpu", isa=isa)
        check_fusion(out, h, docs, w, mask)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["bf16", "torch-bf16", "uint16-bits", "fp16", "torch-fp16"])
def test_storage_dtypes(kind, isa):
    h, docs, mask = inputs(3, 5, 769, seed=7)
    stored = docs.astype(ml_dtypes.bfloat16 if "bf16" in kind or "bits" in kind else np.float16)
    exact = stored.astype(np.float64)
    x = {"bf16": stored, "uint16-bits": stored.view(np.uint16), "fp16": stored}.get(kind)
    if x is None:
        x = torch.from_numpy(docs).to(torch.bfloat16 if "bf16" in kind else torch.float16)
    out = ops.fusion_softmax(torch.from_numpy(h), x, weight(769), mask=mask, return_scores=True,
                             backend="cpu", isa=isa)
    check_fusion(out, h, stored, weight(769), mask, docs_f64=exact)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_gather_matches_dense(dtype, isa):
    rng = np.random.default_rng(1)
    corpus = CorpusMatrix.from_float(rng.standard_normal((4097, 384)) / 4, dtype)
    h, _, mask = inputs(32, 16, 384, seed=2)
    ids = rng.integers(0, corpus.n, (32, 16))
    ids[3, ::3] = -1  # empty slots (topk_ip pads with -1) count as masked
    for w in (None, weight(384)):
        out = ops.fusion_softmax_gather(h, corpus, ids, w, mask=mask, return_scores=True, threads=2,
                                        backend="cpu", isa=isa)
        rows = corpus.to_float(np.float64)[np.maximum(ids, 0)]
        check_fusion(out, h, rows, w, mask & (ids >= 0), docs_f64=rows)


def test_gather_plain_arrays():
    rng = np.random.default_rng(3)
    c = rng.standard_normal((100, 96), dtype=np.float32)
    h, ids = rng.standard_normal((2, 96), dtype=np.float32), rng.integers(0, 100, (2, 4))
    a, hg = ops.fusion_softmax_gather(h, c, ids, backend="cpu")
    a2, hg2 = ops.fusion_softmax(h, c[ids], backend="cpu")
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(hg, hg2)
    for x in (torch.from_numpy(c).to(torch.bfloat16), c.astype(ml_dtypes.bfloat16)):
        a, _ = ops.fusion_softmax_gather(h, x, torch.from_numpy(ids).int(), backend="cpu")
        np.testing.assert_allclose(a, reference.fusion_softmax(h, c.astype(ml_dtypes.bfloat16)[ids])[0], atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_extreme_scores(magnitude, isa):
    """Scores up to +-1e4: no overflow, the top document takes all the weight."""
    d, k = 64, 5
    h = np.zeros((2, d), np.float32)
    h[:, 0] = np.sqrt(magnitude)
    docs = np.zeros((2, k, d), np.float32)
    docs[0, :, 0] = np.sqrt(magnitude) * np.array([-1, 1, 0.5, -0.25, 0.999])
    docs[1, :, 0] = -np.sqrt(magnitude)  # all equal: uniform weights
    docs[:, :, 1:] = np.random.default_rng(0).standard_normal((2, k, d - 1))
    alpha, h_aug, s = ops.fusion_softmax(h, docs, return_scores=True, backend="cpu", isa=isa)
    ref_a, ref_h, ref_s = reference.fusion_softmax(h, docs)
    assert np.isfinite(alpha).all() and np.isfinite(h_aug).all()
    np.testing.assert_allclose(s, ref_s, rtol=1e-6)
    np.testing.assert_allclose(alpha, ref_a, atol=1e-5)
    np.testing.assert_allclose(h_aug, ref_h, atol=1e-4 * np.abs(docs).max())


@pytest.mark.parametrize("isa", ISAS)
def test_single_document_and_threads(isa):
    h, docs, _ = inputs(32, 1, 768, masked=False)
    alpha, h_aug = ops.fusion_softmax(h, docs, weight(768), backend="cpu", isa=isa)
    assert (alpha == 1).all()
    np.testing.assert_array_equal(h_aug, docs[:, 0])
    # rows and GEMM panels are split across threads, never a reduction: identical bits
    h, docs, mask = inputs(32, 16, 769, seed=5)
    one = ops.fusion_softmax(h, docs, weight(769), mask=mask, threads=1, backend="cpu", isa=isa)
    two = ops.fusion_softmax(h, docs, weight(769), mask=mask, threads=2, backend="cpu", isa=isa)
    for x, y in zip(one, two, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_torch_backend_and_empty_batch(backend):
    h, docs, mask = inputs(3, 5, 100, seed=9)
    check_fusion(ops.fusion_softmax(h, docs, weight(100), mask=mask, return_scores=True, backend=backend),
                 h, docs, weight(100), mask)
    a, hg = ops.fusion_softmax(h[:0], docs[:0], backend=backend)
    assert a.shape == (0, 5) and hg.shape == (0, 100)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nonfinite_inputs_raise(backend):
    h, docs, _ = inputs(3, 5, 96, masked=False)
    bad = docs.copy()
    bad[1, 2, 7] = np.nan
    with pytest.raises(ValueError, match=r"fusion_softmax: document \(b=1, k=2\) gives a non-finite score"):
        ops.fusion_softmax(h, bad, backend=backend)
    hb = h.copy()
    hb[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"\(b=2, k=0\)"):
        ops.fusion_softmax(hb, docs, weight(96), backend=backend)
    mask = np.ones((3, 5), bool)
    mask[1, 2] = False  # a NaN in a padded slot is never read
    assert np.isfinite(ops.fusion_softmax(h, bad, mask=mask, backend=backend)[1]).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", "default, threads=1"])
def test_bad_input(backend):
    """Also through the default call with plain float32 arrays and a thread count,
    which goes straight to the extension: its checks give the same errors."""
    h, docs, mask = inputs(3, 5, 96)
    how = {"threads": 1} if backend.startswith("default") else {"backend": backend}
    call = functools.partial(ops.fusion_softmax, **how)
    with pytest.raises(TypeError, match="fusion_softmax: h_in must be float32, got float64"):
        call(h.astype(np.float64), docs)
    with pytest.raises(TypeError, match="fusion_softmax: docs must be float32 or float16 or bfloat16"):
        call(h, docs.astype(np.int32))
    with pytest.raises(ValueError, match=r"fusion_softmax: docs must be \[B, K, D\] with B=3 and D=96"):
        call(h, docs[:, :, :95].copy())
    with pytest.raises(ValueError, match="fusion_softmax: docs must be 3-D"):
        call(h, docs[0])
    with pytest.raises(ValueError, match="fusion_softmax: K must be > 0"):
        call(h, docs[:, :0])
    with pytest.raises(ValueError, match=r"fusion_softmax: W_a must be \[D, D\] = \[96, 96\], got \[96, 95\]"):
        call(h, docs, np.zeros((96, 95), np.float32))
    with pytest.raises(ValueError, match=r"fusion_softmax: mask must be \[B, K\] = \[3, 5\]"):
        call(h, docs, mask=mask[:, :4].copy())
    with pytest.raises(TypeError, match="fusion_softmax: mask must be bool"):
        call(h, docs, mask=mask.astype(np.uint8))
    with pytest.raises(ValueError, match="fusion_softmax: docs must be C-contiguous"):
        call(h, np.asfortranarray(docs))
    with pytest.raises(ValueError, match="fusion_softmax: h_in must be C-contiguous"):
        call(np.asfortranarray(h), docs)
    with pytest.raises(TypeError, match="fusion_softmax: W_a must be float32, got float64"):
        call(h, docs, np.eye(96))
    c = CorpusMatrix.from_float(docs[0], "fp16")
    gather = functools.partial(ops.fusion_softmax_gather, **how)
    with pytest.raises(ValueError, match=r"fusion_softmax_gather: ids must lie in \[0, N=5\) or be -1"):
        gather(h, c, np.array([[0, 5]] * 3))
    with pytest.raises(TypeError, match="fusion_softmax_gather: ids must be an integer"):
        gather(h, c, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"fusion_softmax_gather: need ids \[B=3, K\]"):
        gather(h, c, np.zeros((2, 2), np.int64))


def test_backend_selection():
    h, docs, _ = inputs(2, 3, 8, masked=False)
    with pytest.raises(BackendUnavailableError, match="fusion_softmax: backend='cuda'"):
        ops.fusion_softmax(h, docs, backend="cuda")
    with pytest.raises(ValueError, match="fusion_softmax: unknown ISA path 'sse9'"):
        ops.fusion_softmax(h, docs, backend="cpu", isa="sse9")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 5), k=st.integers(1, 20), d=st.integers(1, 70), seed=st.integers(0, 2**16),
       dense=st.booleans(), isa=st.sampled_from(ISAS))
def test_random_shapes(b, k, d, seed, dense, isa):
    h, docs, mask = inputs(b, k, d, seed=seed)
    w = (np.random.default_rng(seed).standard_normal((d, d)) / np.sqrt(d)).astype(np.float32) if dense else None
    out = ops.fusion_softmax(h, docs, w, mask=mask, return_scores=True, threads=2, backend="cpu", isa=isa)
    check_fusion(out, h, docs, w, mask)


def at_offset(a: np.ndarray, offset: int) -> np.ndarray:
    """A copy of `a` whose data starts `offset` bytes past a 64-byte boundary."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("isa", ISAS)
def test_bits_do_not_depend_on_alignment(isa):
    """Rows sharing their offset within a cache line are accumulated with aligned
    whole-line reads; the result must be the same bits at every offset, and the same
    as rows whose offsets differ (the plain path)."""
    h, docs, mask = inputs(4, 9, 768, masked=False)
    want = ops.fusion_softmax(h, docs, weight(768), return_scores=True, backend="cpu", isa=isa, threads=2)
    for offset in (0, 4, 16, 36, 60):
        got = ops.fusion_softmax(at_offset(h, offset), at_offset(docs, offset), weight(768), return_scores=True,
                                 backend="cpu", isa=isa, threads=2)
        for x, y in zip(want, got, strict=True):
            np.testing.assert_array_equal(x, y)
    # D = 776: consecutive corpus rows alternate between two offsets. Even ids only:
    # one shared offset (aligned path); the same rows as dense docs: mixed (plain path).
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((40, 776), dtype=np.float32) / 5
    ids = 2 * rng.integers(0, 20, (3, 7))
    h2 = rng.standard_normal((3, 776), dtype=np.float32) / 5
    for offset in (0, 16):
        c = at_offset(corpus, offset)
        gathered = ops.fusion_softmax_gather(h2, c, ids, return_scores=True, backend="cpu", isa=isa)
        dense = ops.fusion_softmax(h2, np.ascontiguousarray(c[ids]), return_scores=True, backend="cpu", isa=isa)
        for x, y in zip(gathered, dense, strict=True):
            np.testing.assert_array_equal(x, y)
    check_fusion(dense, h2, corpus[ids], None, None)
