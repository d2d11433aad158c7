"""The one dispatch point for every op.

`ops.<op>(..., backend=None)` picks the implementation: the `backend=`
argument, else the RAG_ENGINE_BACKEND environment variable, else the best
available for the inputs' device (CUDA tensors: cuda -> triton, with topk_ip
on 16 or more queries going to triton when it is there; otherwise: cpu (C++
extension) -> torch). A backend asked for explicitly that is not
available raises BackendUnavailableError: never a silent fallback.
"""

from rag_engine.ops.dispatch import (
    BACKEND_ENV,
    BACKENDS,
    THREADS_ENV,
    available_backends,
    check_k,
    float32_matrix,
    is_cuda,
    resolve_backend,
    resolve_threads,
)
from rag_engine.ops.fusion import as_corpus_matrix, fusion_softmax, fusion_softmax_gather
from rag_engine.ops.marg import rag_token_marg, rag_token_sample
from rag_engine.ops.topk import TRITON_TOPK_MIN_QUERIES, id_filter_bitmap, merge_topk, topk_ip

__all__ = [
    "BACKENDS", "BACKEND_ENV", "THREADS_ENV", "TRITON_TOPK_MIN_QUERIES", "as_corpus_matrix",
    "available_backends", "check_k", "float32_matrix", "fusion_softmax", "fusion_softmax_gather",
    "id_filter_bitmap", "is_cuda", "merge_topk", "rag_token_marg", "rag_token_sample",
    "resolve_backend", "resolve_threads", "topk_ip",
]
