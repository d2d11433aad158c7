"""Continuous batching: one decode batch that requests join and leave between steps.

A background thread owns the generator session and the KV cache (rows ``[0, n)`` live). Every
step it (1) drops cancelled and finished sequences at once (the cache is compacted), (2) admits
waiting requests while the batch stays within ``max_batch_rows`` rows and ``max_batch_tokens``
positions (prompt + max_tokens of every row), prefilling at most ``max_prefill_tokens`` new
prompt ids (prefix-cache hits cost only their suffix) into the free rows behind the live ones,
and (3) runs one decode step for every live row. Requests come from any thread
(``submit`` -> ``RequestHandle``) or from asyncio (handles created with an event loop).

A ``Seq`` is one token stream: one cache row, or K document rows whose next-token
distributions are mixed by α (rag_token, through ``ops.rag_token_marg``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from rag_engine import ops
from rag_engine.errors import RagEngineError
from rag_engine.generator.kv_cache import KVCache
from rag_engine.generator.loop import Row, decode_one_token
from rag_engine.generator.prefix_cache import PrefixCache, prefill_rows
from rag_engine.generator.sampling import Sampler, top_logprobs
from rag_engine.generator.session import DecoderSession

log = logging.getLogger(__name__)

INITIAL_CACHE_LEN = 512  # positions per row the KV cache starts with (it grows on demand)


class QueueFullError(RagEngineError):
    """The waiting queue is at its bound; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestHandle:
    """Where a request's text deltas and result arrive; from threads, or asyncio with ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._events: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.cancelled = False
        self.on_cancel: Callable[[], None] | None = None
        self.output: object = None
        self.documents: tuple = ()  # what the request retrieved, known before generation starts

    def push(self, delta: str) -> None:
        self._put(("delta", delta))

    def finish(self, output: object) -> None:
        self.output = output
        self._put(("done", output))

    def fail(self, exc: BaseException) -> None:
        self._put(("error", exc))

    def cancel(self) -> None:
        """Stop generating: the request's rows leave the batch at the next step."""
        if self.cancelled:
            return
        self.cancelled = True
        self._put(("done", None))  # wakes a waiting consumer; the result stays None
        if self.on_cancel is not None:
            self.on_cancel()

    def _put(self, event: tuple) -> None:
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            self.cancel()

    def deltas(self, timeout: float | None = None) -> Iterator[str]:
        """Text deltas until the request finishes (blocking); raises the request's error."""
        while True:
            kind, value = self._events.get(timeout=timeout)
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value

    def result(self, timeout: float | None = None) -> object:
        for _ in self.deltas(timeout):
            pass
        return self.output

    async def adeltas(self) -> AsyncIterator[str]:
        """``deltas`` for asyncio; leaving early cancels the request."""
        try:
            while True:
                kind, value = await self._events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                yield value
        finally:
            if self.output is None:
                self.cancel()

    async def aresult(self) -> object:
        async for _ in self.adeltas():
            pass
        return self.output


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_rows: int = 16
    max_batch_tokens: int = 16384
    max_waiting: int = 64
    max_prefill_tokens: int = 512
    max_len: int = 4096  # positions per cache row (capped by the model's context)

    def __post_init__(self) -> None:
        for name in ("max_batch_rows", "max_batch_tokens", "max_waiting", "max_prefill_tokens", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig: {name} must be an int >= 1, got {value!r}")


@dataclass
class Seq:
    """One token stream over ``len(prompts)`` cache rows.

    prompts: int64 ids per row; cacheable: leading ids of each prompt worth keeping in the
    prefix cache; log_alpha ``[K]`` fp32 mixes the rows' distributions (None: a single row).
    """

    prompts: list[np.ndarray]
    row: Row
    cacheable: list[int]
    log_alpha: np.ndarray | None = None
    sampler: Sampler | None = None
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    next_token: int = -1

    @property
    def width(self) -> int:
        return len(self.prompts)

    @property
    def positions(self) -> int:
        return sum(len(p) for p in self.prompts) + self.width * self.row.params.max_tokens


@dataclass
class Request:
    """Sequences answered together; ``finish(request)`` builds the handle's result."""

    seqs: list[Seq]
    handle: RequestHandle
    finish: Callable[[Request], object]
    stream: bool = True  # False: text is delivered by finish() only (e.g. rag_sequence's choice)
    t_submit: float = field(default_factory=time.perf_counter)
    fit_max_tokens: bool = False  # max_tokens was a default: shrink it to the context instead of refusing

    @property
    def positions(self) -> int:
        return sum(s.positions for s in self.seqs)

    @property
    def width(self) -> int:
        return sum(s.width for s in self.seqs)

    @property
    def done(self) -> bool:
        return all(s.row.finish_reason is not None for s in self.seqs)


class Scheduler:
    """Continuous batching over one DecoderSession; ``close()`` stops the thread."""

    def __init__(self, session: DecoderSession, config: SchedulerConfig | None = None,
                 prefix_cache: PrefixCache | None = None, lock: threading.RLock | None = None) -> None:
        self.session, self.config, self.prefix_cache = session, config or SchedulerConfig(), prefix_cache
        spec = session.spec
        self.max_len = min(self.config.max_len, spec.max_context)
        # Rows [0, batch) are live; the rest of the buffer is free. The cache starts short and
        # doubles when a request needs more positions: KV memory follows the longest request
        # seen, not the context limit (each row's positions are spread over layers x heads).
        self.cache = self._new_cache(min(self.max_len, INITIAL_CACHE_LEN))
        self.lock = lock or threading.RLock()  # held while the session runs
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self.counters = dict(requests=0, finished=0, cancelled=0, rejected=0, steps=0,
                             prompt_tokens=0, generated_tokens=0, prefill_calls=0, decode_steps=0,
                             decode_rows=0, prefill_seconds=0.0, decode_seconds=0.0, cache_grows=0,
                             prefill_chunk_breaks=0)
        self._thread = threading.Thread(target=self._loop, name="rag-engine-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def submit(self, request: Request) -> RequestHandle:
        cfg = self.config
        for seq in request.seqs:
            longest = max(len(p) for p in seq.prompts)
            if request.fit_max_tokens and longest < self.max_len:
                fit = min(seq.row.params.max_tokens, self.max_len - longest)
                seq.row.params = dataclasses.replace(seq.row.params, max_tokens=fit,
                                                     min_tokens=min(seq.row.params.min_tokens, fit))
            if longest + seq.row.params.max_tokens > self.max_len:
                raise ValueError(f"prompt ({longest} tokens) + max_tokens ({seq.row.params.max_tokens}) exceeds "
                                 f"the context of {self.max_len} tokens")
        if request.width > cfg.max_batch_rows or request.positions > cfg.max_batch_tokens:
            raise ValueError(f"request needs {request.width} rows and {request.positions} positions; the batch "
                             f"holds at most {cfg.max_batch_rows} rows and {cfg.max_batch_tokens} positions")
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= cfg.max_waiting:
                self.counters["rejected"] += 1
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (bound {cfg.max_waiting})",
                                     retry_after=1.0)
            self._waiting.append(request)
            self.counters["requests"] += 1
            request.handle.on_cancel = self.wake
            self._wake.notify()
        return request.handle

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def stats(self) -> dict[str, float]:
        return dict(self.counters, waiting=len(self._waiting), running=len(self._running),
                    batch_rows=self.cache.batch, cache_positions=self.cache.max_len)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)
        for req in list(self._waiting) + self._running:
            req.handle.fail(RuntimeError("the scheduler was closed"))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
            try:
                with self.lock:
                    self.step()
            except Exception as exc:  # a failing step fails its requests, never the thread
                log.exception("scheduler step failed")
                for req in self._running:
                    req.handle.fail(exc)
                self._running, self.cache.batch = [], 0

    def step(self) -> None:
        """Drop finished/cancelled sequences, admit and prefill newcomers, decode one token."""
        self._drop()
        fresh = self._admit()
        c = self.counters
        if fresh:
            try:
                self._fit(max(len(p) + s.row.params.max_tokens for r in fresh for s in r.seqs for p in s.prompts))
                t0, d0 = time.perf_counter(), c["decode_seconds"]
                self._prefill(fresh)
            except Exception as exc:  # newcomers off the queue but not yet running: _loop cannot see them
                for req in fresh:
                    if req not in self._running:
                        req.handle.fail(exc)
                raise
            # decode steps run between prefill pieces are counted as decode, not prefill
            c["prefill_seconds"] += time.perf_counter() - t0 - (c["decode_seconds"] - d0)
            c["prefill_calls"] += 1
            self._drop()
        if self._running:
            self._timed_decode()
        c["steps"] += 1

    def _new_cache(self, length: int) -> KVCache:
        spec = self.session.spec
        cache = KVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.config.max_batch_rows, length)
        cache.batch = 0
        return cache

    def _fit(self, need: int) -> None:
        """Grow the cache (doubling, up to max_len) to hold ``need`` positions per row, live rows kept."""
        if need <= self.cache.max_len:
            return
        length = self.cache.max_len
        while length < need:
            length *= 2
        grown = self._new_cache(min(length, self.max_len))
        rows = self.cache.batch
        used = _positions_used(self._running)
        if rows and used:
            grown.buffer[:, :, :rows, :, :used] = self.cache.buffer[:, :, :rows, :, :used]
        grown.batch = rows
        self.cache = grown
        self.counters["cache_grows"] += 1

    def _live(self) -> list[Seq]:
        return [s for r in self._running for s in r.seqs if s.row.finish_reason is None]

    def _drop(self) -> None:
        keep_rows, start, running = [], 0, []
        for req in self._running:
            if req.handle.cancelled and not req.done:
                self.counters["cancelled"] += 1
                for s in req.seqs:
                    s.row.finish_reason = s.row.finish_reason or "abort"
            for s in req.seqs:
                if s.sampler is not None:  # holds rows [start, start + width)
                    if s.row.finish_reason is None:
                        keep_rows.extend(range(start, start + s.width))
                    else:
                        s.sampler = None
                    start += s.width
            if req.done:
                if not req.handle.cancelled:
                    self.counters["finished"] += 1
                    out = req.finish(req)
                    if not req.stream:
                        req.handle.push(getattr(out, "text", ""))
                    req.handle.finish(out)
            else:
                running.append(req)
        assert start == self.cache.batch, (start, self.cache.batch)
        if len(keep_rows) < start:
            used = _positions_used(running)
            self.cache.keep(np.array(keep_rows, np.int64), used=used)
            self.cache.batch = len(keep_rows)
        self._running = running

    def _admit(self) -> list[Request]:
        cfg, fresh = self.config, []
        rows = self.cache.batch
        positions = sum(s.positions for s in self._live())
        prefill = 0
        with self._wake:
            while self._waiting:
                req = self._waiting[0]
                if req.handle.cancelled:
                    self._waiting.popleft()
                    self.counters["cancelled"] += 1
                    continue
                ids = sum(len(p) for s in req.seqs for p in s.prompts)
                if (rows + req.width > cfg.max_batch_rows or positions + req.positions > cfg.max_batch_tokens
                        or (fresh and prefill + ids > cfg.max_prefill_tokens)):
                    break
                fresh.append(self._waiting.popleft())
                rows, positions, prefill = rows + req.width, positions + req.positions, prefill + ids
        return fresh

    def _prefill(self, fresh: list[Request]) -> None:
        seqs = [s for r in fresh for s in r.seqs]
        prompts = [p for s in seqs for p in s.prompts]
        start = self.cache.batch
        # Chunked prefill: while running rows wait, a long prefill is cut into pieces of
        # max_prefill_tokens ids with one decode step of the running rows after each.
        between = self._decode_between if self._running else None
        logits = prefill_rows(self.session, self.cache, start, prompts, self.prefix_cache,
                              [c for s in seqs for c in s.cacheable],
                              chunk_tokens=self.config.max_prefill_tokens if between else None, between=between)
        self.cache.batch = start + len(prompts)
        now, row = time.perf_counter(), 0
        for s in seqs:
            s.lengths = np.array([len(p) for p in s.prompts], np.int64)
            s.sampler = Sampler([s.row.params], [s.row.prompt], logits.shape[-1], [s.row.stop_ids])
            s.row.t_start = s.row.t_start or now
            self.counters["prompt_tokens"] += int(s.lengths.sum())
            self._sample(s, logits[row:row + s.width], now)
            row += s.width
        self._running.extend(fresh)
        for r in fresh:
            self._emit(r)

    def _timed_decode(self) -> None:
        t0 = time.perf_counter()
        self.counters["decode_rows"] += self._decode()
        self.counters["decode_seconds"] += time.perf_counter() - t0
        self.counters["decode_steps"] += 1

    def _decode_between(self) -> None:
        """A decode step of the running rows between two pieces of a chunked prefill."""
        self._timed_decode()
        self.counters["prefill_chunk_breaks"] += 1

    def _decode(self) -> int:
        """One decode step for every live row; returns the number of rows.

        Rows that finished since the last drop (possible between prefill chunks) keep their
        slot in the batch but are neither advanced nor sampled."""
        live = [s for r in self._running for s in r.seqs if s.sampler is not None]
        tokens = np.concatenate([np.full(s.width, s.next_token, np.int64) for s in live])
        lengths = np.concatenate([s.lengths for s in live])
        logits = decode_one_token(self.session, self.cache, tokens, lengths)
        now, row = time.perf_counter(), 0
        for s in live:
            if s.row.finish_reason is None:
                s.lengths = s.lengths + 1
                self._sample(s, logits[row:row + s.width], now)
            row += s.width
        for r in self._running:
            self._emit(r)
        return len(tokens)

    def _sample(self, s: Seq, logits: np.ndarray, now: float) -> None:
        """Pick the next token of ``s`` from its rows' logits ``[K, V]`` and record it."""
        if s.log_alpha is not None:
            dist = ops.rag_token_marg(s.log_alpha[None], logits[None])
        else:
            dist = logits
        token = int(s.sampler.sample(dist)[0])
        if s.row.params.logprobs is not None:
            entry = top_logprobs(dist, np.array([token]), s.row.params.logprobs)[0]
            s.row.logprobs = (s.row.logprobs or []) + [{token: entry[token], **entry}]
        s.row.append(token, now, self.max_len - int(s.lengths.max()) - 1)
        s.next_token = token
        self.counters["generated_tokens"] += 1

    def _emit(self, req: Request) -> None:
        if not req.stream or req.handle.cancelled:
            return
        for s in req.seqs:
            delta = s.row.take_delta()
            if delta:
                req.handle.push(delta)


def _positions_used(requests: Sequence[Request]) -> int:
    """Cache positions holding KV in the rows of ``requests`` (the longest row)."""
    return max((int(s.lengths.max()) for r in requests for s in r.seqs if s.sampler is not None), default=0)


def single_seq(row: Row, cacheable: int = 0) -> Seq:
    return Seq([row.prompt], row, [cacheable])


def mixed_seq(prompts: Sequence[np.ndarray], log_alpha: np.ndarray, row: Row, cacheable: Sequence[int]) -> Seq:
    return Seq(list(prompts), row, list(cacheable), np.ascontiguousarray(log_alpha, np.float32))
