"""The Engine's serving side: prefix cache, scheduler requests per mode, cache warming.

Document prefixes: a prompt's cacheable part is what it shares with the same prompt for
another question (``PROBE``) — the system prompt, the documents and the template up to the
question — so the cache keeps documents, never questions. Exact by construction: the key is
the token ids themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from rag_engine import modes, prompts
from rag_engine.generator import SamplingParams
from rag_engine.generator.kv_cache import KVCache
from rag_engine.generator.prefix_cache import (
    PrefixCache,
    PrefixCacheConfig,
    prefill_rows,
    shared_prefix_len,
)
from rag_engine.scheduler import (
    Request,
    RequestHandle,
    Scheduler,
    SchedulerConfig,
    mixed_seq,
    single_seq,
)

PROBE, PROBE2 = "\x00", "\x01"  # questions no tokenizer merges with the template text before them


def make_prefix_cache(eng) -> PrefixCache:
    cfg = eng.config
    key = f"{eng.generator.session.folder.name}"  # the export folder: model content hash + precision
    return PrefixCache(key, PrefixCacheConfig(cfg.prefix_cache_bytes, cfg.prefix_block_tokens))


def make_scheduler(eng) -> Scheduler:
    cfg = eng.config
    sched = SchedulerConfig(max_batch_rows=cfg.max_batch_rows, max_batch_tokens=cfg.max_batch_tokens,
                            max_waiting=cfg.max_waiting, max_prefill_tokens=cfg.max_prefill_tokens)
    return Scheduler(eng.generator.session, sched, eng.prefix_cache, eng.generator_lock)


def cacheable_len(eng, ids: np.ndarray, probe_messages: list[dict]) -> int:
    """Leading ids of ``ids`` that do not depend on the question (0 when the cache is off)."""
    if eng.prefix_cache is None:
        return 0
    return shared_prefix_len(ids, eng.generator.encode(probe_messages))


def rag_doc_prompts(eng, question: str, docs: Sequence, k: int) -> tuple[list[np.ndarray], list[int]]:
    """rag_token/rag_sequence rows: per slot i < k, ids of (document i, question) and its cacheable length.

    Slots beyond ``len(docs)`` hold the bare question (their α is 0)."""
    system, ids, cacheable = eng.config.system_prompt, [], []
    for i in range(k):
        passages = [docs[i].text] if i < len(docs) else []
        p = eng.generator.encode(prompts.concat_messages(question, passages, system))
        ids.append(p)
        cacheable.append(cacheable_len(eng, p, prompts.concat_messages(PROBE, passages, system)))
    return ids, cacheable


def build_request(eng, query: str, params: SamplingParams, k: int, mode: str, retriever: str | None,
                  where: dict | None, handle: RequestHandle, messages: list[dict] | None = None) -> Request:
    """Retrieve for ``query`` and turn it into scheduler sequences for ``mode``.

    ``messages``: with k = 0, the chat to answer as is (no retrieval, no RAG template)."""
    from rag_engine.engine_generate import _concat_messages, _ordered

    gen, metrics = eng.generator, {}
    t0 = time.perf_counter()
    docs = eng._context([query], k, retriever, where, metrics)[0] if k else []
    handle.documents = _ordered(docs)

    def row(prompt: np.ndarray, p: SamplingParams = params):
        r = modes.make_row(gen, prompt, p)
        r.t_start = t0
        return r

    if mode == "concat" or not docs:
        msgs = messages if messages is not None and not docs else _concat_messages(eng, query, docs)
        ids = gen.encode(msgs)
        probe = _concat_messages(eng, PROBE, docs) if messages is None or docs else None
        seq = single_seq(row(ids), cacheable_len(eng, ids, probe) if probe else 0)
        return Request([seq], handle, lambda req: output_of_row(req.seqs[0].row, _ordered(docs), metrics))
    # One row per retrieved passage (as Engine.generate), not per requested k: slots with no
    # passage would decode rows of weight 0.
    ids, cacheable = rag_doc_prompts(eng, query, docs, len(docs))
    la = modes.log_alphas(docs, len(docs))
    if mode == "rag_token":
        seq = mixed_seq(ids, la, row(np.concatenate(ids)), cacheable)  # penalties see the document prompts
        n = sum(len(x) for x in ids)
        return Request([seq], handle, lambda req: output_of_row(req.seqs[0].row, _ordered(docs), metrics, n))
    if mode != "rag_sequence":
        raise ValueError(f"mode {mode!r} cannot be served; use 'concat', 'rag_token' or 'rag_sequence'")
    p = params if params.logprobs is not None else dataclasses.replace(params, logprobs=0)
    seqs = [single_seq(row(x, p), c) for x, c in zip(ids, cacheable)]

    def choose(req: Request):
        outs = [output_of_row(s.row, (), {}) for s in req.seqs]
        best = modes.choose_sequence([_as_generation(s.row) for s in req.seqs], la)
        ordered = _ordered(docs)  # the choice is an index into the documents returned
        return dataclasses.replace(outs[best], documents=ordered, metrics=outs[best].metrics | metrics
                                   | {"rag_sequence_choice": ordered.index(docs[best])})

    return Request(seqs, handle, choose, stream=False)


def _as_generation(row):
    """The fields of a row that ``modes.choose_sequence`` reads."""
    return dataclasses.make_dataclass("RowOutput", ["token_ids", "logprobs"])(tuple(row.tokens), row.logprobs)


def _checked(eng, query, params, k, mode):
    from rag_engine.engine import DEFAULT_PARAMS, MODES, _check_k, _query_list

    _query_list(query)  # a non-empty question (the same check as Engine.generate)
    mode = mode or eng.config.mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    k = eng.config.k if k is None else _check_k(k)
    return params or DEFAULT_PARAMS, k, mode


def submit(eng, query: str, params: SamplingParams | None, k: int | None, mode: str | None,
           retriever: str | None, where: dict | None, messages: list[dict] | None = None,
           loop: asyncio.AbstractEventLoop | None = None, fit_max_tokens: bool = False) -> RequestHandle:
    """Retrieve and tokenise in the calling thread, then queue on the scheduler.

    ``fit_max_tokens``: params.max_tokens is a default the caller did not ask for; a prompt too
    long for it gets fewer new tokens instead of an error (as vLLM does)."""
    params, k, mode = _checked(eng, query, params, k, mode)
    handle = RequestHandle(loop)
    request = build_request(eng, query, params, k, mode, retriever, where, handle, messages)
    request.fit_max_tokens = fit_max_tokens
    return eng.scheduler.submit(request)


async def asubmit(eng, query: str, params: SamplingParams | None, k: int | None, mode: str | None,
                  retriever: str | None, where: dict | None, messages: list[dict] | None = None,
                  fit_max_tokens: bool = False) -> RequestHandle:
    """``submit`` from asyncio: retrieval runs in a worker thread; events arrive on this loop.

    If the caller is cancelled while the worker retrieves, the request it then queues is
    cancelled as soon as it exists (a thread cannot be interrupted; its request had no reader)."""
    loop = asyncio.get_running_loop()
    work = asyncio.ensure_future(asyncio.to_thread(submit, eng, query, params, k, mode, retriever, where,
                                                   messages, loop, fit_max_tokens))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        def drop(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                done.result().cancel()

        work.add_done_callback(drop)
        raise


def warm_prefix_cache(eng, passage_ids: Sequence[int] | None, queries: Sequence[str] | None, top: int,
                      batch: int = 4) -> int:
    """Prefill the rag_token document prefixes of the chosen passages into the prefix cache."""
    cache = eng.prefix_cache
    if cache is None:
        return 0
    if passage_ids is None:
        counts = eng.retrieved
        if queries:
            counts = type(counts)()
            for hits in eng.retrieve(list(queries)):
                counts.update(h.passage_id for h in hits)
        passage_ids = [pid for pid, _ in counts.most_common(top)]
    texts = [eng.index.passage(int(pid)).text for pid in passage_ids]  # KeyError names a dead id
    gen, spec, system = eng.generator, eng.generator.session.spec, eng.config.system_prompt
    with eng.generator_lock:
        for start in range(0, len(texts), batch):
            chunk = [gen.encode(prompts.concat_messages(PROBE, [t], system)) for t in texts[start:start + batch]]
            kv = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(chunk), max(len(c) for c in chunk))
            # the probe prompt's doc part is its cacheable part: all but the probe and what follows
            lengths = [shared_prefix_len(c, gen.encode(prompts.concat_messages(PROBE2, [t], system)))
                       for c, t in zip(chunk, texts[start:start + batch])]
            prefill_rows(gen.session, kv, 0, chunk, cache, lengths)
    return len(texts)


def output_of_row(row, docs: Sequence, metrics: dict, prompt_tokens: int | None = None):
    """RagOutput of a finished scheduler row (timings from its submission)."""
    from rag_engine.engine import RagOutput

    dt = max(row.t_done - row.t_first, 1e-9)
    n = len(row.tokens)
    m = dict(metrics, ttft_ms=1e3 * (row.t_first - row.t_start), prefill_ms=1e3 * (row.t_first - row.t_start),
             decode_ms=1e3 * dt, decode_tokens_per_s=(n - 1) / dt if n > 1 else 0.0,
             tpot_ms=1e3 * dt / (n - 1) if n > 1 else 0.0,
             prompt_tokens=len(row.prompt) if prompt_tokens is None else prompt_tokens, completion_tokens=n)
    return RagOutput(row.text, tuple(docs), tuple(row.tokens), row.finish_reason or "length", m)
