"""Document-KV prefix cache: the KV of prompt prefixes already prefilled, reused exactly.

Keys follow vLLM's automatic prefix caching: a prompt is cut into blocks of ``block_tokens``
ids from position 0 and each block is keyed by (its parent block, its exact ids), so a key
covers every id and position before it; the model and precision are the cache's own
``model_key`` (one cache per exported decoder). A prefix's last partial block is kept too
(a "tail"), so a whole document prefix is reused, not only its full blocks.

Each block holds ``[layers, 2, kv_heads, n, head_dim]`` fp32 copied out of the KVCache. Reuse
copies the blocks back into a row and prefills only the rest of the prompt on top of them
(one session call per such row); uncached rows are prefilled together (``plan_runs``).
Bounded by bytes with LRU eviction; evicting a block evicts its descendants, and lookups touch
a chain from its leaf up, so leaves go first (as vLLM frees blocks in reverse order).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rag_engine.generator.kv_cache import KVCache
from rag_engine.generator.loop import prefill
from rag_engine.generator.session import DecoderSession

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixCacheConfig:
    """``max_bytes``: bound on the KV held (0 turns the cache off); ``block_tokens``: ids per block."""

    max_bytes: int = 512 << 20
    block_tokens: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"PrefixCacheConfig: max_bytes must be an int >= 0, got {self.max_bytes!r}")
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) or self.block_tokens < 1:
            raise ValueError(f"PrefixCacheConfig: block_tokens must be an int >= 1, got {self.block_tokens!r}")


@dataclass
class _Block:
    id: int
    parent: int
    kv: np.ndarray  # [layers, 2, kv_heads, n, head_dim]
    children: set = field(default_factory=set)  # keys of child blocks


class PrefixCache:
    """LRU map from token-id prefixes to their KV, bounded by ``config.max_bytes``. Thread-safe."""

    def __init__(self, model_key: str, config: PrefixCacheConfig | None = None) -> None:
        self.model_key = model_key
        self.config = config or PrefixCacheConfig()
        self._blocks: OrderedDict[tuple[int, bytes], _Block] = OrderedDict()  # LRU first
        self._ids = itertools.count(1)  # 0 is the root; ids are never reused
        self._key_of: dict[int, tuple[int, bytes]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self.hit_tokens = self.lookup_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def stats(self) -> dict[str, int]:
        return dict(prefix_cache_hits=self.hits, prefix_cache_misses=self.misses,
                    prefix_cache_evictions=self.evictions, prefix_cache_hit_tokens=self.hit_tokens,
                    prefix_cache_lookup_tokens=self.lookup_tokens, prefix_cache_bytes=self.nbytes,
                    prefix_cache_blocks=len(self._blocks))

    def match(self, ids: np.ndarray, limit: int | None = None) -> list[np.ndarray]:
        """KV blocks of the longest cached prefix of ``ids`` (at most ``limit`` ids), in order."""
        ids = np.asarray(ids, np.int64)  # keys are the ids' bytes: one dtype for all
        n = len(ids) if limit is None else min(limit, len(ids))
        bt, out, keys, parent, pos = self.config.block_tokens, [], [], 0, 0
        with self._lock:
            while pos < n:
                block = None
                for size in (bt, *range(min(bt - 1, n - pos), 0, -1)):  # a full block, else a tail
                    if pos + size <= n:
                        key = (parent, ids[pos:pos + size].tobytes())
                        block = self._blocks.get(key)
                        if block is not None:
                            break
                if block is None:
                    break
                out.append(block.kv)
                keys.append(key)
                parent, pos = block.id, pos + block.kv.shape[3]
                if block.kv.shape[3] < bt:
                    break  # a tail ends its chain
            for key in reversed(keys):  # leaf first: the chain's root ends most recent
                self._blocks.move_to_end(key)
            self.lookup_tokens += n
            self.hit_tokens += pos
            if pos:
                self.hits += 1
            else:
                self.misses += 1
        return out

    def insert(self, ids: np.ndarray, kv: np.ndarray, length: int) -> None:
        """Store the KV of ``ids[:length]``; ``kv`` ``[layers, 2, kv_heads, >= length, head_dim]``."""
        if length > len(ids) or length > kv.shape[3]:
            raise ValueError(f"insert: length {length} exceeds the ids ({len(ids)}) or KV ({kv.shape[3]}) given")
        if self.config.max_bytes == 0 or length == 0:
            return
        ids = np.asarray(ids, np.int64)
        bt, parent, keys = self.config.block_tokens, 0, []
        with self._lock:
            for pos in range(0, length, bt):
                end = min(pos + bt, length)
                key = (parent, ids[pos:end].tobytes())
                block = self._blocks.get(key)
                if block is None:
                    # a copy: ascontiguousarray returns the slice itself when it is contiguous
                    # (a one-row cache), and the row's next prompt would overwrite the block
                    block = _Block(next(self._ids), parent, np.array(kv[:, :, :, pos:end], np.float32, order="C"))
                    self._blocks[key] = block
                    self._key_of[block.id] = key
                    self.nbytes += block.kv.nbytes
                    if keys:
                        self._blocks[keys[-1]].children.add(key)
                keys.append(key)
                parent = block.id
            for key in reversed(keys):
                self._blocks.move_to_end(key)
            self._evict()

    def _evict(self) -> None:
        while self.nbytes > self.config.max_bytes and self._blocks:
            self._drop(next(iter(self._blocks)))

    def _drop(self, key) -> None:
        block = self._blocks.pop(key, None)
        if block is None:
            return
        self.nbytes -= block.kv.nbytes
        self.evictions += 1
        del self._key_of[block.id]
        parent = self._blocks.get(self._key_of.get(block.parent))
        if parent is not None:
            parent.children.discard(key)
        for child in list(block.children):
            self._drop(child)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._key_of.clear()
            self.nbytes = 0


def shared_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Number of leading ids ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def load_prefix(cache: KVCache, row: int, blocks: Sequence[np.ndarray]) -> int:
    """Copy ``blocks`` into positions ``[0, n)`` of buffer row ``row``; returns n."""
    pos = 0
    for kv in blocks:
        n = kv.shape[3]
        cache.buffer[:, :, row, :, pos:pos + n] = kv
        pos += n
    return pos


# Consecutive uncached prompts share one right-padded prefill call while the padded work
# (rows x longest prompt) stays within this factor (plus a few ids) of their real ids.
PAD_WASTE_FACTOR = 1.1
PAD_WASTE_SLACK = 16
# ONNX Runtime's CPU GroupQueryAttention allocates its attention scores for a prompt as
# [rows, heads, new ids, cache length] fp32; past a few hundred MB a call slows down by up
# to 1.8x (measured: 8 rows x 330 ids on a 4096-long cache), so calls are kept under this.
SCORES_BUDGET_BYTES = 192 << 20


def plan_runs(lengths: Sequence[int], cached: Sequence[int], max_padded: int | None = None) -> list[tuple[int, int]]:
    """Split rows into prefill calls ``[(first, stop), ...]`` of consecutive rows.

    Rows with a cached prefix (``cached[b] > 0``) run alone: ONNX Runtime's CPU
    GroupQueryAttention takes several new tokens on top of a past for one row at a time.
    Uncached rows are right-padded together while the padding stays within PAD_WASTE_FACTOR
    and rows x longest prompt within ``max_padded`` ids (None: no bound).
    """
    runs: list[tuple[int, int]] = []
    first, useful, longest = 0, 0, 0
    for b, (n, c) in enumerate(zip(lengths, cached, strict=True)):
        padded = (b - first + 1) * max(longest, n)
        joins = (b > first and c == 0 and cached[first] == 0
                 and padded <= PAD_WASTE_FACTOR * (useful + n) + PAD_WASTE_SLACK
                 and (max_padded is None or padded <= max_padded))
        if joins:
            useful, longest = useful + n, max(longest, n)
            continue
        if b > first:
            runs.append((first, b))
        first, useful, longest = b, n, n
    if len(lengths):
        runs.append((first, len(lengths)))
    return runs


def prefill_rows(session: DecoderSession, cache: KVCache, start: int, prompts: Sequence[np.ndarray],
                 prefix_cache: PrefixCache | None = None, cacheable: Sequence[int] | None = None,
                 chunk_tokens: int | None = None, between: Callable[[], None] | None = None) -> np.ndarray:
    """Prefill ``prompts`` into buffer rows ``[start, start + len(prompts))``; logits ``[B, V]`` (a copy).

    With a ``prefix_cache``, row b reuses the longest cached prefix of ``prompts[b]`` and then
    stores its first ``cacheable[b]`` ids (default: none). Rows go through the session in the
    calls ``plan_runs`` chooses. Chunked prefill: when ``chunk_tokens`` is given and more ids
    than that must be computed, each row is prefilled in pieces of at most ``chunk_tokens`` ids
    and ``between()`` runs after each ``chunk_tokens`` ids (the scheduler decodes its running
    rows there, so a long prompt does not stall them). Outputs equal a cold prefill's.
    """
    count = len(prompts)
    cacheable = [0] * count if cacheable is None else list(cacheable)
    if len(cacheable) != count:
        raise ValueError(f"expected one cacheable length per prompt ({count}), got {len(cacheable)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    # at least the last id is always run: its logits start the generation
    blocks = [prefix_cache.match(p, len(p) - 1) if prefix_cache is not None else [] for p in prompts]
    cached = [load_prefix(cache, start + b, blocks[b]) if blocks[b] else 0 for b in range(count)]
    todo = sum(len(p) - c for p, c in zip(prompts, cached, strict=True))
    if chunk_tokens is not None and todo > chunk_tokens:
        logits = _prefill_chunked(session, cache, start, prompts, cached, chunk_tokens, between)
    else:
        max_padded = SCORES_BUDGET_BYTES // (4 * session.spec.num_heads * cache.max_len)
        logits = _prefill_runs(session, cache, start, prompts, cached, max(max_padded, 1))
    if prefix_cache is not None:
        for b, prompt in enumerate(prompts):
            if cacheable[b] > 0:
                prefix_cache.insert(prompt, cache.buffer[:, :, start + b], min(cacheable[b], len(prompt)))
    return logits


def _prefill_runs(session: DecoderSession, cache: KVCache, start: int, prompts: Sequence[np.ndarray],
                  cached: list[int], max_padded: int) -> np.ndarray:
    count = len(prompts)
    runs = plan_runs([len(p) for p in prompts], cached, max_padded)
    if len(runs) == 1 and not cached[0]:
        whole = start == 0 and count == cache.batch  # the cache itself: no rebinding before decode
        return prefill(session, cache if whole else cache.rows(start, start + count), prompts).copy()
    logits = np.empty((count, session.spec.vocab_size), np.float32)
    for first, stop in runs:
        rows = cache.rows(start + first, start + stop)
        if not cached[first]:
            logits[first:stop] = prefill(session, rows, prompts[first:stop])
            continue
        logits[first] = _run_piece(session, rows, prompts[first], cached[first], len(prompts[first]))
    return logits


def _run_piece(session: DecoderSession, row: KVCache, prompt: np.ndarray, pos: int, end: int) -> np.ndarray:
    """Ids ``[pos, end)`` of one row on top of its ``pos`` cached positions; logits ``[V]`` of id end - 1."""
    ids = np.ascontiguousarray(prompt[pos:end], np.int64)[None]
    mask = np.ones((1, end), np.int64)
    positions = np.arange(pos, end, dtype=np.int64)[None]
    return session.run(ids, mask, positions, row)[0]


def _prefill_chunked(session: DecoderSession, cache: KVCache, start: int, prompts: Sequence[np.ndarray],
                     cached: list[int], chunk_tokens: int, between: Callable[[], None] | None) -> np.ndarray:
    logits = np.empty((len(prompts), session.spec.vocab_size), np.float32)
    spent = 0
    for b, prompt in enumerate(prompts):
        row, pos, n = cache.rows(start + b, start + b + 1), cached[b], len(prompt)
        while pos < n:
            end = min(n, pos + chunk_tokens - spent)
            logits[b] = _run_piece(session, row, prompt, pos, end)
            spent += end - pos
            pos = end
            if spent >= chunk_tokens:
                spent = 0
                if between is not None and (pos < n or b + 1 < len(prompts)):
                    between()
    return logits
