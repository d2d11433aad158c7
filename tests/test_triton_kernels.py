"""Triton kernels and the device-side op code (rag_engine.gpu, gpu_ops) on CPU.

The Triton kernels run under the Triton interpreter on CPU tensors (float32
and float16: the interpreter has no bfloat16), against the same float64
references and tolerance rules as the CPU kernels; the `torch` device path
(two-pass topk_ip for large k) runs on CPU tensors too. Shapes are small but
cross every block edge of the launchers: BQ=16 queries, BN=64 rows and
BD=64 dims in topk_ip, several tiles per program, BV=1024 and several V
splits in rag_token_marg. On a machine with a GPU this module is skipped:
tests/test_gpu_ops.py runs the same cases (tests/gpu_cases.py) compiled.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install '.[triton]')", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("a GPU is present: tests/test_gpu_ops.py runs the compiled kernels", allow_module_level=True)
if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported without TRITON_INTERPRET=1", allow_module_level=True)


def _import_interpreted():
    """Import triton and the kernels under TRITON_INTERPRET=1, then restore the variable.

    Triton decides at import / decoration time whether a @triton.jit function is
    interpreted, so this must run before anything imports triton; restoring
    keeps the rest of the session's backend selection (has_triton) unchanged.
    """
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import rag_engine.kernels  # noqa: F401
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev


_import_interpreted()

from gpu_cases import run_fusion, run_gather, run_marg, run_topk  # noqa: E402
from test_fusion_softmax import check_fusion, inputs  # noqa: E402
from test_rag_token_marg import make_inputs  # noqa: E402
from test_topk_ip import check_topk, corpus_matrix, queries  # noqa: E402

from rag_engine import CorpusMatrix, gpu, gpu_ops, ops  # noqa: E402
from rag_engine.errors import BackendUnavailableError  # noqa: E402
from rag_engine.gpu import DeviceCorpus  # noqa: E402


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton also reads TRITON_INTERPRET at launch time: set it for each test here only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _np(x):
    return x.float().cpu().numpy() if x.dtype != torch.int64 else x.cpu().numpy()


TOPK_CASES = [  # (n, d, k, q, dtype): crossing BN=64 / BD=64 / BQ=16 edges, k > N, several tiles per program
    (1, 8, 1, 1, "fp32"), (7, 100, 10, 3, "fp16"), (300, 8, 10, 17, "fp32"), (300, 65, 200, 1, "int8"),
    (129, 64, 64, 16, "fp32"),
]


@pytest.mark.parametrize("n,d,k,q,dtype", TOPK_CASES)
def test_topk_triton(n, d, k, q, dtype):
    run_topk("triton", "cpu", n, d, k, q, dtype)


def test_topk_triton_ties_and_filter():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 16), dtype=np.float32)
    data = np.concatenate([base, base, base])  # every score three times: ties by lower id
    c = CorpusMatrix.from_float(data)
    qs = queries(3, 16)
    allow = rng.random(120) > 0.5
    for filt in (None, allow):
        s, i = gpu_ops.topk_ip("triton", torch.from_numpy(qs), DeviceCorpus.from_corpus(c, "cpu"), 20,
                               None if filt is None else torch.from_numpy(filt))
        check_topk(_np(s), _np(i), qs, c, 20, filt)
    # a filter leaving fewer than k rows: -inf / -1 fill
    few = np.zeros(120, bool)
    few[[5, 77]] = True
    s, i = gpu_ops.topk_ip("triton", torch.from_numpy(qs), DeviceCorpus.from_corpus(c, "cpu"), 4,
                           torch.from_numpy(few))
    check_topk(_np(s), _np(i), qs, c, 4, few)


@pytest.mark.parametrize("k", [3, 2000])
def test_topk_torch_two_pass(k):
    """The device torch path (also the fallback for k beyond the kernels) with chunks."""
    c = corpus_matrix(4097, 8, "fp16")
    qs = queries(2, 8)
    s, i = gpu_ops._topk_torch("topk_ip", torch.from_numpy(qs), DeviceCorpus.from_corpus(c, "cpu"),
                               min(k, c.n), None, chunk=1000)
    check_topk(_np(s), _np(i), qs, c, k)


def test_keys_round_trip():
    s = torch.tensor([[0.0, -0.0, 1.5, -1.5, 3.4e38, -3.4e38, 1e-45, -1e-45]])
    ids = torch.arange(8)[None]
    got_s, got_i = gpu.select_keys(gpu.pack_keys(s, ids), 8)
    want = sorted(zip((-abs(v) if v == 0 else -v for v in s[0].tolist()), ids[0].tolist()))
    assert got_i[0].tolist() == [i for _, i in want]
    assert got_s[0].tolist() == [-v if v else 0.0 for v, _ in want]


@pytest.mark.parametrize("b,k,d,dense_w,masked", [
    (1, 1, 8, False, False), (3, 5, 100, True, True), (4, 16, 64, False, True), (2, 2, 769, True, False)])
def test_fusion_triton(b, k, d, dense_w, masked):
    run_fusion("triton", "cpu", b, k, d, dense_w=dense_w, masked=masked)


def test_fusion_triton_fp16_and_torch_path():
    run_fusion("triton", "cpu", 3, 5, 40, np.float16)
    run_fusion("torch", "cpu", 3, 5, 40, np.float32)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gather(dtype, backend):
    run_gather(backend, "cpu", 3, 4, 24, 50, dtype)


@pytest.mark.parametrize("magnitude", [1e2, 1e4])
def test_fusion_extreme_scores(magnitude):
    h = np.full((2, 8), np.sqrt(magnitude / 8), np.float32)
    docs = np.stack([np.ones((3, 8), np.float32), -np.ones((3, 8), np.float32)])
    docs[:, 1] *= 0.5
    out = gpu_ops.fusion_softmax("triton", torch.from_numpy(h), torch.from_numpy(docs), return_scores=True)
    check_fusion(tuple(_np(x) for x in out), h, docs, None, None)


@pytest.mark.parametrize("b,k,v,temperature", [(1, 1, 7, 1.0), (2, 3, 1000, 0.7), (2, 2, 5000, 2.0)])
def test_marg_triton(b, k, v, temperature):
    run_marg("triton", "cpu", b, k, v, temperature)


def test_marg_triton_large_logits_keep_precision():
    from rag_engine import reference

    base = np.array([[[0.3, -1.2, 0.7], [1.1, 0.2, -0.4]]], np.float32)
    la = np.log(np.array([[0.6, 0.4]], np.float32))
    for shift in (0.0, 1000.0, 10000.0):  # 5.6e-4 at 1e4 before
        x = base + np.float32(shift)
        out = gpu_ops.rag_token_marg("triton", torch.from_numpy(la), torch.from_numpy(x), 1.0)
        ref = reference.rag_token_marg(la.astype(np.float64), x.astype(np.float64))
        assert np.abs(np.asarray(out) - ref).max() < 1e-6, shift


def test_marg_triton_fp16_and_torch_path():
    run_marg("triton", "cpu", 2, 3, 3000, 1.0, torch.float16)
    run_marg("torch", "cpu", 2, 3, 3000, 0.7)


# ---------------------------------------------------------------------------
# typed errors (no GPU needed)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nonfinite_inputs_raise(backend):
    c = corpus_matrix(100, 8, "fp32")
    data = c.data.copy()
    data[42, 3] = np.nan
    with pytest.raises(ValueError, match="row 42"):
        gpu_ops.topk_ip(backend, torch.from_numpy(queries(2, 8)), torch.from_numpy(data), 5)
    la, x = make_inputs(2, 3, 50)
    x[1, 2, 7] = np.nan
    with pytest.raises(ValueError, match=r"b=1, k=2"):
        gpu_ops.rag_token_marg(backend, torch.from_numpy(la), torch.from_numpy(x), 1.0)
    x[1, 2] = -np.inf
    with pytest.raises(ValueError, match=r"no finite value"):
        gpu_ops.rag_token_marg(backend, torch.from_numpy(la), torch.from_numpy(x), 1.0)
    h, docs, _ = inputs(2, 3, 8)
    docs[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"b=1, k=2"):
        gpu_ops.fusion_softmax(backend, torch.from_numpy(h), torch.from_numpy(docs))


def test_bad_input_typed_errors():
    q, c = torch.from_numpy(queries(2, 8)), torch.from_numpy(corpus_matrix(50, 8, "fp32").data)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gpu_ops.topk_ip("cuda", q, c, 3)
    with pytest.raises(ValueError, match="contiguous"):
        gpu_ops.topk_ip("torch", torch.from_numpy(queries(8, 4)).T, c, 3)
    with pytest.raises(TypeError, match="float32"):
        gpu_ops.topk_ip("torch", q.double(), c, 3)
    with pytest.raises(ValueError, match="D=8 but the corpus has D=9"):
        gpu_ops.topk_ip("torch", q, torch.zeros(5, 9), 3)
    with pytest.raises(ValueError, match="host CorpusMatrix"):
        DeviceCorpus.wrap(corpus_matrix(50, 8, "fp32"), "topk_ip")
    with pytest.raises(ValueError, match="scales"):
        DeviceCorpus(torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="ids must lie"):
        gpu_ops.fusion_softmax_gather("torch", torch.zeros(1, 8), c, torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"log_alpha must be \[B, K\]"):
        gpu_ops.rag_token_marg("torch", torch.zeros(2, 2), torch.zeros(2, 3, 5), 1.0)
    with pytest.raises(ValueError, match="cannot take CPU inputs"):
        ops.topk_ip(queries(2, 8), corpus_matrix(50, 8, "fp32"), 3, backend="triton")


def test_cuda_backend_unavailable_without_gpu():
    with pytest.raises(BackendUnavailableError):
        ops.rag_token_marg(*make_inputs(1, 2, 5), backend="cuda")
