"""Host time per call of the GPU ops' pieces: where a small call's time goes.

    python benchmarks/bench_gpu_overhead.py [--iters 2000]

For small shapes (a decode step's rag_token_marg, a fusion_softmax of 32 rows)
the kernels take tens of microseconds and the host path decides the call's
time. This times, without a sync between calls (so launches only queue), each
piece of that path: the argument checks, the tiny torch ops and allocations,
the extension call alone on preallocated buffers, the one host sync; and the
whole op, for comparison with the torch expression.
"""

from __future__ import annotations

import argparse
import time


def per_call(fn, iters: int) -> float:
    """Microseconds of host time per call; the device queue is drained before and after."""
    import torch

    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    import torch

    from rag_engine import _ext, gpu, gpu_ops, ops

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_overhead: no CUDA device")
    ext = _ext.cuda_ext()
    dev = torch.device("cuda", torch.cuda.current_device())
    b, k, v = 8, 5, 128256
    la = torch.randn(b, k, device=dev).log_softmax(1)
    x = torch.randn(b, k, v, device=dev)
    out = torch.empty(b, v, device=dev)
    ws = torch.empty(max(8, ext.rag_token_marg_workspace(b, k, v)) if ext else 8, dtype=torch.uint8, device=dev)
    bad = gpu.new_bad(dev, -1)
    h = torch.randn(32, 768, device=dev)
    docs = torch.randn(32, 16, 768, device=dev)
    stream = gpu.stream_handle(dev)
    pieces = {
        "empty python call": lambda: None,
        "torch.empty(8, V)": lambda: torch.empty(b, v, device=dev),
        "torch.full((1,), -1) (new_bad)": lambda: gpu.new_bad(dev, -1),
        "x.add_(0) (one tiny launch)": lambda: la.add_(0),
        "la.amax(1) isfinite all (la check)": lambda: ~torch.isfinite(la.amax(1)).all(),
        "torch.isfinite(h).all() (h check)": lambda: torch.isfinite(h).all(),
        "gpu.stream_handle(dev)": lambda: gpu.stream_handle(dev),
        "torch.cuda.current_device()": torch.cuda.current_device,
        "gpu.check_devices(2 tensors)": lambda: gpu.check_devices("op", "cuda", a=la, b=x),
        "bad.item() (host sync, idle queue)": lambda: bad.item(),
    }
    if ext is not None:
        pieces["ext.rag_token_marg_workspace"] = lambda: ext.rag_token_marg_workspace(b, k, v)
        pieces["ext.rag_token_marg (launch only)"] = lambda: ext.rag_token_marg(
            la.data_ptr(), x.data_ptr(), "fp32", b, k, v, 1.0, out.data_ptr(), ws.data_ptr(), ws.numel(),
            bad.data_ptr(), stream)
    backends = [bk for bk in ("cuda", "triton") if (ext if bk == "cuda" else _ext.has_triton())]
    for bk in backends:
        pieces[f"gpu_ops.rag_token_marg {bk} (whole op)"] = lambda bk=bk: gpu_ops.rag_token_marg(bk, la, x, 1.0)
        pieces[f"ops.fusion_softmax {bk} (whole op)"] = lambda bk=bk: ops.fusion_softmax(h, docs, backend=bk)
    pieces["torch logsumexp marg"] = lambda: torch.logsumexp(la[..., None] + torch.log_softmax(x, -1), 1)
    pieces["torch einsum fusion"] = lambda: torch.einsum(
        "bk,bkd->bd", torch.einsum("bd,bkd->bk", h, docs).softmax(1), docs)
    print(f"# {torch.cuda.get_device_name()}: host microseconds per call ({args.iters} calls, no sync between)")
    for name, fn in pieces.items():
        # launches that queue work: few enough calls that the device queue never fills
        n = min(args.iters, 200) if "launch" in name or "torch " in name else args.iters
        try:
            print(f"{per_call(fn, n):9.1f} us  {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one broken piece must not hide the rest
            print(f"   failed  {name}: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
