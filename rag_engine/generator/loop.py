"""The decode loop: ``prefill``, ``decode_one_token`` and ``run_batch`` (one function per phase).

Rows of a batch are right-padded at prefill and each keeps its own length: the cache slot of
row b's next token is ``lengths[b]``, its position id too, and its mask is ``lengths[b] + 1``
ones. When rows finish they are dropped from the cache and the sampler (the batch is compacted),
so finished rows stop costing compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rag_engine.generator.detokenize import IncrementalDetokenizer
from rag_engine.generator.kv_cache import KVCache
from rag_engine.generator.sampling import Sampler, SamplingParams, top_logprobs
from rag_engine.generator.session import DecoderSession


def prefill(session: DecoderSession, cache: KVCache, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """Run the prompts (int64 ids, ragged) through the model into ``cache``; logits ``[B, V]``."""
    lengths = np.array([len(p) for p in prompts], np.int64)
    width = int(lengths.max())
    ids = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    positions = np.ascontiguousarray(np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape))
    return session.run(ids, mask, positions, cache)


def decode_one_token(session: DecoderSession, cache: KVCache, tokens: np.ndarray,
                     lengths: np.ndarray) -> np.ndarray:
    """Feed one token per row; ``lengths`` ``[B]`` = tokens already cached per row. Logits ``[B, V]``."""
    return session.decode(tokens, lengths, cache)


@dataclass
class Row:
    """One sequence being generated and everything reported about it."""

    prompt: np.ndarray
    params: SamplingParams
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None  # None: decode once at the end (no streaming/stop strings)
    decode: Callable[[list[int]], str] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    text: str = ""
    emitted: int = 0  # characters of ``text`` already streamed
    stopped_by_string: bool = False
    finish_reason: str | None = None
    t_start: float = 0.0
    t_first: float = 0.0
    t_done: float = 0.0

    def append(self, token: int, now: float, context_left: int) -> None:
        """Record a sampled token and decide whether the row is finished.

        ``context_left``: context positions left after this token (prompt + output <= context).
        """
        if not self.tokens:
            self.t_first = now
        self.tokens.append(token)
        p, detok = self.params, self.detokenizer
        if token in self.stop_ids and len(self.tokens) > p.min_tokens:
            self.finish_reason = "stop"  # stop tokens are kept in ids, not in text
        elif detok is not None:
            self._add_text(detok.push(token))
        if self.finish_reason is None and (len(self.tokens) >= p.max_tokens or context_left <= 0):
            self.finish_reason = "length"
        if self.finish_reason is not None:
            self.t_done = now
            if detok is not None:
                self._add_text(detok.flush(), final=True)
            elif self.decode is not None:
                ids = self.tokens[:-1] if self.tokens[-1] in self.stop_ids and self.finish_reason == "stop" else self.tokens
                self.text = self.decode(ids)

    def _add_text(self, delta: str, final: bool = False) -> None:
        if not delta or (self.finish_reason is not None and not final) or self.stopped_by_string:
            return
        old = len(self.text)
        self.text += delta
        if self.params.stop and len(self.tokens) >= self.params.min_tokens:
            # Only occurrences that end in the new text: one that ended before it was there while
            # stop strings were not yet checked (min_tokens) and may have been streamed already.
            hits = [i for s in self.params.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.finish_reason, self.stopped_by_string = "stop", True

    def take_delta(self) -> str:
        """Streamable new text; while unfinished, hold back what could still start a stop string."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta


# Prompts longer than this are prefilled one row at a time in pieces of at most this many ids
# (prefill_rows' chunked path, which cuts at every PREFILL_PIECE ids across rows): the CPU
# GroupQueryAttention computes every query against every key of the call (the causal half
# included), so pieces cut that work by a quarter to a third at 500-700 ids, and the calls
# stay within its scratch budget (measured: 16 RAG prompts of 430-730 ids, int8, prefill 6.1-6.5 s
# in runs of similar lengths vs 4.9-5.5 s in pieces; a single 512-id prompt: the same).
PREFILL_PIECE = 256


def _prefill_sorted(session: DecoderSession, cache: KVCache, prompts: Sequence[np.ndarray]) -> np.ndarray:
    """Prefill prompts sorted by decreasing length into cache rows ``[0, len)``; logits ``[B, V]``."""
    from rag_engine.generator.prefix_cache import prefill_rows  # (prefix_cache imports this module)

    long = sum(len(p) > PREFILL_PIECE for p in prompts)
    if long == 0:  # short prompts: right-padded together in runs of similar lengths
        return prefill_rows(session, cache, 0, prompts)
    logits = prefill_rows(session, cache, 0, prompts[:long], chunk_tokens=PREFILL_PIECE)
    if long == len(prompts):
        return logits
    return np.concatenate([logits, prefill_rows(session, cache, long, prompts[long:])])


def run_batch(session: DecoderSession, rows: Sequence[Row],
              clock: Callable[[], float] = time.perf_counter) -> Iterator[list[tuple[int, str]]]:
    """Generate all ``rows`` together; after each step yield ``[(row index, text delta), ...]``.

    Rows are updated in place (tokens, text, finish_reason, logprobs, timings).
    """
    spec = session.spec
    max_len = min(spec.max_context, max(len(r.prompt) + r.params.max_tokens for r in rows))
    cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, len(rows), max_len)
    # Cache rows in order of decreasing prompt length, so that the prefill can run prompts of
    # similar lengths together (padding and attention scratch bounded, see plan_runs).
    live = np.array(sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt)), np.int64)
    ordered = [rows[i] for i in live.tolist()]
    sampler = Sampler([r.params for r in ordered], [r.prompt for r in ordered], spec.vocab_size,
                      [r.stop_ids for r in ordered])
    lengths = np.array([len(r.prompt) for r in ordered], np.int64)
    logits = _prefill_sorted(session, cache, [r.prompt for r in ordered])
    while True:
        tokens = sampler.sample(logits)
        want = [i for i, r in enumerate(live.tolist()) if rows[r].params.logprobs is not None]
        if want:
            n = max(rows[live[i]].params.logprobs for i in want)
            for i, entry in zip(want, top_logprobs(logits[want], tokens[want], n), strict=True):
                row = rows[live[i]]
                top = sorted(entry.items(), key=lambda kv: -kv[1])[: row.params.logprobs]
                if row.logprobs is None:
                    row.logprobs = []
                row.logprobs.append({int(tokens[i]): entry[int(tokens[i])], **dict(top)})
        now = clock()
        events = []
        for i, r in enumerate(live.tolist()):
            rows[r].append(int(tokens[i]), now, max_len - int(lengths[i]) - 1)
            delta = rows[r].take_delta()
            if delta or rows[r].finish_reason:
                events.append((r, delta))
        yield events
        alive = np.array([rows[r].finish_reason is None for r in live.tolist()])
        if not alive.any():
            return
        if not alive.all():
            keep = np.flatnonzero(alive)
            cache.keep(keep, used=int(lengths.max()))
            sampler.keep(keep)
            live, lengths, tokens = live[keep], lengths[keep], tokens[keep]
        logits = decode_one_token(session, cache, tokens, lengths)
        lengths = lengths + 1
