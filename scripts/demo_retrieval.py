"""Retrieval demo: a random 1M x 384 corpus searched by topk_ip and by faiss IndexFlatIP.

Checks that both return the same neighbours, then prints a short timing
comparison (2 threads each). Run through `make demo-retrieval`.
"""

from __future__ import annotations

import os
import sys
import time

for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # slow numpy/faiss BLAS if set
    os.environ.pop(var, None)

import numpy as np  # noqa: E402


def best_of(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    import faiss

    from rag_engine import CorpusMatrix, ops

    threads = int(os.environ.get("RAG_ENGINE_NUM_THREADS", "2"))
    faiss.omp_set_num_threads(threads)
    n, d = 1_000_000, 384
    rng = np.random.default_rng(0)
    print(f"building a random corpus: {n:,} x {d} float32 ({n * d * 4 / 1e9:.2f} GB), unit-norm rows")
    corpus = rng.standard_normal((n, d), dtype=np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(d)
    index.add(corpus)
    stores = {dt: CorpusMatrix.from_float(corpus, dt) for dt in ("fp32", "bf16", "int8")}
    print(f"threads: {threads}; CPU paths: {', '.join(__import__('rag_engine')._ext.supported_isas())}")
    print(f"{'Q':>4} {'k':>3} | {'faiss ms':>9} | {'topk_ip fp32':>12} | {'bf16':>6} | {'int8':>6} | same ids")
    k = 10
    for nq in (1, 8, 32):
        q = rng.standard_normal((nq, d), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        _, f_ids = index.search(q, k)
        _, o_ids = ops.topk_ip(q, stores["fp32"], k, threads=threads)
        same = np.mean([len(set(a) & set(b)) / k for a, b in zip(f_ids, o_ids)])
        tf = best_of(lambda q=q: index.search(q, k))
        t = {dt: best_of(lambda q=q, cm=cm: ops.topk_ip(q, cm, k, threads=threads)) for dt, cm in stores.items()}
        print(f"{nq:>4} {k:>3} | {tf * 1e3:>9.1f} | {t['fp32'] * 1e3:>12.1f} | {t['bf16'] * 1e3:>6.1f} "
              f"| {t['int8'] * 1e3:>6.1f} | {100 * same:.0f}%")
    s, i = ops.topk_ip(q[0], stores["fp32"], 5, threads=threads)
    print("top-5 of the last query:", ", ".join(f"#{a} ({b:.3f})" for a, b in zip(i, s)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
