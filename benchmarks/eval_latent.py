"""Latent mode on the pydoc corpus: held-out target NLL per token, and its inference cost vs concat.

    python benchmarks/eval_latent.py [--steps 75] [--heldout 24] [--concat-k 2]   # ~30 min on 2 busy cores

Self-supervised pairs from the eval index (passages of 128 tokens, overlap 32): a passage's
first --query-tokens generator tokens are the query, the next --target-tokens the target;
retrieval (dense, top --k) excludes the passage itself and its overlapping neighbours;
train/held-out are split by document. Mean target NLL per token (nats) on held-out pairs:
  (a) no retrieval            (b) concat: the top --concat-k retrieved passages before the query
  (c) latent, W_a = I, trained P    (d) latent, trained W_a and P    (e) latent (d) + concat
  (f) control: (d)'s weights fed the documents of another held-out query (what the soft
      prompts give without the right documents: format/domain priming, not retrieval).
Also: gradcheck of the fused op + projection in float64, two same-seed runs giving the same
loss curve, and latent vs concat prompt positions and TTFT through the Engine (ONNX Runtime,
one run, interleaved). Training checkpoints live in .cache/latent_eval (a rerun resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, clean_blas_env, write_json  # noqa: E402
from eval_qa import build_engine, load_qa  # noqa: E402

CKPT = ROOT / ".cache" / "latent_eval"


def soft_of(fusion, data, perm=None):
    import torch

    with torch.no_grad():
        idx = np.arange(len(data.pairs)) if perm is None else perm
        _, h_aug = fusion(data.h_in, data.docs[idx], data.mask[idx])
        return fusion.project(h_aug)


def concat_prompts(eng, tok, data, k: int) -> list[list[int]]:
    from rag_engine.latent import prompt_ids

    return [prompt_ids(tok, list(p.query_ids), [eng.index.passage(int(i)).text for i in row[row >= 0][:k]], "text")
            for p, row in zip(data.pairs, data.passage_ids)]


def cost(eng, questions: list[str], k: int, repeats: int) -> dict:
    """Median prompt positions and TTFT (ms) per mode, one query at a time, modes interleaved."""
    from rag_engine import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0)
    runs: dict[str, dict[str, list[float]]] = {m: {"prompt": [], "ttft": []} for m in ("concat", "latent")}
    for mode in runs:  # warm both sessions
        eng.generate(questions[:1], params, k=k, mode=mode)
    for _ in range(repeats):
        for q in questions:
            for mode in runs:
                (out,) = eng.generate([q], params, k=k, mode=mode)
                runs[mode]["prompt"].append(out.metrics["prompt_tokens"])
                runs[mode]["ttft"].append(out.metrics["prefill_ms"])
    res = {m: {"prompt_positions": float(np.median(r["prompt"])), "ttft_ms": float(np.median(r["ttft"])),
               "ttft_ms_p20_p80": [float(np.percentile(r["ttft"], 20)), float(np.percentile(r["ttft"], 80))]}
           for m, r in runs.items()}
    ratio = np.array(runs["concat"]["ttft"]) / np.array(runs["latent"]["ttft"])
    res["ttft_ratio_concat_over_latent"] = float(np.median(ratio))
    return res


def main() -> None:
    clean_blas_env()
    import torch

    from rag_engine.latent import LatentWeights, SoftPromptGenerator
    from rag_engine.train import (
        FrozenLM,
        TrainConfig,
        gradcheck_soft_prompts,
        mean_nll,
        prepare,
        train_latent,
    )
    from rag_engine.train_data import corpus_pairs, split_by_document

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=75)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=24, help="held-out pairs scored")
    ap.add_argument("--soft-prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--concat-k", type=int, default=2)
    ap.add_argument("--query-tokens", type=int, default=24)
    ap.add_argument("--target-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--lr-w-a", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cost-questions", type=int, default=5)
    ap.add_argument("--cost-repeats", type=int, default=2)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--repro-steps", type=int, default=3, help="steps (batch 2) of the same-seed check")
    ap.add_argument("--checkpoint-dir", default=str(CKPT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(soft_prompts=args.soft_prompts, k=args.k, max_pairs=args.pairs, query_tokens=args.query_tokens,
                      target_tokens=args.target_tokens, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      lr_w_a=args.lr_w_a, checkpoint_every=10)
    result: dict = {"config": dataclasses.asdict(cfg), "concat_k": args.concat_k}
    print(f"# gradcheck (fused op + projection, float64): {gradcheck_soft_prompts()}", flush=True)
    eng = build_engine(128, 32, "fp32")
    lm = FrozenLM.from_pretrained("default")
    pairs = corpus_pairs(eng.index, lm.tokenizer, cfg.max_pairs, cfg.query_tokens, cfg.target_tokens, cfg.seed)
    train, held = split_by_document(pairs, cfg.heldout_fraction, cfg.seed)
    held = held[: args.heldout]
    tr, ho = prepare(eng, lm.tokenizer, train, cfg, args.threads), prepare(eng, lm.tokenizer, held, cfg, args.threads)
    print(f"# {len(train)} training pairs, {len(held)} held-out pairs from other documents; "
          f"m={cfg.soft_prompts}, k={cfg.k}, {cfg.steps} steps of {cfg.batch_size}", flush=True)

    t0 = time.perf_counter()
    short = dataclasses.replace(cfg, steps=args.repro_steps, batch_size=2)
    curves = [train_latent(lm, tr, short, progress=False)[1] for _ in range(2)]
    result["same_seed_curves"] = {"runs": curves, "identical": curves[0] == curves[1]}
    print(f"# same seed twice, {args.repro_steps} steps: {curves[0]} vs {curves[1]} -> identical={curves[0] == curves[1]} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    fusions, losses = {}, {}
    for name, train_w_a in (("d", True), ("c", False)):
        t0 = time.perf_counter()
        fusions[name], losses[name] = train_latent(lm, tr, dataclasses.replace(cfg, train_w_a=train_w_a),
                                                   Path(args.checkpoint_dir) / name)
        print(f"# trained ({name}) W_a {'learned' if train_w_a else '= I'}: loss {np.mean(losses[name][:5]):.3f} -> "
              f"{np.mean(losses[name][-5:]):.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    result["loss_curves"] = losses
    w_a = fusions["d"].W_a.detach()
    result["w_a_change_fro"] = float((w_a - torch.eye(w_a.shape[0])).norm())

    concat = concat_prompts(eng, lm.tokenizer, ho, args.concat_k)
    perm = np.roll(np.arange(len(held)), 1)  # each query gets its neighbour's documents
    rows = [("(a) no retrieval", ho.prompts, None),
            (f"(b) concat top-{args.concat_k} passages", concat, None),
            ("(c) latent, W_a = I, trained P", ho.prompts, soft_of(fusions["c"], ho)),
            ("(d) latent, trained W_a and P", ho.prompts, soft_of(fusions["d"], ho)),
            (f"(e) latent (d) + concat top-{args.concat_k}", concat, soft_of(fusions["d"], ho)),
            ("(f) control: (d) with another query's documents", ho.prompts, soft_of(fusions["d"], ho, perm))]
    result["nll"] = {}
    print("\n| held-out pairs | prompt positions (mean) | NLL / target token | vs (a) |\n|---|---|---|---|")
    for name, prompts, soft in rows:
        t0 = time.perf_counter()
        nll = mean_nll(lm, prompts, ho.targets, soft, batch_size=4)
        base = result["nll"].get("(a) no retrieval", {"nll": nll})["nll"]
        positions = float(np.mean([len(p) for p in prompts])) + (0 if soft is None else soft.shape[1])
        result["nll"][name] = {"nll": nll, "prompt_positions": positions, "seconds": time.perf_counter() - t0}
        print(f"| {name} | {positions:.0f} | {nll:.4f} | {100 * (nll - base) / base:+.1f}% |", flush=True)
    d, a = result["nll"]["(d) latent, trained W_a and P"]["nll"], result["nll"]["(a) no retrieval"]["nll"]
    c = result["nll"]["(c) latent, W_a = I, trained P"]["nll"]
    f = result["nll"]["(f) control: (d) with another query's documents"]["nll"]
    result["bars"] = {"latent_d_vs_a_reduction": (a - d) / a, "d_at_least_5pct_below_a": (a - d) / a >= 0.05,
                      "trained_w_a_at_least_identity": d <= c, "right_documents_help": d < f}
    print(f"# the retrieved documents {'help' if d < f else 'do not help'} the soft prompts: (d) {d:.4f} vs "
          f"(f) {f:.4f} with another query's documents", flush=True)
    print(f"\n# (d) vs (a): {100 * (a - d) / a:.1f}% lower (bar: >= 5%); trained W_a {'<=' if d <= c else '>'} "
          f"identity: {d:.4f} vs {c:.4f}", flush=True)

    if not args.skip_cost:
        eng.latent = LatentWeights.from_fusion(fusions["d"], eng.encoder.name, lm.fingerprint, cfg.prompt_format)
        eng.w_a = w_a.numpy().copy()
        eng.latent_generator = SoftPromptGenerator.from_hf(lm.model, lm.tokenizer, threads=args.threads,
                                                           cache_dir=eng.config.cache_dir, progress=True)
        questions = [item["question"] for item in load_qa(args.cost_questions)]
        result["cost"] = cost(eng, questions, args.concat_k, args.cost_repeats)
        print(f"\n# inference cost, k={args.concat_k}, {len(questions)} QA questions x {args.cost_repeats}, "
              f"one process, modes interleaved (fp32 ONNX Runtime, {args.threads} threads):")
        print(json.dumps(result["cost"], indent=1))
    print(f"# wrote {write_json('eval_latent', result)}")


if __name__ == "__main__":
    main()
