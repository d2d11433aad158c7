"""Continuous batching under Poisson arrivals vs serving the same requests one at a time.

    python benchmarks/bench_serve.py [--rate 2] [--requests 64] [--max-tokens 32] [--threads 2]

Requests: questions of the pydoc QA set, concat mode with k=2 passages (index p128), greedy,
SmolLM2-135M-Instruct fp32, prefix cache off in both arms (this measures batching alone).
Arrivals: a Poisson process of --rate requests/s (same seed, same times in both arms).
- batched: every request is submitted at its arrival time to the Engine's scheduler.
- one at a time: one worker streams the requests in arrival order (Engine.stream), each
  waiting for the previous one to finish.
Reported like `vllm bench serve`: throughput (requests/s, output tokens/s), end-to-end latency,
TTFT, TPOT (per request: (last token - first token) / (tokens - 1)) and ITL (gaps between
streamed deltas), p50/p90/p99. Outputs of both arms are checked to be equal first.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clean_blas_env, write_json  # noqa: E402


def percentiles(xs) -> dict[str, float]:
    a = np.asarray(xs, np.float64) * 1e3
    if a.size == 0:
        return {}
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def record(deltas, t_arrival: float) -> dict:
    """Consume an iterator of text deltas; times of arrival, each delta, and the end."""
    times, text = [], []
    for d in deltas:
        times.append(time.perf_counter())
        text.append(d)
    return {"arrival": t_arrival, "times": times, "end": time.perf_counter(), "text": "".join(text)}


def run_batched(eng, questions, arrivals, params) -> list[dict]:
    out: list[dict | None] = [None] * len(questions)
    t0 = time.perf_counter()

    def one(i: int) -> None:
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t = time.perf_counter()
        handle = eng.submit(questions[i], params)
        out[i] = record(handle.deltas(timeout=600), t) | {"tokens": len(handle.output.token_ids)}

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(questions))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def run_sequential(eng, questions, arrivals, params) -> list[dict]:
    out = []
    t0 = time.perf_counter()
    for i, q in enumerate(questions):
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        out.append(record(eng.stream(q, params), t0 + arrivals[i]))
    return out


def summarise(runs: list[dict]) -> dict:
    first = min(r["arrival"] for r in runs)
    span = max(r["end"] for r in runs) - first
    ttft = [r["times"][0] - r["arrival"] for r in runs if r["times"]]
    e2e = [r["end"] - r["arrival"] for r in runs]
    itl = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:])]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in runs if len(r["times"]) > 1]
    tokens = sum(r["tokens"] for r in runs)
    return {"requests": len(runs), "duration_s": span, "requests_per_s": len(runs) / span,
            "output_tokens_per_s": tokens / span, "latency": percentiles(e2e), "ttft": percentiles(ttft),
            "tpot": percentiles(tpot), "itl": percentiles(itl)}


def main() -> None:
    clean_blas_env()
    from eval_qa import build_engine, load_qa

    from rag_engine import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate, requests/s")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--max-batch-rows", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=512, help="prompt ids prefilled per scheduler step")
    args = p.parse_args()
    eng = build_engine(128, 32, "fp32", load_generator=True, threads=args.threads, k=args.k, mode="concat",
                       prefix_cache_bytes=0, max_batch_rows=args.max_batch_rows, max_waiting=args.requests,
                       max_prefill_tokens=args.max_prefill_tokens)
    qa = load_qa()
    questions = [qa[i % len(qa)]["question"] for i in range(args.requests)]
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    # validate: the scheduler answers as the static path does
    for q in questions[:3]:
        ref = eng.generate([q], params)[0]
        assert eng.submit(q, params).result(timeout=600).token_ids == ref.token_ids, q
    seq_runs = run_sequential(eng, questions, arrivals, params)
    before = eng.stats()
    t_bat = time.perf_counter()
    bat_runs = run_batched(eng, questions, arrivals, params)
    t_bat = time.perf_counter() - t_bat
    busy = {key: eng.stats()[key] - before.get(key, 0) for key in
            ("prefill_calls", "prefill_seconds", "decode_steps", "decode_seconds", "decode_rows", "prompt_tokens")}
    assert [r["text"] for r in seq_runs] == [r["text"] for r in bat_runs], "arms answered differently"
    for a, b in zip(seq_runs, bat_runs):
        a["tokens"] = b["tokens"]  # greedy: the same answers, so the same token counts
    seq, bat = summarise(seq_runs), summarise(bat_runs)
    eng.close()
    result = {"rate": args.rate, "max_tokens": args.max_tokens, "threads": args.threads, "k": args.k,
              "one_at_a_time": seq, "continuous_batching": bat,
              "throughput_ratio": bat["requests_per_s"] / seq["requests_per_s"],
              "p50_latency_ratio": bat["latency"]["p50_ms"] / seq["latency"]["p50_ms"],
              "scheduler_busy": busy | {"wall_seconds": t_bat}}
    print(f"# Poisson {args.rate} req/s, {args.requests} requests, concat k={args.k}, max_tokens={args.max_tokens}")
    print("| arm | req/s | out tok/s | latency p50/p90/p99 ms | TTFT p50/p90/p99 | TPOT p50/p90/p99 | "
          "ITL p50/p90/p99 |\n|---|---|---|---|---|---|---|")
    for name, s in (("one at a time", seq), ("continuous batching", bat)):
        cells = [" / ".join(f"{s[m][q]:.0f}" for q in ("p50_ms", "p90_ms", "p99_ms"))
                 for m in ("latency", "ttft", "tpot", "itl")]
        print(f"| {name} | {s['requests_per_s']:.3f} | {s['output_tokens_per_s']:.1f} | " + " | ".join(cells) + " |")
    print(f"# scheduler (continuous batching arm, {t_bat:.1f} s wall): {busy['prefill_calls']} prefill calls "
          f"{busy['prefill_seconds']:.1f} s for {busy['prompt_tokens']} prompt ids, {busy['decode_steps']} decode "
          f"steps {busy['decode_seconds']:.1f} s, {busy['decode_rows'] / max(busy['decode_steps'], 1):.1f} rows/step")
    print(f"# throughput {result['throughput_ratio']:.2f}x, p50 latency {result['p50_latency_ratio']:.2f}x "
          "of one at a time")
    print(f"# wrote {write_json('bench_serve', result)}")


if __name__ == "__main__":
    main()
