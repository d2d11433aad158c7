"""Generation modes that condition on several documents at once (DESIGN.md §1).

rag_token: one generator row per (query, document); every step the next-token
distribution is the mixture p(y_t) = Σ_i α_i p_i(y_t), computed in log space
by ops.rag_token_marg, and the chosen token is fed to all rows of the query.
rag_sequence: one continuation per document; the answer is the one with the
highest log α_i + log p(y | z_i, x).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from rag_engine import ops
from rag_engine.generator import GenerationOutput, Generator, SamplingParams
from rag_engine.generator.detokenize import IncrementalDetokenizer
from rag_engine.generator.kv_cache import KVCache
from rag_engine.generator.loop import Row, decode_one_token
from rag_engine.generator.prefix_cache import PrefixCache, prefill_rows
from rag_engine.generator.sampling import Sampler


def rag_token_generate(gen: Generator, doc_prompts: Sequence[Sequence[np.ndarray]], log_alpha: np.ndarray,
                       params: Sequence[SamplingParams], rows: Sequence[Row],
                       prefix_cache: PrefixCache | None = None, cacheable: Sequence[int] | None = None
                       ) -> Iterator[list[tuple[int, str]]]:
    """Run RAG-Token decoding; yields [(query index, text delta)] after each step.

    doc_prompts[q][i]: token ids of document i's prompt for query q (K per query);
    log_alpha [Q, K] float32 (-inf for a padded slot); rows[q] collects query q's output.
    prefix_cache / cacheable (one per flattened doc prompt): reuse and store document-prefix KV.
    """
    spec = gen.session.spec
    nq, k = log_alpha.shape
    flat = [p for group in doc_prompts for p in group]
    max_len = min(spec.max_context, max(len(p) for p in flat) + max(p.max_tokens for p in params))
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(flat), max_len)
    sampler = Sampler(list(params), [r.prompt for r in rows], spec.vocab_size, [r.stop_ids for r in rows])
    lengths = np.array([len(p) for p in flat], np.int64)
    live = np.arange(nq)
    la = np.ascontiguousarray(log_alpha, np.float32)
    logits = prefill_rows(gen.session, cache, 0, flat, prefix_cache, cacheable)
    while True:
        marginal = ops.rag_token_marg(la[live], logits.reshape(len(live), k, -1))
        tokens = sampler.sample(marginal)
        now = time.perf_counter()
        events = []
        for j, q in enumerate(live.tolist()):
            own = lengths[j * k : (j + 1) * k][np.isfinite(la[q])]  # padded slots (alpha 0) do not count
            rows[q].append(int(tokens[j]), now, max_len - int(own.max()) - 1)
            delta = rows[q].take_delta()
            if delta or rows[q].finish_reason:
                events.append((q, delta))
        yield events
        alive = np.array([rows[q].finish_reason is None for q in live.tolist()])
        if not alive.any():
            return
        if not alive.all():
            keep_q = np.flatnonzero(alive)
            keep_rows = (keep_q[:, None] * k + np.arange(k)[None, :]).reshape(-1)
            cache.keep(keep_rows, used=int(lengths.max()))
            sampler.keep(keep_q)
            live, lengths, tokens = live[keep_q], lengths[keep_rows], tokens[keep_q]
        logits = decode_one_token(gen.session, cache, np.repeat(tokens, k), lengths)
        lengths = lengths + 1


def log_alphas(docs: Sequence, k: int) -> np.ndarray:
    """log α ``[k]`` fp32 (-inf for empty slots); no documents: slot 0 carries all the mass."""
    out = np.full(k, -np.inf, np.float32)
    a = np.array([d.alpha for d in docs], np.float64)
    if len(a) == 0 or a.sum() <= 0:
        out[0] = 0.0
    else:
        out[: len(a)] = np.log(np.maximum(a, 1e-30))
    return out


def make_row(gen: Generator, prompt: np.ndarray, params: SamplingParams) -> Row:
    return Row(prompt, params, gen.stop_ids_for(params),
               IncrementalDetokenizer(gen.tokenizer, params.skip_special_tokens))


def choose_sequence(outputs: Sequence[GenerationOutput], log_alpha: np.ndarray) -> int:
    """RAG-Sequence pick: argmax_i log α_i + Σ_t log p(y_t | z_i, x) (outputs carry logprobs)."""
    best, best_score = 0, -np.inf
    for i, out in enumerate(outputs):
        if not np.isfinite(log_alpha[i]):
            continue
        ll = sum(step[tok] for step, tok in zip(out.logprobs or (), out.token_ids))
        if log_alpha[i] + ll > best_score:
            best, best_score = i, log_alpha[i] + ll
    return best
