"""Case runners shared by tests/test_triton_kernels.py (CPU, Triton interpreter)
and tests/test_gpu_ops.py (GPU): each builds inputs, runs one device backend
and checks the result against the float64 references with the CPU tests'
tie-aware / 2x-torch-error rules."""

from __future__ import annotations

import numpy as np
import torch
from test_fusion_softmax import check_fusion, inputs, weight
from test_rag_token_marg import check_marg, make_inputs
from test_topk_ip import check_topk, corpus_matrix, queries

from rag_engine import CorpusMatrix, gpu_ops, ops
from rag_engine.gpu import DeviceCorpus


def _np(x):
    return x.float().cpu().numpy() if x.dtype != torch.int64 else x.cpu().numpy()


def run_topk(backend, device, n, d, k, q, dtype, allow=None):
    c = corpus_matrix(n, d, dtype)
    qs = queries(q, d)
    dc = DeviceCorpus.from_corpus(c, device)
    filt = None if allow is None else torch.from_numpy(allow).to(device)
    s, i = gpu_ops.topk_ip(backend, torch.from_numpy(qs).to(device), dc, k, filt)
    assert s.device.type == i.device.type == torch.device(device).type
    check_topk(_np(s), _np(i), qs, c, k, allow)


def run_fusion(backend, device, b, k, d, dtype=np.float32, dense_w=True, masked=True):
    h, docs, mask = inputs(b, k, d, masked=masked)
    w = weight(d) if dense_w else None
    docs = docs.astype(dtype)
    t = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    out = gpu_ops.fusion_softmax(backend, t(h), t(docs), t(w), t(mask), return_scores=True)
    check_fusion(tuple(_np(x) for x in out), h, docs, w, mask)


def run_gather(backend, device, b, k, d, n, dtype):
    h, _, mask = inputs(b, k, d)
    rng = np.random.default_rng(5)
    c = CorpusMatrix.from_float(rng.standard_normal((n, d), dtype=np.float32), dtype)
    ids = rng.integers(0, n, (b, k))
    ids[0, 0] = -1  # an empty slot
    dc = DeviceCorpus.from_corpus(c, device)
    out = gpu_ops.fusion_softmax_gather(backend, torch.from_numpy(h).to(device), dc,
                                        torch.from_numpy(ids).to(device), None,
                                        torch.from_numpy(mask).to(device), return_scores=True)
    docs64 = c.to_float(np.float64)[np.maximum(ids, 0)]
    check_fusion(tuple(_np(x) for x in out), h, docs64.astype(np.float32), None, mask & (ids >= 0),
                 docs_f64=docs64)


def run_marg(backend, device, b, k, v, temperature, dtype=torch.float32):
    la, x = make_inputs(b, k, v)
    out = ops.rag_token_marg(torch.from_numpy(la).to(device), torch.from_numpy(x).to(device, dtype),
                             temperature=temperature, backend=backend) if device == "cuda" else \
        gpu_ops.rag_token_marg(backend, torch.from_numpy(la), torch.from_numpy(x).to(dtype), temperature)
    ref_logits = torch.from_numpy(x).to(dtype).float().numpy()
    check_marg(_np(out), la, ref_logits, temperature)
