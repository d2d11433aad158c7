"""``Generator``: text in, text out, over an exported ONNX decoder.

    gen = Generator.from_pretrained("default", precision="int8", threads=2)
    out = gen.generate(["What is a list?"], SamplingParams(max_tokens=64, temperature=0))[0]
    for delta in gen.stream([{"role": "user", "content": "hi"}]): ...
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from rag_engine.generator import assets
from rag_engine.generator.detokenize import IncrementalDetokenizer
from rag_engine.generator.export import ExportConfig, cached_export, folder_key, model_key
from rag_engine.generator.loop import Row, run_batch
from rag_engine.generator.sampling import SamplingParams
from rag_engine.generator.session import DecoderSession

logger = logging.getLogger(__name__)

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class GenerationMetrics:
    """Timings of one sequence: ttft from the start of its batch; decode rate after the first token."""

    ttft_s: float
    decode_tokens_per_s: float
    prompt_tokens: int
    completion_tokens: int
    total_s: float


@dataclass(frozen=True)
class GenerationOutput:
    """One finished sequence. token_ids include a final stop/EOS token; text does not."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    logprobs: tuple[dict[int, float], ...] | None
    metrics: GenerationMetrics
    prompt_token_ids: tuple[int, ...] = ()


def _eos_ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset(int(v) for v in (value if isinstance(value, (list, tuple, set)) else [value]))


class Generator:
    """Batched generation with sampling, stop conditions and streaming on ONNX Runtime."""

    def __init__(self, session: DecoderSession, tokenizer, eos_token_ids=None,
                 max_batch_size: int = 16) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.session = session
        self.tokenizer = tokenizer
        eos = _eos_ids(eos_token_ids)
        if not eos and tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = _eos_ids(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.max_batch_size = max_batch_size

    @property
    def max_context(self) -> int:
        return self.session.spec.max_context

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "default", precision: str = "fp32",
                        threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                        progress: bool = True, int8_method: str = "nbits", custom_ops: bool | None = None,
                        **kwargs) -> Generator:
        """Load a Hugging Face folder or a known name ("smollm2-135m-instruct", alias "default").

        Exports (and quantises) on first use; later calls load the cached export. int8_method:
        "nbits" (MatMulNBits in blocks of 64 weights, the default) or "dynamic" (quantize_dynamic
        per-channel weights, activations quantised per tensor: faster in batches, less faithful
        to fp32). custom_ops: whether "nbits" GEMMs run on rag_engine's own ONNX Runtime op
        (None: where built and the CPU has AVX-512 VNNI; see ExportConfig).
        """
        from transformers import AutoTokenizer

        config = ExportConfig(precision=precision, int8_method=int8_method,  # validates before any work
                              custom_ops=custom_ops)
        folder = assets.resolve_model(name_or_path, cache_dir)

        def load():
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()

        export = cached_export(folder_key(folder), load, config, cache_dir, progress)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls(DecoderSession(export, threads), tokenizer, _read_eos(folder), **kwargs)

    @classmethod
    def from_hf(cls, model, tokenizer=None, precision: str = "fp32", threads: int | None = None,
                cache_dir: str | os.PathLike | None = None, progress: bool = False,
                export_config: ExportConfig | None = None, **kwargs) -> Generator:
        """Export an in-memory transformers model (cached by content hash) and wrap it."""
        config = export_config or ExportConfig(precision=precision)
        export = cached_export(model_key(model), lambda: model, config, cache_dir, progress)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        return cls(DecoderSession(export, threads), tokenizer, eos, **kwargs)

    # ---- prompts ----

    def encode(self, prompt: Prompt) -> np.ndarray:
        """Token ids ``[T]`` int64 of a string, a token-id list or a chat message list."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: expected a non-empty string")
            ids = self._need_tokenizer().encode(prompt)
        elif isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
            ids = self._need_tokenizer().apply_chat_template(list(prompt), add_generation_prompt=True,
                                                            tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, Mapping) else ids
        elif isinstance(prompt, (Sequence, np.ndarray)):
            ids = list(prompt)
            if any(isinstance(t, (bool, float, str)) or not isinstance(t, (int, np.integer)) for t in ids):
                raise TypeError("a token-id prompt must contain only ints")
        else:
            raise TypeError(f"prompt must be a str, a token-id list or chat messages, got {type(prompt).__name__}")
        ids = np.asarray(ids, np.int64)
        if ids.size == 0:
            raise ValueError("prompt is empty: expected at least one token")
        vocab = self.session.spec.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got min {ids.min()} max {ids.max()}")
        if ids.size >= self.max_context:
            raise ValueError(f"prompt has {ids.size} tokens: expected fewer than the model's context "
                             f"of {self.max_context} tokens")
        return ids

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("text and chat prompts need a tokenizer; this Generator has none (pass token ids)")
        return self.tokenizer

    def stop_ids_for(self, p: SamplingParams) -> frozenset[int]:
        """Token ids that end a row under ``p`` (its stop_token_ids, plus EOS unless ignored)."""
        vocab = self.session.spec.vocab_size
        if any(t >= vocab for t in p.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < the vocabulary size {vocab}, got {p.stop_token_ids!r}")
        return frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids)

    def _rows(self, prompts: Sequence[Prompt], params, stream: bool = False) -> list[Row]:
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"expected one SamplingParams or one per prompt ({len(prompts)}), got {len(params)}")
        rows = []
        for p, prompt in zip(params, prompts, strict=True):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"params must be SamplingParams, got {type(p).__name__}")
            stop_ids = self.stop_ids_for(p)
            detok, decode = None, None
            if self.tokenizer is not None and (stream or p.stop):  # text needed while generating
                detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens)
            elif self.tokenizer is not None:
                decode = partial(self.tokenizer.decode, skip_special_tokens=p.skip_special_tokens)
            rows.append(Row(self.encode(prompt), p, stop_ids, detok, decode))
        return rows

    # ---- generation ----

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
        """Generate for each prompt; batches of up to ``max_batch_size`` run together."""
        prompts = _as_prompt_list(prompts)
        rows = self._rows(prompts, params)
        for start in range(0, len(rows), self.max_batch_size):
            batch = rows[start:start + self.max_batch_size]
            t0 = time.perf_counter()
            for row in batch:
                row.t_start = t0
            for _ in run_batch(self.session, batch):
                pass
        return [_output(row) for row in rows]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one prompt as tokens are produced."""
        (row,) = self._rows([prompt], params, stream=True)
        for events in run_batch(self.session, [row]):
            for _, delta in events:
                if delta:
                    yield delta


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer, Mapping)):
        return [prompts]
    if not isinstance(prompts, (Sequence, np.ndarray)) or len(prompts) == 0:
        raise ValueError("expected at least one prompt")
    return list(prompts)


def _output(row: Row) -> GenerationOutput:
    n = len(row.tokens)
    decode_s = row.t_done - row.t_first
    metrics = GenerationMetrics(
        ttft_s=row.t_first - row.t_start,
        decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        prompt_tokens=int(row.prompt.size),
        completion_tokens=n,
        total_s=row.t_done - row.t_start,
    )
    logprobs = tuple(row.logprobs) if row.logprobs is not None else None
    return GenerationOutput(row.text, tuple(row.tokens), row.finish_reason, logprobs, metrics,
                            tuple(int(t) for t in row.prompt))


def _read_eos(folder: Path):
    """EOS ids from generation_config.json (may be a list), else config.json."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return value
    return None
