"""End-to-end questions/s: rag-engine vs a naive pipeline built from the usual parts.

    python benchmarks/bench_engine.py [--threads 2] [--questions 16] [--k 3] [--max-tokens 48]

Naive pipeline: HF transformers encoder (mean pooling, L2 norm) + faiss IndexFlatIP over the
same passage vectors + HF transformers `generate` (torch fp32, KV cache, left-padded batch),
with the same prompt and model, greedy. rag-engine: Engine.generate (ONNX Runtime encoder,
topk_ip, fusion_softmax_gather, ONNX Runtime generator) in fp32 and int8. Both sides batch all
questions; dense retrieval without document collapsing so both retrieve the same passages.
Greedy answers are compared token for token; per-stage times are reported for both sides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clean_blas_env, set_threads, write_json  # noqa: E402
from eval_qa import build_engine, load_qa  # noqa: E402


class NaivePipeline:
    def __init__(self, eng, threads: int) -> None:
        import faiss
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        from rag_engine.generator.assets import resolve_model
        from rag_engine.retrieval.encoder import packaged_minilm

        torch.set_num_threads(threads)
        self.torch = torch
        self.enc_tok = AutoTokenizer.from_pretrained(packaged_minilm())
        self.enc = AutoModel.from_pretrained(packaged_minilm()).eval()
        folder = resolve_model(eng.config.generator)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.index = faiss.IndexFlatIP(eng.index.dim)
        self.index.add(np.ascontiguousarray(eng.index.vectors().to_float()))
        self.eng = eng

    def answer(self, questions: list[str], k: int, max_tokens: int):
        from rag_engine.engine import Document
        from rag_engine.engine_generate import _concat_messages

        torch, t = self.torch, {}
        t0 = time.perf_counter()
        with torch.no_grad():
            enc = self.enc_tok(questions, padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = self.enc(**enc).last_hidden_state
            w = enc["attention_mask"].unsqueeze(-1).float()
            q = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=1).numpy()
        t1 = time.perf_counter()
        _, ids = self.index.search(q, k)
        t2 = time.perf_counter()
        msgs = []
        for qi, row in enumerate(ids):
            docs = [Document("", int(p), self.eng.index.passage(int(p)).text, 0.0, 1.0 / (1 + j))
                    for j, p in enumerate(row)]
            msgs.append(_concat_messages(self.eng, questions[qi], docs))
        prompts = [self.tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
        batch = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self.lm.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                                   pad_token_id=self.tok.pad_token_id)
        t3 = time.perf_counter()
        t.update(encode_s=t1 - t0, retrieve_s=t2 - t1, generate_s=t3 - t2, total_s=t3 - t0)
        width = batch["input_ids"].shape[1]
        answers = []
        for row in out[:, width:].tolist():
            toks = []
            for tok in row:
                toks.append(tok)
                if tok == self.tok.eos_token_id:
                    break
            answers.append(toks)
        return answers, ids, t


def main() -> None:
    clean_blas_env()
    import dataclasses

    from rag_engine import SamplingParams

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    set_threads(args.threads)
    qs = [item["question"] for item in load_qa(args.questions)]
    base = build_engine(256, 64, "fp32")
    base.config = dataclasses.replace(base.config, threads=args.threads, retriever="dense",
                                      max_passages_per_doc=0)
    naive = NaivePipeline(base, args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    ours = {}
    for precision in ("fp32", "int8"):
        eng = dataclasses.replace(base.config, generator_precision=precision)
        e = type(base)(eng, base.encoder, None, base.index, base.w_a)
        e.generate(qs[:2], params, k=args.k)  # export/warm-up
        ours[precision] = e
    runs = {"naive": [], "fp32": [], "int8": []}
    outputs = {}
    for _ in range(args.repeats):  # interleaved so machine noise hits every side alike
        answers, ids, t = naive.answer(qs, args.k, args.max_tokens)
        runs["naive"].append(t)
        outputs["naive"] = (answers, ids)
        for precision, e in ours.items():
            t0 = time.perf_counter()
            outs = e.generate(qs, params, k=args.k)
            total = time.perf_counter() - t0
            m = outs[0].metrics
            runs[precision].append({"encode_s": m["encode_ms"] / 1e3, "retrieve_s": m["retrieve_ms"] / 1e3,
                                    "fuse_s": m["fuse_ms"] / 1e3,
                                    "generate_s": max(o.metrics["prefill_ms"] + o.metrics["decode_ms"]
                                                      for o in outs) / 1e3,
                                    "total_s": total})
            outputs[precision] = outs
    naive_answers, naive_ids = outputs["naive"]
    same_docs = np.mean([[d.passage_id for d in o.documents] == r.tolist() for o, r in zip(outputs["fp32"], naive_ids)])
    result = {"questions": len(qs), "k": args.k, "max_tokens": args.max_tokens, "threads": args.threads}
    print(f"# {len(qs)} questions, k={args.k}, {args.max_tokens} new tokens, greedy, {args.threads} threads")
    print("| pipeline | questions/s | encode ms | retrieve ms | generate ms | total ms | speedup |")
    print("|---|---|---|---|---|---|---|")
    naive_total = np.median([r["total_s"] for r in runs["naive"]])
    for name, rs in runs.items():
        med = {key: float(np.median([r[key] for r in rs])) for key in rs[0]}
        result[name] = med | {"qps": len(qs) / med["total_s"], "speedup": naive_total / med["total_s"]}
        print(f"| {name} | {len(qs) / med['total_s']:.2f} | {1e3 * med['encode_s']:.0f} | "
              f"{1e3 * med['retrieve_s']:.1f} | {1e3 * med['generate_s']:.0f} | {1e3 * med['total_s']:.0f} | "
              f"{naive_total / med['total_s']:.2f}x |")
    for precision in ("fp32", "int8"):
        same = [list(o.token_ids) == a for o, a in zip(outputs[precision], naive_answers)]
        result[f"identical_{precision}"] = float(np.mean(same))
        print(f"greedy answers identical to the naive pipeline ({precision}): {sum(same)}/{len(same)}")
    result["same_passages"] = float(same_docs)
    print(f"same retrieved passages: {100 * same_docs:.0f}%")
    for name, bar in (("int8", 4.0), ("fp32", 2.0)):
        sp = result[name]["speedup"]
        print(f"Must show: {name} >= {bar}x naive: {sp:.2f}x {'MET' if sp >= bar else 'NOT MET'}")
    print(f"# wrote {write_json('engine', result)}")


if __name__ == "__main__":
    main()
