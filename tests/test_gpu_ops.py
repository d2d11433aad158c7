"""The three ops on a CUDA GPU: every device backend (cuda, triton, torch), every
storage dtype including bfloat16, shapes crossing the kernels' block edges,
large k (the K = 1024 / 2048 in-chip limit and the two-pass path beyond),
and the typed errors for bad input. Skipped without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gpu_cases import run_fusion, run_gather, run_marg, run_topk
from test_rag_token_marg import make_inputs
from test_topk_ip import check_topk, corpus_matrix, queries

from rag_engine import _ext, gpu_ops, ops
from rag_engine.gpu import DeviceCorpus

pytestmark = pytest.mark.gpu
torch.backends.cuda.matmul.allow_tf32 = False  # the torch references are fp32 matmuls (the default; pinned)


def backends():
    out = ["torch"]
    if _ext.cuda_ext() is not None:
        out.append("cuda")
    if _ext.has_triton():
        out.append("triton")
    return out


TOPK_CASES = [  # (n, d, k, q)
    (1, 8, 1, 1), (7, 96, 10, 3), (1000, 100, 10, 8), (4097, 384, 100, 33), (65537, 768, 10, 1),
    (65537, 769, 10, 16), (4097, 768, 1024, 2), (4097, 96, 2048, 5), (4097, 96, 4096, 2), (1000, 8, 10**6, 3),
]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("n,d,k,q", TOPK_CASES)
def test_topk_ip(backend, dtype, n, d, k, q):
    run_topk(backend, "cuda", n, d, k, q, dtype)


@pytest.mark.parametrize("backend", backends())
def test_topk_ip_filter_and_auto_dispatch(backend):
    c = corpus_matrix(4097, 96, "bf16")
    allow = np.random.default_rng(0).random(c.n) > 0.7
    run_topk(backend, "cuda", 4097, 96, 50, 5, "bf16", allow=allow)
    q = torch.from_numpy(queries(3, 96)).cuda()
    s, i = ops.topk_ip(q, DeviceCorpus.from_corpus(c), 10)  # auto: cuda -> triton -> torch
    assert s.is_cuda and i.is_cuda
    check_topk(s.cpu().numpy(), i.cpu().numpy(), queries(3, 96), c, 10)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("b,k,d", [(1, 1, 8), (3, 5, 384), (32, 16, 768), (3, 100, 769)])
def test_fusion_softmax(backend, b, k, d):
    run_fusion(backend, "cuda", b, k, d, dense_w=d < 700)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_fusion_softmax_gather(backend, dtype):
    run_gather(backend, "cuda", 8, 16, 768, 5000, dtype)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("b,k,v,t", [(1, 1, 7, 1.0), (3, 5, 32000, 0.7), (8, 5, 50257, 1.0), (2, 2, 151936, 2.0)])
def test_rag_token_marg(backend, b, k, v, t):
    run_marg(backend, "cuda", b, k, v, t)


@pytest.mark.parametrize("backend", backends())
def test_rag_token_marg_bf16(backend):
    run_marg(backend, "cuda", 4, 5, 49152, 1.0, torch.bfloat16)


@pytest.mark.parametrize("backend", backends())
def test_bad_input(backend):
    c = DeviceCorpus.from_corpus(corpus_matrix(1000, 96, "bf16"))
    q = torch.from_numpy(queries(2, 96))
    with pytest.raises(ValueError, match="share one device"):
        gpu_ops.topk_ip(backend, q, c, 3)  # CPU queries, GPU corpus
    with pytest.raises(ValueError, match="contiguous"):
        gpu_ops.topk_ip(backend, torch.from_numpy(queries(96, 2)).cuda().T, c, 3)
    with pytest.raises(ValueError, match="host CorpusMatrix"):
        ops.topk_ip(q.cuda(), corpus_matrix(1000, 96, "bf16"), 3)
    bad = c.data.clone()
    bad[123, 5] = float("nan")
    with pytest.raises(ValueError, match="row 123"):
        gpu_ops.topk_ip(backend, q.cuda(), bad, 3)
    la, x = make_inputs(2, 3, 1000)
    x[1, 1, 9] = np.inf
    with pytest.raises(ValueError, match=r"b=1, k=1"):
        gpu_ops.rag_token_marg(backend, torch.from_numpy(la).cuda(), torch.from_numpy(x).cuda(), 1.0)
    torch.cuda.synchronize()  # no sticky CUDA error left behind


def test_cuda_ext_refuses_host_pointers():
    ext = _ext.cuda_ext()
    if ext is None:
        pytest.skip("rag_engine._C_cuda not built")
    q = torch.zeros(2, 8)  # host memory
    c = torch.zeros(10, 8, device="cuda")
    out_s = torch.empty(2, 3, device="cuda")
    out_i = torch.empty(2, 3, dtype=torch.int64, device="cuda")
    bad = torch.full((1,), -1, dtype=torch.int64, device="cuda")
    ws = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="queries must be CUDA device memory"):
        ext.topk_ip(q.data_ptr(), 2, 8, c.data_ptr(), "fp32", 10, 0, 0, 3, out_s.data_ptr(), out_i.data_ptr(),
                    ws.data_ptr(), ws.numel(), bad.data_ptr(), 0)
    assert ext.device_info()["arch"] >= 80
