"""rag_token_marg (+ rag_token_sample) vs torch logsumexp(log_alpha + log_softmax), same thread count.

    python benchmarks/bench_rag_token_marg.py [--threads 2] [--quick]

Each shape is validated against the float64 reference before it is timed.
Reports median (p20-p80) ms, logits GB/s (logits bytes / time) and the fraction
of the measured memory bandwidth, and writes JSON. The sampling row times the
fused marginal + top_k/top_p/min_p draw against torch's marginal alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fusion_softmax import print_markdown, ratios, time_interleaved  # noqa: E402
from common import clean_blas_env, fmt_ms, memory_bandwidth_gbs, set_threads, write_json  # noqa: E402

BAR = 8.0  # Must-show: >= 8x torch at B=8, K=5, V in {49152, 151936}


def main() -> None:
    clean_blas_env()
    import torch

    from rag_engine import ops, reference

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="only the Must-show shapes, fewer repeats")
    args = p.parse_args()
    T = args.threads
    set_threads(T)
    rng = np.random.default_rng(0)
    buf = rng.standard_normal(256 * 1024 * 1024 // 4 * 4, dtype=np.float32)  # 1 GiB, far beyond L3
    bw = memory_bandwidth_gbs(buf, T)
    del buf
    print(f"# threads={T}; memory bandwidth: torch.sum {bw['torch_sum_gbs']:.1f} GB/s, numpy.sum "
          f"{bw['numpy_sum_gbs']:.1f} GB/s -> {bw['best_gbs']:.1f} GB/s")

    shapes = [(8, 5, 49152, "marg"), (8, 5, 151936, "marg"), (1, 5, 151936, "marg"), (32, 4, 32000, "marg"),
              (8, 5, 151936, "sample")]
    if args.quick:
        shapes = shapes[:2]
    params = type("Params", (), {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.0, "seed": 0})()
    rows = []
    for b, k, v, kind in shapes:
        log_alpha = np.log(rng.dirichlet(np.ones(k), b)).astype(np.float32)
        logits = rng.standard_normal((b, k, v), dtype=np.float32) * 3
        la_t, lg_t = torch.from_numpy(log_alpha), torch.from_numpy(logits)
        ours = ops.rag_token_marg(log_alpha, logits, threads=T)
        ref = reference.rag_token_marg(log_alpha, logits)
        err = np.abs(ours - ref).max()
        if err > 1e-4:
            raise SystemExit(f"validation failed at B={b} K={k} V={v}: max error {err:.3g}")
        rep = 10 if args.quick else 25
        if kind == "sample":
            tok, _ = ops.rag_token_sample(log_alpha, logits, params, threads=T)
            want = reference.sample_log_probs(ours, np.random.default_rng(0).random(b), 0.8, 50, 0.9)
            if not (tok == want).all():
                raise SystemExit("validation failed: sampled tokens differ from the reference sampler")
            ours_fn = lambda la=log_alpha, x=logits: ops.rag_token_sample(la, x, params, threads=T)  # noqa: E731
        else:
            ours_fn = lambda la=log_alpha, x=logits: ops.rag_token_marg(la, x, threads=T)  # noqa: E731
        times = time_interleaved({"ours": ours_fn,
                                  "torch": lambda a=la_t, x=lg_t: reference.rag_token_marg_torch(a, x)}, rep)
        row = {"b": b, "k": k, "v": v, "kind": kind, "times_s": times, **ratios(times),
               "gbs": logits.nbytes / times["ours"]["median"] / 1e9,
               "torch_gbs": logits.nbytes / times["torch"]["median"] / 1e9}
        row["bw_frac"] = row["gbs"] / bw["best_gbs"]
        rows.append(row)
        print(f"B={b:>2} K={k} V={v:>6} {kind:<6} | ours {fmt_ms(times['ours'])} ms {row['gbs']:.1f} GB/s "
              f"({100 * row['bw_frac']:.0f}% bw) | torch {fmt_ms(times['torch'])} ms {row['torch_gbs']:.2f} GB/s "
              f"| speedup {row['speedup']:.1f}x (best-of {row['speedup_min']:.1f}x)", flush=True)

    print_markdown(["B", "K", "V", "op", "ours ms", "torch ms", "speedup", "GB/s (logits)", "% of bw", "torch GB/s"],
                   [[str(r["b"]), str(r["k"]), str(r["v"]), r["kind"], fmt_ms(r["times_s"]["ours"]),
                     fmt_ms(r["times_s"]["torch"]), f"{r['speedup']:.1f}x", f"{r['gbs']:.1f}",
                     f"{100 * r['bw_frac']:.0f}%", f"{r['torch_gbs']:.2f}"] for r in rows])
    print(f"\nMust-show (B=8, K=5, >= {BAR}x torch):")
    for r in rows:
        if r["b"] == 8 and r["k"] == 5 and r["kind"] == "marg":
            print(f"  V={r['v']:>6}: {r['speedup']:.1f}x on medians {'MET' if r['speedup'] >= BAR else 'NOT MET'} "
                  f"(best-of-run times: {r['speedup_min']:.1f}x)")
    path = write_json("rag_token_marg", {"threads": T, "bandwidth": bw, "rows": rows})
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
