"""GPU benchmark of the three ops against what a GPU user has today.

    python benchmarks/bench_gpu_ops.py [--n 10000000] [--quick] [--out DIR]

topk_ip (bf16 corpus N x 768, K = 10, Q in {1, 16, 256}): our cuda and triton
backends vs torch bf16 matmul + topk and faiss-gpu GpuIndexFlatIP (fp16
storage) when faiss has GPU support; K = 1024 and 4096 must run.
rag_token_marg (B = 8, K = 5, V = 128256 fp32) and fusion_softmax (B = 32,
K = 16, D = 768) vs the torch expressions. Every contender is validated
(tie-aware, on true scores) before it is timed; times are CUDA-event medians
with p20-p80; bandwidth is reported against a measured device copy rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import git_revision  # noqa: E402


def cuda_time(fn, repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median and p20/p80 seconds of fn() measured with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    t = np.array(ts)
    return {"median": float(np.median(t)), "p20": float(np.percentile(t, 20)),
            "p80": float(np.percentile(t, 80)), "repeat": repeat}


def copy_bandwidth_gbs() -> float:
    """Device copy rate (read + write bytes / time) of a 2 GiB buffer: the HBM figure."""
    import torch

    x = torch.empty(1 << 29, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    t = cuda_time(lambda: y.copy_(x), 10)["median"]
    return 2 * x.numel() * 4 / t / 1e9


def torch_topk(q, c, k, chunk=1 << 21):
    """The usual torch path: bf16 matmul in chunks, topk per chunk, then a final topk."""
    import torch

    best_s, best_i = [], []
    for a in range(0, c.shape[0], chunk):
        s = (q.to(c.dtype) @ c[a:a + chunk].T).float()
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s.append(v)
        best_i.append(i + a)
    s, i = torch.cat(best_s, 1), torch.cat(best_i, 1)
    v, j = torch.topk(s, k, dim=1)
    return v, torch.gather(i, 1, j)


FAILURES: list[str] = []


def failed(what: str) -> None:
    """Record a failed validation or a crash; the contender is not timed, the run goes on."""
    print(f"# FAILED {what}", flush=True)
    FAILURES.append(what)


def check_ids(name, q, c, ids, ref_ids, tol) -> bool:
    """Tie-aware: both id lists must carry the same sorted true scores (float64 on the GPU)."""
    import torch

    def true(ix):
        return torch.einsum("qd,qkd->qk", q.double(), c[ix.clamp(min=0)].double()).sort(1).values

    err = float((true(ids) - true(ref_ids)).abs().max())
    if err > tol or bool((ids < 0).any()):
        failed(f"topk_ip {name} Q={q.shape[0]}: true-score gap {err:.3g} > {tol:.3g} or missing ids")
        return False
    return True


def fmt(r: dict) -> str:
    ms = f"{r['median'] * 1e3:8.3f} ms ({r['p20'] * 1e3:.3f}-{r['p80'] * 1e3:.3f})"
    shape = " ".join(f"{key}={r[key]}" for key in ("Q", "N", "K", "B", "V", "D") if key in r)
    extra = f"  {r['gbs']:7.0f} GB/s ({r.get('frac_peak', 0):.0%})" if "gbs" in r else ""
    return f"{r['op']:15s} {r['contender']:22s} {shape:34s} {ms}{extra}"


class Rows(list):
    """The result rows, each printed as soon as it is measured (a cut-off run keeps its lines)."""

    def append(self, r: dict) -> None:
        super().append(r)
        print(fmt(r), flush=True)


def ratios(rows: list[dict]) -> list[str]:
    """Per shape: our best backend against the best other contender (median over median)."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        key = (r["op"],) + tuple(f"{k}={r[k]}" for k in ("Q", "K", "B", "V", "D") if k in r)
        groups.setdefault(key, {})[r["contender"]] = r["median"]
    out = []
    for key, t in groups.items():
        ours = {c: v for c, v in t.items() if c.startswith("ours")}
        other = {c: v for c, v in t.items() if not c.startswith("ours")}
        if ours and other:
            bo, bc = min(ours, key=ours.get), min(other, key=other.get)
            out.append(f"{' '.join(key):40s} {bo} {ours[bo] * 1e3:.3f} ms vs {bc} {other[bc] * 1e3:.3f} ms: "
                       f"{other[bc] / ours[bo]:.2f}x")
    return out


