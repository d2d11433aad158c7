"""`rag-engine train`: fit the latent mode's W_a and P on an index's own corpus (rag_engine.train)."""

from __future__ import annotations

import argparse
import dataclasses
import time


def add_train_parser(sub) -> None:
    from rag_engine.train import TrainConfig

    d = TrainConfig()
    t = sub.add_parser("train", help="train W_a and the soft-prompt projection P for mode=latent")
    t.add_argument("dir", help="index directory (its corpus gives the self-supervised pairs)")
    t.add_argument("--out", default=None, help="index directory to write (default: a new version of dir)")
    t.add_argument("--jsonl", default=None, help="extra (question, answer) pairs, one JSON object a line")
    t.add_argument("--checkpoint-dir", default=None, help="checkpoints every --checkpoint-every steps; "
                   "a rerun with the same directory resumes")
    for name in ("steps", "batch_size", "soft_prompts", "k", "max_pairs", "query_tokens", "target_tokens",
                 "checkpoint_every", "seed"):
        t.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("lr", "lr_w_a", "lr_gate", "clip_norm", "heldout_fraction"):
        t.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    t.add_argument("--identity-w-a", action="store_true", help="keep W_a = I (train P only)")
    t.add_argument("--prompt-format", choices=["text", "chat"], default=d.prompt_format)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from rag_engine.engine import Engine
    from rag_engine.train import TrainConfig, train_engine

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, train_w_a=not args.identity_w_a)
    eng = Engine.load(args.dir, load_generator=False)
    t0 = time.perf_counter()
    result = train_engine(eng, cfg, args.jsonl, args.checkpoint_dir, progress=not args.quiet, threads=args.threads)
    eng.save(args.out or args.dir)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    print(f"trained {cfg.steps} steps on {len(result.train)} pairs in {time.perf_counter() - t0:.0f} s: "
          f"loss {first:.3f} -> {last:.3f} (mean of the last 10); {len(result.heldout)} pairs held out "
          f"-> {args.out or args.dir}")
    return 0
