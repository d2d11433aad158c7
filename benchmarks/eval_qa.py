"""Retrieval recall and answer accuracy on the pydoc QA set (tests/data/pydoc_qa.jsonl).

    python benchmarks/eval_qa.py [--retrieval-only] [--limit N]

Recall@k: the gold topic is among the documents of the top-k passages. Several
pydoc topics are verbatim copies inside larger ones (e.g. `with` inside
`compound`), so a topic whose text contains the gold topic's text also counts.
Answer accuracy: any gold keyword appears in the generated answer
(case-insensitive), greedy decoding, default SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, clean_blas_env, write_json  # noqa: E402

QA_FILE = ROOT / "tests" / "data" / "pydoc_qa.jsonl"


def load_qa(limit: int | None = None) -> list[dict]:
    items = [json.loads(line) for line in QA_FILE.read_text().splitlines() if line.strip()]
    return items[:limit] if limit else items


def containing_topics() -> dict[str, set[str]]:
    """gold topic -> topics whose text contains it verbatim (itself included)."""
    from rag_engine.cli import pydoc_corpus

    ids, texts = pydoc_corpus()
    norm = {i: " ".join(t.split()) for i, t in zip(ids, texts)}
    return {g: {t for t in ids if norm[g] in norm[t]} for g in ids}


def recall(hits, qa, ok_topics, ks=(1, 5, 10)) -> dict[str, float]:
    out = {}
    for k in ks:
        good = [bool({h.doc_id for h in row[:k]} & ok_topics[item["topic"]]) for row, item in zip(hits, qa)]
        out[f"recall@{k}"] = float(np.mean(good))
    return out


def accuracy(texts, qa) -> float:
    return float(np.mean([any(kw.lower() in t.lower() for kw in item["keywords"]) for t, item in zip(texts, qa)]))


def eval_index_path(passage_tokens: int, overlap: int) -> Path:
    from rag_engine.retrieval.chunking import CHUNKER_VERSION

    return ROOT / ".cache" / f"eval_index_p{passage_tokens}_o{overlap}_c{CHUNKER_VERSION}"


def build_engine(passage_tokens: int, overlap: int, precision: str, int8_method: str = "nbits",
                 load_generator: bool = False, **overrides):
    """The pydoc index with these passages (built once, cached under .cache/), under this
    revision's default settings plus ``overrides``: only the index comes from the cache, never
    the engine.json saved with it (which would measure whatever defaults it was built with)."""
    import dataclasses

    from rag_engine.cli import pydoc_corpus
    from rag_engine.engine import Engine, EngineConfig

    path = eval_index_path(passage_tokens, overlap)
    if not (path / "CURRENT").exists():
        eng = Engine.from_pretrained("default", load_generator=False, passage_tokens=passage_tokens,
                                     overlap_tokens=overlap)
        ids, texts = pydoc_corpus()
        eng.add_documents(texts, ids=ids, progress=True)
        eng.save(path)
    index_fields = {"encoder", "encoder_precision", "index_dtype", "passage_tokens", "overlap_tokens"}
    current = {f.name: getattr(EngineConfig(), f.name) for f in dataclasses.fields(EngineConfig)
               if f.name not in index_fields}
    return Engine.load(path, load_generator=load_generator, **(current | {
        "generator_precision": precision, "generator_int8_method": int8_method} | overrides))


def main() -> None:
    clean_blas_env()
    import dataclasses

    from rag_engine import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrieval-only", action="store_true")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--passage-tokens", type=int, default=256)
    p.add_argument("--overlap", type=int, default=64)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--int8-method", default="nbits", choices=("nbits", "dynamic"))
    p.add_argument("--ort-ops", action="store_true", help="generator on ONNX Runtime's ops only (custom_ops=False)")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--answer-configs", default="none,concat1,concat2,rag_token2",
                   help="comma list of none | concat<k> | rag_token<k> | rag_sequence<k>")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="HF rule: also penalises prompt tokens, i.e. copying from the context")
    p.add_argument("--frequency-penalty", type=float, default=0.5, help="output tokens only (stops loops)")
    args = p.parse_args()
    qa = load_qa(args.limit)
    ok = containing_topics()
    eng = build_engine(args.passage_tokens, args.overlap, args.precision, args.int8_method,
                       **({"generator_custom_ops": False} if args.ort_ops else {}))
    questions = [item["question"] for item in qa]
    result = {"questions": len(qa), "passage_tokens": args.passage_tokens, "overlap": args.overlap,
              "retrieval": {}, "answers": {}}
    variants = [("dense all-passages", {"max_passages_per_doc": 0}), ("bm25 all-passages", {"max_passages_per_doc": 0}),
                ("hybrid all-passages", {"max_passages_per_doc": 0}), ("dense", {}), ("bm25", {}), ("hybrid rrf w=0.5", {"hybrid_fusion": "rrf", "hybrid_dense_weight": 0.5})]
    variants += [(f"hybrid weighted w={w}", {"hybrid_fusion": "weighted", "hybrid_dense_weight": w})
                 for w in (0.5, 0.6, 0.7, 0.8, 0.9)]
    print(f"# {len(qa)} questions, passages of {args.passage_tokens} tokens (overlap {args.overlap})")
    print("| retriever | recall@1 | recall@5 | recall@10 |\n|---|---|---|---|")
    base_config = eng.config
    for name, over in variants:
        eng.config = dataclasses.replace(base_config, **over)
        hits = eng.retrieve(questions, k=10, retriever=name.split()[0])
        r = recall(hits, qa, ok)
        result["retrieval"][name] = r
        print(f"| {name} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['recall@10']:.3f} |", flush=True)
    eng.config = base_config
    if not args.retrieval_only:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, repetition_penalty=args.repetition_penalty,
                                frequency_penalty=args.frequency_penalty)
        print(f"\n| answers ({args.precision}, greedy, frequency penalty {args.frequency_penalty}) | accuracy | s |")
        print("|---|---|---|")
        for cfg in args.answer_configs.split(","):
            mode = "concat" if cfg == "none" else cfg.rstrip("0123456789")
            k = 0 if cfg == "none" else int(cfg[len(mode):])
            t0 = time.perf_counter()
            texts = []
            for b in range(0, len(questions), 16):
                texts += [o.text for o in eng.generate(questions[b : b + 16], params, k=k, mode=mode)]
            acc = accuracy(texts, qa)
            result["answers"][cfg] = {"accuracy": acc, "seconds": time.perf_counter() - t0,
                                      "examples": texts[:5]}
            print(f"| {cfg} | {acc:.3f} | {time.perf_counter() - t0:.0f} |", flush=True)
    print(f"# wrote {write_json('eval_qa', result)}")


if __name__ == "__main__":
    main()
