"""One ONNX Runtime session over an exported decoder, driven through IO binding.

The session is created once per model and reused; every run binds the small per-step inputs
(ids, mask, positions), the KV cache views in place, and a preallocated logits buffer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rag_engine.generator import ortops
from rag_engine.generator.export import MODEL_FILE, ExportFormatError, read_manifest
from rag_engine.generator.kv_cache import KVCache

logger = logging.getLogger(__name__)


class DecoderSession:
    """An exported decoder folder loaded into ONNX Runtime (CPU).

    ``threads``: intra-op threads (None: ONNX Runtime's default, one per core).
    ``verify``: check file sizes and sha256 against the manifest before loading.
    """

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.spec, self.config = read_manifest(self.folder, verify=verify)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.config.custom_ops:
            ortops.register(options)
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL_FILE), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own Fail/InvalidProtobuf/... types
            raise ExportFormatError(f"{self.folder / MODEL_FILE} could not be loaded by ONNX Runtime: {err}") from err
        self.first_input = "inputs_embeds" if self.config.inputs_embeds else "input_ids"
        self.io = self.session.io_binding()
        self._logits = np.empty(0, np.float32)
        self._logits_shape: tuple[int, ...] | None = None
        self._logits_value = None
        self._decode_key: tuple[KVCache, int] | None = None
        self._bound: tuple[KVCache, int] | None = None  # holds the cache: its memory stays valid
        self._keep: list[object] = []

    def bind_cache(self, cache: KVCache) -> None:
        """Bind each layer's past and present to the same in-place cache views."""
        keep = []
        for layer, pair in enumerate(cache.views()):
            for part, view in zip(("key", "value"), pair, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(view)
                self.io.bind_ortvalue_input(f"past_key_values.{layer}.{part}", value)
                self.io.bind_ortvalue_output(f"present.{layer}.{part}", value)
                keep.append(value)
        self._keep = keep
        self._bound = (cache, cache.batch)

    def run(self, first: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: KVCache) -> np.ndarray:
        """One forward pass.

        first: input_ids ``[B, S]`` int64 (or inputs_embeds ``[B, S, hidden]`` fp32);
        attention_mask ``[B, T]`` int64 with each row's ones as a prefix (T = cached + S);
        position_ids ``[B, S]`` int64. Returns logits ``[B, V]`` fp32 (each row's last valid
        position), or ``[B, S, V]`` for an ``all_logits`` export. The returned array is reused
        by the next call.
        """
        batch = first.shape[0]
        if batch != cache.batch:
            raise ValueError(f"batch of inputs ({batch}) differs from the cache's live rows ({cache.batch})")
        if attention_mask.shape[1] > cache.max_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; the cache holds {cache.max_len}")
        self._ensure_cache(cache)
        self._decode_key = None  # the static decode inputs are no longer bound
        self.io.bind_cpu_input(self.first_input, first)
        self.io.bind_cpu_input("attention_mask", attention_mask)
        self.io.bind_cpu_input("position_ids", position_ids)
        logits = self._bind_logits(batch, first.shape[1] if self.config.all_logits else 1)
        self.session.run_with_iobinding(self.io)
        return logits if self.config.all_logits else logits[:, 0]

    def decode(self, tokens: np.ndarray, lengths: np.ndarray, cache: KVCache) -> np.ndarray:
        """One decode step: row b's token goes to cache slot (and position) ``lengths[b]``.

        The inputs are preallocated arrays bound once per cache layout, with a mask as wide as
        the cache (GroupQueryAttention takes each row's length from it), so a step only writes
        a few numbers in place and binds nothing. Returns logits ``[B, V]`` (reused next call).
        """
        if self.config.inputs_embeds:
            raise ValueError("decode() feeds token ids; this export takes inputs_embeds (use run())")
        batch = cache.batch
        if tokens.shape != (batch,) or lengths.shape != (batch,):
            raise ValueError(f"expected tokens and lengths of shape ({batch},), got {tokens.shape} and {lengths.shape}")
        if batch and (lengths.min() < 0 or lengths.max() >= cache.max_len):
            raise ValueError(f"decode positions must be in [0, {cache.max_len}) (the cache's length), "
                             f"got {lengths.min()}..{lengths.max()}")
        self._ensure_cache(cache)
        if self._decode_key is None or self._decode_key[0] is not cache or self._decode_key[1] != batch:
            self._ids = np.zeros((batch, 1), np.int64)
            self._pos = np.zeros((batch, 1), np.int64)
            self._mask = (np.arange(cache.max_len)[None, :] <= lengths[:, None]).astype(np.int64)
            self._decode_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in (self._ids, self._mask, self._pos)]
            for name, value in zip(("input_ids", "attention_mask", "position_ids"), self._decode_values, strict=True):
                self.io.bind_ortvalue_input(name, value)
            self._decode_key = (cache, batch)
        else:
            self._mask[np.arange(batch), lengths] = 1
        self._ids[:, 0] = tokens
        self._pos[:, 0] = lengths
        logits = self._bind_logits(batch, 1)
        self.session.run_with_iobinding(self.io)
        return logits[:, 0]

    def _ensure_cache(self, cache: KVCache) -> None:
        if self._bound is None or self._bound[0] is not cache or self._bound[1] != cache.batch:
            self.bind_cache(cache)

    def _bind_logits(self, batch: int, rows: int) -> np.ndarray:
        size = batch * rows * self.spec.vocab_size
        if self._logits.size < size:
            self._logits = np.empty(size, np.float32)
            self._logits_shape = None
        logits = self._logits[:size].reshape(batch, rows, self.spec.vocab_size)
        if self._logits_shape != logits.shape:  # rebinding only when the shape changes
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(logits)
            self.io.bind_ortvalue_output("logits", self._logits_value)
            self._logits_shape = logits.shape
        return logits
