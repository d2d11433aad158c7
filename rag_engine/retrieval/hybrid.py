"""Hybrid retrieval: dense scores fused with BM25 scores.

Plain reciprocal-rank fusion with equal weights hurts on paraphrased
questions (BM25 ranks are noisy there), so the default is a weighted
combination of per-query min-max normalised scores over the union of both
candidate lists, with the dense side weighted higher; `rrf` is kept for
comparison. The weights were chosen on benchmarks/eval_qa.py.
"""

from __future__ import annotations

import numpy as np

FUSIONS = ("weighted", "rrf")


def _normalise(s: np.ndarray) -> np.ndarray:
    ok = np.isfinite(s)
    if not ok.any():
        return np.zeros_like(s)
    lo, hi = s[ok].min(), s[ok].max()
    out = np.zeros_like(s)
    out[ok] = (s[ok] - lo) / (hi - lo) if hi > lo else 1.0
    return out


def fuse(dense: tuple[np.ndarray, np.ndarray], sparse: tuple[np.ndarray, np.ndarray], k: int,
         method: str = "weighted", dense_weight: float = 0.7, rrf_k: int = 60
         ) -> tuple[np.ndarray, np.ndarray]:
    """Fuse two (scores [Q, m], ids [Q, m]) candidate lists into the top k per query.

    Returns (fused scores [Q, k] float32, ids [Q, k] int64), -inf / -1 padded.
    """
    if method not in FUSIONS:
        raise ValueError(f"hybrid fusion must be one of {FUSIONS}, got {method!r}")
    if not 0.0 <= dense_weight <= 1.0:
        raise ValueError(f"dense_weight must be in [0, 1], got {dense_weight}")
    nq = dense[0].shape[0]
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        combined: dict[int, float] = {}
        for (scores, ids), w in ((dense, dense_weight), (sparse, 1.0 - dense_weight)):
            valid = ids[q] >= 0
            s, i = scores[q][valid], ids[q][valid]
            contrib = w / (rrf_k + 1 + np.arange(len(i))) if method == "rrf" else w * _normalise(s)
            for pid, c in zip(i.tolist(), contrib.tolist()):
                combined[pid] = combined.get(pid, 0.0) + c
        best = sorted(combined.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        for j, (pid, c) in enumerate(best):
            out_s[q, j], out_i[q, j] = c, pid
    return out_s, out_i
