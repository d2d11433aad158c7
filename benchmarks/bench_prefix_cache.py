"""Document-KV prefix cache: rag_token time-to-first-token (hit vs cold) and a Zipf workload.

    python benchmarks/bench_prefix_cache.py [--threads 2] [--queries 64] [--max-tokens 16]

Index: the Python reference docs in passages of 256 encoder tokens (overlap 128), about 250
SmolLM2 tokens each; generator SmolLM2-135M-Instruct fp32. Every figure is validated first:
greedy token ids with the cache on equal those with it off.
1. TTFT, k=4 passages in rag_token mode: wall time of generate(max_tokens=1) (retrieval
   included) with the cache cleared (cold), then with the same documents cached (hit).
2. Workload: 64 queries whose anchors follow a Zipf law over 1,000 passages, the exponent
   chosen so that >= 80% of retrieved documents were retrieved before; questions/s with the
   cache on (starting empty) vs off, in batches of --batch queries, and the cache's bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clean_blas_env, timeit, write_json  # noqa: E402

TEMPLATES = ("What does the documentation say about {}?", "Explain: {}", "In Python, what is meant by {}?",
             "Summarise the passage on {}.")


def load_engine(threads: int, cache_mb: int):
    from eval_qa import build_engine

    return build_engine(256, 128, "fp32", load_generator=True, threads=threads, k=4, mode="rag_token",
                        prefix_cache_bytes=cache_mb << 20)


def without_cache(eng):
    from rag_engine.engine import Engine

    return Engine(dataclasses.replace(eng.config, prefix_cache_bytes=0), eng.encoder, eng.generator, eng.index,
                  eng.w_a)


def query_of(eng, pid: int, variant: int) -> str:
    words = eng.index.passage(pid).text.split()[:8]
    return TEMPLATES[variant % len(TEMPLATES)].format(" ".join(words))


def repeat_fraction(eng, queries: list[str]) -> float:
    seen, repeats, total = set(), 0, 0
    for hits in eng.retrieve(queries):
        for h in hits:
            repeats += h.passage_id in seen
            seen.add(h.passage_id)
            total += 1
    return repeats / max(total, 1)


def zipf_queries(eng, n: int, corpus: int, target: float, rng) -> tuple[list[str], float, float]:
    """Queries whose anchors follow Zipf(s) over ``corpus`` passages, s the smallest on a grid
    giving a repeat fraction >= target."""
    perm = rng.permutation(min(corpus, len(eng.index)))
    for s in (0.6, 0.8, 1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 1.8, 2.0):
        p = 1.0 / np.arange(1, len(perm) + 1) ** s
        anchors = rng.choice(perm, n, p=p / p.sum())
        queries = [query_of(eng, int(a), int(v)) for a, v in zip(anchors, rng.integers(0, 4, n))]
        frac = repeat_fraction(eng, queries)
        if frac >= target:
            return queries, s, frac
    return queries, s, frac


def run_workload(eng, queries: list[str], params, batch: int) -> tuple[float, list, int]:
    peak = 0
    outs = []
    t0 = time.perf_counter()
    for b in range(0, len(queries), batch):
        outs += eng.generate(queries[b:b + batch], params)
        if eng.prefix_cache is not None:
            peak = max(peak, eng.prefix_cache.nbytes)
    return time.perf_counter() - t0, outs, peak


def main() -> None:
    clean_blas_env()
    import psutil

    from rag_engine import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--corpus", type=int, default=1000)
    p.add_argument("--repeat-target", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cache-mb", type=int, default=1024)
    p.add_argument("--skip-workload", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    proc = psutil.Process()
    eng = load_engine(args.threads, args.cache_mb)
    off = without_cache(eng)
    result: dict = {"threads": args.threads, "model": "SmolLM2-135M-Instruct fp32", "k": 4, "mode": "rag_token",
                    "cache_bound_bytes": eng.config.prefix_cache_bytes}

    # ---- 1. TTFT, validated
    first = SamplingParams(max_tokens=1, temperature=0.0)
    check = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    long_ids = [i for i in range(len(eng.index)) if len(eng.generator.encode(eng.index.passage(i).text)) >= 220]
    queries = [query_of(eng, int(i), j) for j, i in enumerate(rng.choice(long_ids, args.repeat, replace=False))]
    for q in queries:
        ref = off.generate([q], check)[0]
        eng.prefix_cache.clear()
        cold, hit = eng.generate([q], check)[0], eng.generate([q], check)[0]
        assert cold.token_ids == ref.token_ids == hit.token_ids, (q, cold.token_ids, hit.token_ids, ref.token_ids)
    prompt_tokens = [eng.generate([q], first)[0].metrics["prompt_tokens"] for q in queries]
    state = {"i": 0}

    def cold_call():
        eng.prefix_cache.clear()
        eng.generate([queries[state["i"] % len(queries)]], first)
        state["i"] += 1

    def hit_call():
        eng.generate([queries[state["i"] % len(queries)]], first)
        state["i"] += 1

    def off_call():
        off.generate([queries[state["i"] % len(queries)]], first)
        state["i"] += 1

    ttft = {"cache_off": timeit(off_call, len(queries)), "cold": timeit(cold_call, len(queries))}
    for q in queries:
        eng.generate([q], first)
    ttft["hit"] = timeit(hit_call, len(queries))
    speedup = ttft["cold"]["median"] / ttft["hit"]["median"]
    result["ttft"] = ttft | {"prompt_tokens_4_rows": prompt_tokens, "hit_speedup_vs_cold": speedup,
                             "hit_speedup_vs_cache_off": ttft["cache_off"]["median"] / ttft["hit"]["median"]}
    print(f"# rag_token k=4, prompt tokens over 4 rows: {prompt_tokens}")
    print("| TTFT (ms, median p20-p80) | cache off | cold | hit | hit vs cold |\n|---|---|---|---|---|")
    print("| generate(max_tokens=1) | " + " | ".join(
        f"{ttft[n]['median'] * 1e3:.0f} ({ttft[n]['p20'] * 1e3:.0f}-{ttft[n]['p80'] * 1e3:.0f})"
        for n in ("cache_off", "cold", "hit")) + f" | {speedup:.2f}x |", flush=True)

    # ---- 2. Zipf workload
    if not args.skip_workload:
        qs, s, frac = zipf_queries(eng, args.queries, args.corpus, args.repeat_target, rng)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        eng.prefix_cache.clear()
        hits0 = eng.prefix_cache.stats()
        rss0 = proc.memory_info().rss
        t_off, ref, _ = run_workload(off, qs, params, args.batch)
        t_on, outs, peak = run_workload(eng, qs, params, args.batch)
        assert [o.token_ids for o in outs] == [o.token_ids for o in ref], "cache on/off outputs differ"
        stats = eng.prefix_cache.stats()
        result["workload"] = {
            "queries": len(qs), "zipf_s": s, "repeat_fraction": frac, "batch": args.batch,
            "max_tokens": args.max_tokens, "seconds_cache_off": t_off, "seconds_cache_on": t_on,
            "qps_cache_off": len(qs) / t_off, "qps_cache_on": len(qs) / t_on, "speedup": t_off / t_on,
            "cache_peak_bytes": peak, "cache_bound_bytes": eng.config.prefix_cache_bytes,
            "rss_growth_bytes": proc.memory_info().rss - rss0, "stats": stats, "stats_before": hits0}
        print(f"\n# Zipf s={s} over {args.corpus} passages: {frac:.0%} of retrieved documents repeat; "
              f"{len(qs)} queries, batches of {args.batch}, max_tokens={args.max_tokens}")
        print("| questions/s | cache off | cache on | speedup | cache peak MiB (bound) |\n|---|---|---|---|---|")
        print(f"| rag_token k=4 | {len(qs) / t_off:.3f} | {len(qs) / t_on:.3f} | {t_off / t_on:.2f}x | "
              f"{peak / 2**20:.0f} ({eng.config.prefix_cache_bytes / 2**20:.0f}) |")
        print(f"# prefix cache: {stats}")
    print(f"# wrote {write_json('bench_prefix_cache', result)}")


if __name__ == "__main__":
    main()
