"""Shared benchmark plumbing: clean BLAS environment, timing stats, bandwidth probe, JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
ROOT = Path(__file__).resolve().parents[1]


def clean_blas_env() -> None:
    """Re-exec without OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE: they slow numpy/faiss BLAS.

    Must run before numpy/faiss/torch load their BLAS, i.e. first thing in main.
    """
    if any(v in os.environ for v in BLAS_VARS):
        env = {k: v for k, v in os.environ.items() if k not in BLAS_VARS}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    print(f"# {', '.join(BLAS_VARS)} unset for this run (they slow numpy/faiss BLAS)")


def set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> dict[str, float]:
    """Median and p20/p80 of wall time (seconds) over `repeat` runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    a = np.array(ts)
    return {"median": float(np.median(a)), "p20": float(np.percentile(a, 20)),
            "p80": float(np.percentile(a, 80)), "repeat": repeat}


def memory_bandwidth_gbs(buf: np.ndarray, threads: int) -> dict[str, float]:
    """Read bandwidth from sums over `buf` (which must be far larger than the caches):
    numpy (one thread) and torch with `threads` threads; the machine's figure is the max."""
    import torch

    t = torch.from_numpy(buf.reshape(-1))
    torch_gbs = buf.nbytes / timeit(lambda: t.sum(), 5)["median"] / 1e9
    np_gbs = buf.nbytes / timeit(lambda: buf.sum(), 3)["median"] / 1e9
    return {"torch_sum_gbs": torch_gbs, "numpy_sum_gbs": np_gbs, "best_gbs": max(torch_gbs, np_gbs)}


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def write_json(name: str, payload: dict) -> Path:
    out_dir = ROOT / "bench_results"
    out_dir.mkdir(exist_ok=True)
    rev = git_revision()
    payload = {"benchmark": name, "git_revision": rev, "machine": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), **payload}
    path = out_dir / f"{name}-{rev}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def fmt_ms(t: dict[str, float]) -> str:
    return f"{t['median'] * 1e3:.1f} ({t['p20'] * 1e3:.1f}-{t['p80'] * 1e3:.1f})"
