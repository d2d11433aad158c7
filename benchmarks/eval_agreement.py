"""Teacher-forced top-1 agreement of quantised SmolLM2 exports with fp32.

    python benchmarks/eval_agreement.py [--tokens 64] [--threads 2]

fp32 answers each chat prompt greedily (``--tokens`` new tokens); each quantised export then
reads the same prompt (prefill) and the fp32 answer one token at a time through its KV cache
(decode steps at batch 1, the path generation takes) and we count the positions where its
top-1 equals fp32's next token. Reported for the prefill's token and the decode steps.
Writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "List three prime numbers and say why they are prime.",
    "How do I reverse a list in Python?",
    "Summarise the plot of Romeo and Juliet.",
]
VARIANTS = {
    "int8 (MatMulInt8Block)": dict(precision="int8", custom_ops=True),
    "int8 (MatMulNBits)": dict(precision="int8", custom_ops=False),
    "int8 dynamic": dict(precision="int8", int8_method="dynamic"),
    "int4 (MatMulInt4Block)": dict(precision="int4", custom_ops=True),
    "int4 (MatMulNBits)": dict(precision="int4", custom_ops=False),
}


def teacher_forced(gen, prompt_ids: list[int], answer: list[int]) -> list[bool]:
    """Whether gen's top-1 equals answer[i] after prompt + answer[:i], for every i."""
    from rag_engine.generator.kv_cache import KVCache

    s = gen.session
    spec = s.spec
    total = len(prompt_ids) + len(answer)
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, 1, total + 1)
    ids = np.asarray([prompt_ids], np.int64)
    logits = s.run(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], cache)
    hits = [int(logits[0].argmax()) == answer[0]]
    for i, tok in enumerate(answer[:-1]):
        pos = np.array([len(prompt_ids) + i], np.int64)
        logits = s.decode(np.array([tok], np.int64), pos, cache)
        hits.append(int(logits[0].argmax()) == answer[i + 1])
    return hits


def main() -> None:
    from rag_engine import SamplingParams
    from rag_engine.generator import Generator

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()

    ref = Generator.from_pretrained("default", precision="fp32", threads=args.threads, progress=False)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompts = [ref.encode([{"role": "user", "content": p}]).tolist() for p in PROMPTS]
    answers = [o.token_ids for o in ref.generate(prompts, params)]
    results = {}
    for name in args.variants:
        gen = Generator.from_pretrained("default", threads=args.threads, progress=False, **VARIANTS[name])
        hits = [teacher_forced(gen, p, a) for p, a in zip(prompts, answers, strict=True)]
        first = float(np.mean([h[0] for h in hits]))
        decode = float(np.mean([x for h in hits for x in h[1:]]))
        results[name] = {"prefill_top1": first, "decode_top1": decode,
                         "custom_ops": gen.session.config.custom_ops}
        print(f"{name:24s} prefill {first:.3f}  decode steps {decode:.3f}  "
              f"({len(prompts)} prompts x {args.tokens} tokens)", flush=True)
    write_json("eval_agreement", {"tokens": args.tokens, "prompts": PROMPTS, "results": results})


if __name__ == "__main__":
    main()
