"""faiss as an optional dense backend (approximate search at larger scale).

Same contract as the topk_ip path of PassageIndex.search_dense: inner-product
scores, (scores [Q, k], ids [Q, k]) best first, -inf / -1 padding, an optional
bool allow-mask applied inside the search (faiss IDSelectorBitmap). The faiss
index is built lazily from the float32 vectors and rebuilt after a change.
"""

from __future__ import annotations

import numpy as np

KINDS = ("flat", "hnsw", "ivf")


class FaissIndex:
    """kind: "flat" (IndexFlatIP, exact), "hnsw" (IndexHNSWFlat, M=32), "ivf" (IndexIVFFlat, √N lists)."""

    def __init__(self, vectors: np.ndarray, kind: str = "flat", nprobe: int = 16, ef_search: int = 128) -> None:
        try:
            import faiss
        except ImportError as exc:  # optional dependency
            raise ImportError("the faiss backend needs faiss-cpu (pip install faiss-cpu)") from exc
        if kind not in KINDS:
            raise ValueError(f"faiss backend kind must be one of {KINDS}, got {kind!r}")
        x = np.ascontiguousarray(vectors, np.float32)
        n, d = x.shape
        self.faiss, self.kind, self.n = faiss, kind, n
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            nlist = max(1, min(int(np.sqrt(n)), n // 39 or 1))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
            index.nprobe = min(nprobe, nlist)
        index.add(x)
        self.index = index

    def search(self, queries: np.ndarray, k: int, allow: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        faiss = self.faiss
        params = None
        if allow is not None:
            bitmap = np.packbits(allow, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allow), faiss.swig_ptr(bitmap))
            cls = {"flat": faiss.SearchParameters, "hnsw": faiss.SearchParametersHNSW,
                   "ivf": faiss.SearchParametersIVF}[self.kind]
            params = cls(sel=selector)
            if self.kind == "hnsw":
                params.efSearch = self.index.hnsw.efSearch
            elif self.kind == "ivf":
                params.nprobe = self.index.nprobe
        s, i = self.index.search(np.ascontiguousarray(queries, np.float32), k, params=params)
        i = i.astype(np.int64)
        s = np.where(i >= 0, s, -np.inf).astype(np.float32)
        return s, i
