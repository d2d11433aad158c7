"""Engine: encoder -> index (ops.topk_ip / BM25) -> fusion (ops.fusion_softmax_gather) -> generator."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rag_engine import ops, prompts
from rag_engine.corpus import STORAGE_DTYPES
from rag_engine.errors import IndexFormatError
from rag_engine.generator import GenerationOutput, Generator, SamplingParams
from rag_engine.retrieval import hybrid
from rag_engine.retrieval.chunking import ChunkConfig, chunk_spans
from rag_engine.retrieval.encoder import Encoder, EncoderConfig
from rag_engine.retrieval.index import DENSE_BACKENDS, Hit, PassageIndex
from rag_engine.retrieval.persist import open_version

log = logging.getLogger(__name__)

MODES = ("concat", "rag_token", "rag_sequence", "latent", "latent_concat")
RETRIEVERS = ("dense", "bm25", "hybrid")
ENGINE_FILE = "engine.json"
FUSION_FILE = "fusion_w_a.npy"
# Greedy; a frequency penalty (output tokens only) stops small models from looping without
# penalising words copied from the context, as repetition_penalty would.
DEFAULT_PARAMS = SamplingParams(max_tokens=128, temperature=0.0, frequency_penalty=0.5)


@dataclass(frozen=True)
class EngineConfig:
    """Every knob of the Engine, with working defaults."""

    encoder: str = "default"
    encoder_precision: str = "fp32"
    generator: str = "default"
    generator_precision: str = "fp32"
    generator_int8_method: str = "nbits"  # or "dynamic" (faster, less faithful: see README)
    # rag_engine's own ONNX Runtime ops in the generator (None: where the CPU has AVX-512 VNNI;
    # False: ONNX Runtime's ops only). See ExportConfig.custom_ops.
    generator_custom_ops: bool | None = None
    index_dtype: str = "fp32"
    # Measured on benchmarks/eval_qa.py: 256-token passages beat 128 in recall@1 (0.62 vs 0.54,
    # hybrid) and answer accuracy (0.27 vs 0.22, SmolLM2-135M, top-1 passage in the prompt).
    passage_tokens: int = 256
    overlap_tokens: int = 64
    k: int = 4
    mode: str = "concat"
    retriever: str = "hybrid"
    # Dense search: "topk_ip" (exact fused kernel) or faiss "faiss_flat" / "faiss_hnsw" / "faiss_ivf".
    dense_backend: str = "topk_ip"
    hybrid_fusion: str = "weighted"
    hybrid_dense_weight: float = 0.7
    max_passages_per_doc: int = 1  # diversity: passages of one document in a top-k (0 = no limit)
    # Prompt budget for passages in concat mode: about one passage, the best setting for the
    # default 135M generator (more passages lowered its accuracy); raise it for larger models.
    context_tokens: int = 320
    system_prompt: str = prompts.SYSTEM_PROMPT
    threads: int | None = None
    cache_dir: str | None = None
    prefix_cache_bytes: int = 512 << 20  # document-KV prefix cache bound (0 = off)
    prefix_block_tokens: int = 16
    max_batch_rows: int = 16  # continuous batching: rows decoded together
    max_batch_tokens: int = 16384  # ... and their prompt + max_tokens positions
    max_waiting: int = 64  # requests queued beyond the running batch (then QueueFullError)
    max_prefill_tokens: int = 512  # prompt ids prefilled per scheduler step (bounds decode stalls)

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("retriever", self.retriever, RETRIEVERS),
                                     ("dense_backend", self.dense_backend, DENSE_BACKENDS),
                                     ("index_dtype", self.index_dtype, STORAGE_DTYPES),
                                     ("hybrid_fusion", self.hybrid_fusion, hybrid.FUSIONS)):
            if value not in allowed:
                raise ValueError(f"EngineConfig: {name} must be one of {allowed}, got {value!r}")
        if self.k < 0:
            raise ValueError(f"EngineConfig: k must be >= 0, got {self.k}")
        if self.generator_custom_ops is not None and type(self.generator_custom_ops) is not bool:
            raise ValueError(f"EngineConfig: generator_custom_ops must be a bool or None, got {self.generator_custom_ops!r}")
        ChunkConfig(self.passage_tokens, self.overlap_tokens)  # validates


@dataclass(frozen=True)
class Document:
    doc_id: str
    passage_id: int
    text: str
    score: float
    alpha: float
    metadata: dict[str, Any] = field(default_factory=dict)
    in_prompt: bool = True  # False: retrieved but pruned from a concat prompt by the token budget


@dataclass(frozen=True)
class RagOutput:
    text: str
    documents: tuple[Document, ...]
    token_ids: tuple[int, ...]
    finish_reason: str
    metrics: dict[str, float]

    @property
    def alphas(self) -> tuple[float, ...]:
        return tuple(d.alpha for d in self.documents)


class Engine:
    """Retrieval-augmented generation over an index of passages."""

    def __init__(self, config: EngineConfig, encoder: Encoder, generator: Generator | None,
                 index: PassageIndex, w_a: np.ndarray | None = None) -> None:
        self.config, self.encoder, self._generator, self.index = config, encoder, generator, index
        self.w_a = w_a  # bilinear fusion matrix [D, D]; None = identity (the RAG posterior)
        self.latent = None  # rag_engine.latent.LatentWeights (P, gate) for mode="latent"; see rag_engine.train
        self.latent_generator = None  # SoftPromptGenerator (inputs_embeds export), built on first latent use
        self._prefix_cache = self._scheduler = None
        self.generator_lock = threading.RLock()  # one thread at a time runs the generator session
        # Searches and index changes exclude each other (serving retrieves in worker threads while
        # a caller may add or delete documents); encoding runs outside it.
        self.index_lock = threading.RLock()
        self.retrieved: Counter[int] = Counter()  # passage id -> times retrieved (prefix-cache warming)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name: str = "default", config: EngineConfig | None = None,
                        load_generator: bool = True, **overrides: Any) -> Engine:
        """"default": all-MiniLM-L6-v2 + SmolLM2-135M-Instruct, empty index. Overrides set config fields;
        `generator=` may be any Hugging Face causal-LM folder."""
        if name != "default":
            overrides.setdefault("generator", name)
        config = dataclasses.replace(config or EngineConfig(), **overrides)
        encoder = Encoder.from_pretrained(EncoderConfig(config.encoder, config.encoder_precision,
                                                        threads=config.threads), config.cache_dir)
        index = PassageIndex(encoder.name, encoder.dim, config.index_dtype)
        return cls(config, encoder, cls._load_generator(config) if load_generator else None, index)

    @staticmethod
    def _load_generator(config: EngineConfig) -> Generator:
        return Generator.from_pretrained(config.generator, precision=config.generator_precision,
                                         threads=config.threads, cache_dir=config.cache_dir,
                                         int8_method=config.generator_int8_method,
                                         custom_ops=config.generator_custom_ops)

    @property
    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = self._load_generator(self.config)
        return self._generator

    @property
    def prefix_cache(self):
        """The document-KV PrefixCache of the generator (None when prefix_cache_bytes is 0)."""
        from rag_engine.engine_serve import make_prefix_cache

        if self._prefix_cache is None and self.config.prefix_cache_bytes > 0:
            self._prefix_cache = make_prefix_cache(self)
        return self._prefix_cache

    @property
    def scheduler(self):
        """The continuous-batching Scheduler (started on first use; ``close()`` stops it)."""
        from rag_engine.engine_serve import make_scheduler

        if self._scheduler is None:
            self._scheduler = make_scheduler(self)
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            self._scheduler = None

    def stats(self) -> dict[str, float]:
        """Counters: prefix-cache hits/misses/evictions/bytes and the scheduler's queue and batch."""
        out = dict(self._prefix_cache.stats()) if self._prefix_cache is not None else {}
        return out | (self._scheduler.stats() if self._scheduler is not None else {})

    def warm_prefix_cache(self, passage_ids=None, queries=None, top: int = 64) -> int:
        """Prefill the document prefixes of ``passage_ids``, else of the ``top`` passages most
        retrieved for ``queries``, else most retrieved so far. Returns the number warmed."""
        from rag_engine.engine_serve import warm_prefix_cache

        return warm_prefix_cache(self, passage_ids, queries, top)

    def submit(self, query: str, params: SamplingParams | None = None, k: int | None = None,
               mode: str | None = None, retriever: str | None = None, where: dict[str, Any] | None = None):
        """Queue one query on the scheduler; returns a RequestHandle (``.result()``, ``.deltas()``)."""
        from rag_engine.engine_serve import submit

        return submit(self, query, params, k, mode, retriever, where)

    async def agenerate(self, query: str, params: SamplingParams | None = None, k: int | None = None,
                        mode: str | None = None, retriever: str | None = None,
                        where: dict[str, Any] | None = None) -> RagOutput:
        """``generate`` for one query from asyncio, continuously batched with other requests."""
        from rag_engine.engine_serve import asubmit

        handle = await asubmit(self, query, params, k, mode, retriever, where)
        return await handle.aresult()

    async def astream(self, query: str, params: SamplingParams | None = None, k: int | None = None,
                      mode: str | None = None, retriever: str | None = None,
                      where: dict[str, Any] | None = None) -> AsyncIterator[str]:
        """Text deltas of one answer from asyncio; leaving the loop early cancels the request."""
        from rag_engine.engine_serve import asubmit

        handle = await asubmit(self, query, params, k, mode, retriever, where)
        async for delta in handle.adeltas():
            yield delta

    def save(self, path: str | Path) -> None:
        """Index, config and fusion weights, written atomically together."""
        extra = {ENGINE_FILE: json.dumps(dataclasses.asdict(self.config), indent=1).encode()}
        if self.w_a is not None:
            extra[FUSION_FILE] = self.w_a
        if self.latent is not None:
            extra |= self.latent.files()
        with self.index_lock:
            self.index.save(path, extra=extra)
            self.retrieved.clear()  # saving renumbers the passages

    @classmethod
    def load(cls, path: str | Path, load_generator: bool = True, verify: bool = True, **overrides: Any) -> Engine:
        version, manifest = open_version(Path(path), verify=verify)
        try:
            saved = json.loads((version / ENGINE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{path}: missing or unreadable {ENGINE_FILE} ({exc})") from exc
        if not isinstance(saved, dict):
            raise IndexFormatError(f"{path}: {ENGINE_FILE} must hold a JSON object, got {type(saved).__name__}")
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        saved = {k: v for k, v in saved.items() if k in fields}
        try:
            EngineConfig(**saved)
        except (TypeError, ValueError) as exc:
            raise IndexFormatError(f"{path}: {ENGINE_FILE} holds an invalid config ({exc})") from exc
        config = EngineConfig(**(saved | overrides))  # a bad override is the caller's ValueError
        encoder = Encoder.from_pretrained(EncoderConfig(config.encoder, config.encoder_precision,
                                                        threads=config.threads), config.cache_dir)
        index = PassageIndex.load(path, encoder_name=encoder.name, opened=(version, manifest))
        if index.dim != encoder.dim:
            raise IndexFormatError(f"{path}: index dim {index.dim}, encoder dim {encoder.dim}")
        w_a = np.load(version / FUSION_FILE) if (version / FUSION_FILE).exists() else None
        if w_a is not None and w_a.shape != (encoder.dim, encoder.dim):
            raise IndexFormatError(f"{path}: fusion W_a has shape {w_a.shape}, expected "
                                   f"({encoder.dim}, {encoder.dim})")
        eng = cls(config, encoder, cls._load_generator(config) if load_generator else None, index, w_a)
        from rag_engine.latent import load_latent

        eng.latent = load_latent(eng, version)  # checked against the encoder (and a loaded generator)
        return eng

    # ------------------------------------------------------------------ documents
    def add_documents(self, texts: Sequence[str], ids: Sequence[str] | None = None,
                      metadata: Sequence[dict[str, Any]] | None = None, progress: bool = True) -> list[str]:
        """Chunk, encode and index documents; an existing id is replaced (a text with nothing
        to index removes the document of that id). Returns the ids of the documents indexed.

        Without ``ids``, documents get the next free integers as ids (never a live id)."""
        texts = list(texts)
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"add_documents: got {len(ids)} ids for {len(texts)} texts")
        if metadata is not None and len(metadata) != len(texts):
            raise ValueError(f"add_documents: got {len(metadata)} metadata dicts for {len(texts)} texts")
        if ids is None:
            with self.index_lock:
                start = self.index.reserve_numeric_ids(len(texts))
            ids = [str(start + j) for j in range(len(texts))]
        else:
            ids = [str(i) for i in ids]
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise ValueError(f"add_documents: id {dup!r} appears more than once in one call")
        replaced = any(i in self.index for i in ids)
        chunk_cfg = ChunkConfig(self.config.passage_tokens, self.config.overlap_tokens)
        # A passage must fit the encoder with its special tokens, or its end is never embedded.
        tok = self.encoder.tokenizer
        specials = tok.num_special_tokens_to_add() if hasattr(tok, "num_special_tokens_to_add") else 2
        max_tokens = self.encoder.config.max_length - specials
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"add_documents: texts[{j}] must be str, got {type(t).__name__}")
        chunks = []  # (doc index, spans, passages)
        for j in tqdm(range(len(texts)), desc="chunk documents", disable=not progress):
            spans = chunk_spans(texts[j], self.encoder.tokenizer, chunk_cfg, max_tokens=max_tokens)
            if not spans:
                log.warning("document %r has no text; not indexed", ids[j])
                continue
            chunks.append((j, spans, [texts[j][a:b] for a, b in spans]))
        # One batched encoder pass over every passage (length-sorted batches).
        vecs = self.encoder.encode([p for _, _, ps in chunks for p in ps], progress=progress)
        row = 0
        with self.index_lock:
            for j, spans, passages in chunks:
                self.index.add(ids[j], spans, passages, vecs[row : row + len(passages)],
                               metadata[j] if metadata else None)
                row += len(passages)
            indexed = {ids[j] for j, _, _ in chunks}
            self.index.delete([i for i in ids if i not in indexed])  # their new text has nothing to index
            if replaced:
                self.retrieved.clear()  # passage ids of replaced documents
        return [i for i in ids if i in indexed]

    def delete_documents(self, ids: Sequence[str]) -> int:
        with self.index_lock:
            gone = self.index.delete([str(i) for i in ids])
            if gone:
                self.retrieved.clear()  # passage ids of deleted documents
        return gone

    # ------------------------------------------------------------------ retrieval
    def _retrieve_ids(self, queries: list[str], qvecs: np.ndarray, k: int, retriever: str,
                      where: dict | None) -> tuple[np.ndarray, np.ndarray]:
        if retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}, got {retriever!r}")
        if self.index.dense_backend != self.config.dense_backend:
            self.index.set_dense_backend(self.config.dense_backend)
        per_doc = self.config.max_passages_per_doc
        # Candidates before fusion / collapsing by document.
        depth = k if retriever != "hybrid" and not per_doc else max(4 * k, 40)
        while True:
            if retriever == "dense":
                s, i = self.index.search_dense(qvecs, depth, where, self.config.threads)
            elif retriever == "bm25":
                s, i = self.index.search_bm25(queries, depth, where)
            else:
                s, i = hybrid.fuse(self.index.search_dense(qvecs, depth, where, self.config.threads),
                                   self.index.search_bm25(queries, depth, where), depth,
                                   self.config.hybrid_fusion, self.config.hybrid_dense_weight)
            if depth == k:
                return s, i
            out_s, out_i = self.index.collapse(s, i, k, per_doc)
            # A few long documents can fill every candidate: when a row came out short of k
            # while its candidates ran to the end of the list, look deeper.
            short = ((out_i < 0).any(axis=1) & (i >= 0).all(axis=1)).any()
            if not short or depth >= len(self.index):
                return out_s, out_i
            depth = min(4 * depth, len(self.index))

    def retrieve(self, queries: str | Sequence[str], k: int | None = None, retriever: str | None = None,
                 where: dict[str, Any] | None = None) -> list[list[Hit]]:
        """Per query, up to k hits (doc_id, passage_id, text, score), best first."""
        qs = _query_list(queries)
        k = self.config.k if k is None else _check_k(k)
        if k == 0:
            return [[] for _ in qs]
        qvecs = self.encoder.encode(qs)
        with self.index_lock:
            s, i = self._retrieve_ids(qs, qvecs, k, retriever or self.config.retriever, where)
            return self.index.hits(s, i)

    def _context(self, qs: list[str], k: int, retriever: str | None, where: dict | None, metrics: dict
                 ) -> list[list[Document]]:
        if k == 0:
            return [[] for _ in qs]
        t0 = time.perf_counter()
        qvecs = self.encoder.encode(qs)
        t1 = time.perf_counter()
        with self.index_lock:
            scores, ids = self._retrieve_ids(qs, qvecs, k, retriever or self.config.retriever, where)
            t2 = time.perf_counter()
            if len(self.index) == 0:
                alpha = np.zeros(ids.shape, np.float32)
            else:
                alpha, _ = ops.fusion_softmax_gather(qvecs, self.index.vectors(), ids, self.w_a,
                                                     threads=self.config.threads)
            t3 = time.perf_counter()
            self.retrieved.update(int(i) for i in ids[ids >= 0].tolist())
            all_hits = self.index.hits(scores, ids)
        metrics.update(encode_ms=1e3 * (t1 - t0), retrieve_ms=1e3 * (t2 - t1), fuse_ms=1e3 * (t3 - t2))
        docs = []
        for q, hits in enumerate(all_hits):
            a = alpha[q][ids[q] >= 0]
            docs.append([Document(h.doc_id, h.passage_id, h.text, h.score, float(x), h.metadata)
                         for h, x in zip(hits, a)])
        return docs

    # ------------------------------------------------------------------ generation
    def generate(self, queries: str | Sequence[str], params: SamplingParams | None = None, k: int | None = None,
                 mode: str | None = None, retriever: str | None = None, where: dict[str, Any] | None = None
                 ) -> list[RagOutput]:
        """Answer each query; all stages run batched across the queries."""
        from rag_engine.engine_generate import run_mode

        qs = _query_list(queries)
        mode = mode or self.config.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        k = self.config.k if k is None else _check_k(k)
        params = params or DEFAULT_PARAMS
        metrics: dict[str, float] = {}
        docs = self._context(qs, k, retriever, where, metrics)
        with self.generator_lock:
            return run_mode(self, mode, qs, docs, params, metrics)

    def stream(self, query: str, params: SamplingParams | None = None, k: int | None = None,
               mode: str | None = None, retriever: str | None = None, where: dict[str, Any] | None = None
               ) -> Iterator[str]:
        """Yield text deltas of the answer to one query as they are produced."""
        from rag_engine.engine_generate import stream_mode

        mode = mode or self.config.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        k = self.config.k if k is None else _check_k(k)
        params = params or DEFAULT_PARAMS
        docs = self._context(_query_list(query), k, retriever, where, {})
        with self.generator_lock:
            yield from stream_mode(self, mode, query, docs[0], params)


def _query_list(queries: str | Sequence[str]) -> list[str]:
    qs = [queries] if isinstance(queries, str) else list(queries)
    if not qs:
        raise ValueError("expected at least one query, got none")
    for j, q in enumerate(qs):
        if not isinstance(q, str):
            raise TypeError(f"queries[{j}] must be str, got {type(q).__name__}")
        if not q.strip():
            raise ValueError(f"queries[{j}] is empty: expected a non-empty question")
    return qs


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be an integer >= 0 (0 = no retrieval), got {k!r}")
    return int(k)


def output_of(gen_out: GenerationOutput, docs: Sequence[Document], metrics: dict) -> RagOutput:
    m = dict(metrics)
    gm = gen_out.metrics
    m.update(prefill_ms=1e3 * gm.ttft_s, decode_ms=1e3 * max(gm.total_s - gm.ttft_s, 0.0),
             decode_tokens_per_s=gm.decode_tokens_per_s, prompt_tokens=gm.prompt_tokens,
             completion_tokens=gm.completion_tokens)
    return RagOutput(gen_out.text, tuple(docs), gen_out.token_ids, gen_out.finish_reason, m)