def profile(label: str, fn, iters: int = 20) -> None:
    """Device time per call by kernel (torch.profiler), and the host time per call.

    Separates what the kernels cost from launch and Python overhead: a call whose
    host time exceeds its kernels' time is bound by the host, not the GPU.
    """
    import torch
    from bench_gpu_overhead import per_call
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    host = per_call(fn, iters) / 1e6
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kern = [(e.key, e.device_time_total / iters, e.count // iters) for e in prof.key_averages()
            if e.device_time_total > 0]
    kern.sort(key=lambda r: -r[1])
    total = sum(t for _, t, _ in kern)
    print(f"# profile {label}: {host * 1e6:.1f} us/call wall, kernels {total:.1f} us/call:", flush=True)
    for key, t, cnt in kern[:6]:
        print(f"#   {t:9.1f} us  x{cnt}  {key[:90]}", flush=True)


def guarded(what: str, fn):
    """fn() or None, recording an exception as a failure."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report and go on to the next contender
        failed(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
        return None


def bench_topk(args, rows, peak):
    import torch

    from rag_engine import ops
    from rag_engine.gpu import DeviceCorpus

    n, d = args.n, 768
    torch.manual_seed(0)
    c = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
    corpus = DeviceCorpus(c)
    c16 = c.to(torch.float16)  # what faiss-gpu's flat index with useFloat16 scans: cuBLAS fp16 GEMM
    try:
        import faiss

        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = True
        index = faiss.GpuIndexFlatIP(res, d, cfg)
        for a in range(0, n, 1 << 20):
            index.add(c[a : a + (1 << 20)].float().cpu().numpy())
    except Exception as exc:  # faiss without GPU support, or not installed
        print(f"# faiss-gpu unavailable: {type(exc).__name__}: {exc}")
        index = None
    for nq in (1, 16, 256) if not args.quick else (1, 16):
        q = torch.randn(nq, d, device="cuda")
        ref_s, ref_i = ops.topk_ip(q, corpus, 10, backend="torch")
        # ours: fp32 scores; the torch baselines round their scores to bf16 / fp16, so
        # near-equal 10th/11th rows may swap by up to two of those ulps
        smax = float(ref_s.abs().max())
        tols = {"torch-matmul-topk": 2 * 2**-8 * smax, "torch-fp16-matmul-topk": 2 * 2**-11 * smax}
        contenders = {f"ours-{b}": (lambda b=b, q=q: ops.topk_ip(q, corpus, 10, backend=b)) for b in args.backends}
        contenders["torch-matmul-topk"] = lambda q=q: torch_topk(q, c, 10)
        contenders["torch-fp16-matmul-topk"] = lambda q=q: torch_topk(q, c16, 10)
        if index is not None:
            qn = q.cpu().numpy()
            contenders["faiss-gpu-fp16"] = lambda qn=qn: index.search(qn, 10)
        for name, fn in contenders.items():
            res = guarded(f"topk_ip {name} Q={nq}", fn)
            if res is None:
                continue
            ids = res[1]
            ids = torch.as_tensor(np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids), device="cuda")
            tol = tols.get(name, 1e-3 if name.startswith("ours") else 2e-2)
            if not check_ids(name, q, c, ids, ref_i, tol=tol):
                continue
            t = cuda_time(fn, args.repeat)
            if args.profile and nq != 16:
                guarded(f"profile {name}", lambda fn=fn, name=name, nq=nq: profile(f"topk_ip {name} Q={nq}", fn, 5))
            gbs = c.numel() * 2 / t["median"] / 1e9
            rows.append({"op": "topk_ip", "contender": name, "Q": nq, "N": n, "D": d, "K": 10, "dtype": "bf16",
                         **t, "gbs": gbs, "frac_peak": gbs / peak})
    for k in (1024, 4096):
        q = torch.randn(4, d, device="cuda")
        ref_s, ref_i = ops.topk_ip(q, corpus, k, backend="torch")
        for b in args.backends:
            res = guarded(f"topk_ip ours-{b} K={k}", lambda b=b, k=k, q=q: ops.topk_ip(q, corpus, k, backend=b))
            if res is None or not check_ids(f"ours-{b} K={k}", q, c, res[1], ref_i, tol=1e-3):
                continue
            t = cuda_time(lambda b=b, k=k, q=q: ops.topk_ip(q, corpus, k, backend=b), 3, 1)
            rows.append({"op": "topk_ip", "contender": f"ours-{b}", "Q": 4, "N": n, "D": d, "K": k,
                         "dtype": "bf16", **t})


def rotating(fn, sets):
    """A callable that runs fn on the next input set each call (inputs larger than L2 in total)."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(sets)
        return fn(*sets[state["i"]])
    return call


def bench_marg_fusion(args, rows, peak):
    import torch

    from rag_engine import ops

    def torch_marg(la, x):
        return torch.logsumexp(la[..., None] + torch.log_softmax(x, -1), 1)

    # B = 8 is a decode step's shape (20 MB: launch-bound); B = 128 (330 MB) shows the bandwidth.
    for b in (8, 128):
        k, v = 5, 128256
        nsets = max(2, (512 << 20) // (b * k * v * 4))  # rotate over >= 512 MB: never timed from L2
        sets = [(torch.randn(b, k, device="cuda").log_softmax(1), torch.randn(b, k, v, device="cuda") * 3)
                for _ in range(nsets)]
        la, x = sets[0]
        ref = torch_marg(la.double(), x.double()).float()
        contenders = {f"ours-{bk}": (lambda la, x, bk=bk: ops.rag_token_marg(la, x, backend=bk)) for bk in args.backends}
        contenders["torch-logsumexp"] = torch_marg
        for name, fn in contenders.items():
            out = guarded(f"rag_token_marg {name} B={b}", lambda fn=fn, la=la, x=x: fn(la, x))
            if out is None:
                continue
            err = float((out - ref).abs().max())
            if not err <= 1e-3:
                failed(f"rag_token_marg {name} B={b}: max error {err:.3g} > 1e-3")
                continue
            t = cuda_time(rotating(fn, sets), args.repeat)
            if args.profile:
                guarded(f"profile {name}",
                        lambda fn=fn, name=name, b=b, sets=sets: profile(f"rag_token_marg {name} B={b}",
                                                                         rotating(fn, sets)))
            gbs = b * k * v * 4 / t["median"] / 1e9
            rows.append({"op": "rag_token_marg", "contender": name, "B": b, "K": k, "V": v, **t, "gbs": gbs,
                         "frac_peak": gbs / peak})
        del sets, la, x
    bb, kk, d = 32, 16, 768
    sets = []
    for _ in range(24):  # 24 x 2.4 MB of inputs: more than the 50 MB L2
        h = torch.randn(bb, d, device="cuda") / d**0.25
        docs = torch.randn(bb, kk, d, device="cuda") / d**0.25
        w = torch.eye(d, device="cuda") + torch.randn(d, d, device="cuda") / d**0.5
        sets.append((h, docs, w))
    h, docs, w = sets[0]
    ref_a = torch.einsum("bd,bkd->bk", h.double() @ w.double(), docs.double()).softmax(1).float()
    contenders = {f"ours-{bk}": (lambda h, docs, w, bk=bk: ops.fusion_softmax(h, docs, w, backend=bk))
                  for bk in args.backends}

    def torch_fusion(h, docs, w):
        a = torch.einsum("bd,bkd->bk", h @ w, docs).softmax(1)
        return a, torch.einsum("bk,bkd->bd", a, docs)

    contenders["torch-einsum"] = torch_fusion
    for name, fn in contenders.items():
        out = guarded(f"fusion_softmax {name}", lambda fn=fn, h=h, docs=docs, w=w: fn(h, docs, w))
        if out is None:
            continue
        err = float((out[0] - ref_a).abs().max())
        if not err <= 1e-4:
            failed(f"fusion_softmax {name}: max alpha error {err:.3g} > 1e-4")
            continue
        t = cuda_time(rotating(fn, sets), args.repeat)
        if args.profile:
            guarded(f"profile {name}", lambda fn=fn, name=name: profile(f"fusion_softmax {name}", rotating(fn, sets)))
        rows.append({"op": "fusion_softmax", "contender": name, "B": bb, "K": kk, "D": d, **t,
                     "gbs": docs.numel() * 4 / t["median"] / 1e9})


def main() -> None:
    import torch

    from rag_engine import _ext

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="kernel times and host time per call (torch.profiler)")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_ops: no CUDA device")
    args.backends = [b for b in ("cuda", "triton") if (_ext.cuda_ext() if b == "cuda" else _ext.has_triton())]
    peak = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}: device copy {peak:.0f} GB/s; backends {args.backends}")
    rows = Rows()
    guarded("rag_token_marg/fusion_softmax benchmark", lambda: bench_marg_fusion(args, rows, peak))
    guarded("topk_ip benchmark", lambda: bench_topk(args, rows, peak))
    print("# ours (best backend) vs the best other contender, same GPU, same run:")
    print("\n".join(ratios(rows)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_gpu_ops-{git_revision()}.json"
    path.write_text(json.dumps({"benchmark": "bench_gpu_ops", "git_revision": git_revision(),
                                "device": torch.cuda.get_device_name(), "copy_gbs": peak, "rows": rows,
                                "failures": FAILURES}, indent=2))
    print(f"# wrote {path}")
    if FAILURES:
        print(f"# {len(FAILURES)} failure(s):\n" + "\n".join(f"#   {f}" for f in FAILURES))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
