"""The Engine's generation modes: prompts per mode, one batched generator run per call."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import numpy as np

from rag_engine import modes, prompts
from rag_engine.engine_serve import rag_doc_prompts
from rag_engine.generator import SamplingParams

# Imported by Engine.generate / Engine.stream only (keeps engine.py small).


def budgeted(eng, docs, tokenizer) -> tuple[list[str], tuple]:
    """(passage texts that fit ``context_tokens``, best alpha first; the documents by alpha with
    in_prompt set) -- the prompt budget of every mode that puts passages in the text."""
    ordered = _ordered(docs)
    texts = [d.text for d in ordered]
    count = lambda t: len(tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
    chosen = prompts.prune_to_budget(texts, range(len(texts)), count, eng.config.context_tokens)
    marked = tuple(dataclasses.replace(d, in_prompt=i in chosen) for i, d in enumerate(ordered))
    return [texts[i] for i in chosen], marked


def _concat_prompt(eng, question: str, docs) -> tuple[list[dict], tuple]:
    """(chat messages, documents by alpha with in_prompt set) for concat mode."""
    passages, marked = budgeted(eng, docs, eng.generator.tokenizer)
    return prompts.concat_messages(question, passages, eng.config.system_prompt), marked


def _concat_messages(eng, question: str, docs) -> list[dict]:
    return _concat_prompt(eng, question, docs)[0]


def _ordered(docs):
    return tuple(sorted(docs, key=lambda d: -d.alpha))


def run_mode(eng, mode: str, qs: list[str], docs: list, params: SamplingParams, metrics: dict) -> list:
    from rag_engine.engine import RagOutput, output_of

    if mode in ("latent", "latent_concat"):
        from rag_engine.latent import run_latent

        return run_latent(eng, mode, qs, docs, params, metrics)
    gen = eng.generator
    t0 = time.perf_counter()
    if mode == "concat" or all(not d for d in docs):
        built = [_concat_prompt(eng, q, d) for q, d in zip(qs, docs)]
        outs = gen.generate([msgs for msgs, _ in built], params)
        return [output_of(o, marked, metrics) for o, (_, marked) in zip(outs, built)]
    k = max(len(d) for d in docs)
    doc_msgs = [[prompts.concat_messages(q, [d[i].text], eng.config.system_prompt)
                 if i < len(d) else prompts.concat_messages(q, []) for i in range(k)] for q, d in zip(qs, docs)]
    log_alpha = np.stack([modes.log_alphas(d, k) for d in docs])
    if mode == "rag_sequence":
        p = params if params.logprobs is not None else _with_logprobs(params)
        flat = gen.generate([m for group in doc_msgs for m in group], p)
        results = []
        for qi, d in enumerate(docs):
            group = flat[qi * k : (qi + 1) * k]
            best = modes.choose_sequence(group, log_alpha[qi])
            ordered = _ordered(d)  # the choice is reported as an index into the documents returned
            results.append(output_of(group[best], ordered, metrics | {"rag_sequence_choice": ordered.index(d[best])}))
        return results
    # rag_token
    doc_ids, cacheable = [], []
    for q, d in zip(qs, docs):
        ids, lens = rag_doc_prompts(eng, q, d, k)
        doc_ids.append(ids)
        cacheable += lens
    # Each row's "prompt" (the tokens repetition penalties count as seen) is its query's document
    # prompts, as plain generation over one document would see them.
    rows = [modes.make_row(gen, np.concatenate(ids[: len(d)]), params) for ids, d in zip(doc_ids, docs)]
    for r in rows:
        r.t_start = t0
    for _ in modes.rag_token_generate(gen, doc_ids, log_alpha, [params] * len(qs), rows,
                                      eng.prefix_cache, cacheable):
        pass
    out = []
    for r, d, ids in zip(rows, docs, doc_ids, strict=True):
        ids = ids[: len(d)]  # slots beyond the query's passages are padding (alpha 0)
        dt = max(r.t_done - r.t_first, 1e-9)
        m = dict(metrics, prefill_ms=1e3 * (r.t_first - r.t_start), decode_ms=1e3 * dt,
                 decode_tokens_per_s=(len(r.tokens) - 1) / dt if len(r.tokens) > 1 else 0.0,
                 prompt_tokens=sum(len(x) for x in ids), completion_tokens=len(r.tokens))
        out.append(RagOutput(r.text, _ordered(d), tuple(r.tokens), r.finish_reason or "length", m))
    return out


def _with_logprobs(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, logprobs=0)


def stream_mode(eng, mode: str, question: str, docs, params: SamplingParams) -> Iterator[str]:
    if mode in ("latent", "latent_concat"):
        from rag_engine.latent import stream_latent

        yield from stream_latent(eng, mode, question, docs, params)
        return
    if mode == "concat" or not docs:
        yield from eng.generator.stream(_concat_messages(eng, question, docs), params)
        return
    if mode == "rag_token":
        gen = eng.generator
        k = len(docs)
        ids, cacheable = rag_doc_prompts(eng, question, docs, k)
        la = modes.log_alphas(docs, k)[None, :]
        row = modes.make_row(gen, gen.encode(prompts.concat_messages(question, [])), params)
        for events in modes.rag_token_generate(gen, [ids], la, [params], [row], eng.prefix_cache, cacheable):
            for _, delta in events:
                if delta:
                    yield delta
        return
    (out,) = run_mode(eng, mode, [question], [docs], params, {})
    yield out.text
