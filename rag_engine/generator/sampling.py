"""Sampling parameters (vLLM vocabulary) and the batched numpy logits processing behind them.

Order of processing for each row, on the fp32 logits ``[V]`` of one step:
min_tokens mask of stop tokens -> repetition penalty (prompt + output tokens, HF rule) ->
frequency/presence penalties (output tokens, OpenAI rule) -> greedy argmax when temperature is
below 1e-5 (0 included), else temperature -> top_k -> top_p -> min_p (the Hugging Face warper order) -> one draw from
the row's own seeded generator (inverse CDF, one uniform number per step).
Logprobs are the model's raw log-softmax (before any processing), as vLLM reports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)

@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; validated on construction (ValueError/TypeError naming the field)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    seed: int | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids >= 0, got {self.stop_token_ids!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _check_int("top_k", self.top_k, -1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)
        _check_float("temperature", self.temperature, 0.0, None)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        # As vLLM: a temperature this small is argmax (dividing float32 logits by, say, 1e-40
        # overflows to inf and the softmax to NaN).
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalised(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(name: str, value, low: float, high: float | None, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bound}, got {value}")


# ---- processing on one row (fp32 logits [V]); the Sampler applies them per row ----

def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place: for tokens seen (prompt or output), positive logits / penalty, negative * penalty."""
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)


def apply_count_penalties(logits: np.ndarray, counts: np.ndarray, presence: float, frequency: float) -> None:
    """In place: logits -= frequency * count + presence * (count > 0) over output tokens."""
    logits -= frequency * counts + presence * (counts > 0)


def top_k_filter(logits: np.ndarray, k: int) -> None:
    """In place: keep the k largest logits (ties at the k-th value kept), others -inf."""
    if 0 < k < logits.shape[-1]:
        kth = np.partition(logits, -k)[-k]
        logits[logits < kth] = -np.inf


def top_p_filter(logits: np.ndarray, p: float) -> None:
    """In place: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return
    order = np.argsort(-logits, kind="stable")
    probs = _softmax(logits[order])
    cum = np.cumsum(probs)
    # a token is dropped when the mass before it already reaches p (the top token always stays)
    drop = (cum - probs) >= p
    logits[order[drop]] = -np.inf


def min_p_filter(logits: np.ndarray, min_p: float) -> None:
    """In place: drop tokens whose probability is below min_p times the top probability."""
    if min_p <= 0.0:
        return
    probs = _softmax(logits)
    logits[probs < min_p * probs.max()] = -np.inf


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of ``[..., V]`` in fp64 for stable logprobs."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Sampler:
    """Per-batch sampling state: one row per sequence, compacted when sequences finish."""

    def __init__(self, params: Sequence[SamplingParams], prompts: Sequence[Sequence[int]],
                 vocab_size: int, stop_ids: Sequence[frozenset[int]]) -> None:
        self.params = list(params)
        self.stop_ids = list(stop_ids)
        self.rngs = [np.random.default_rng(p.seed) for p in self.params]
        self.produced = np.zeros(len(self.params), np.int64)
        self.any_penalty = any(p.penalised for p in self.params)
        self.all_greedy = all(p.greedy and not p.penalised and p.min_tokens == 0 for p in self.params)
        if self.any_penalty:
            self.counts = np.zeros((len(self.params), vocab_size), np.int32)
            self.seen = np.zeros((len(self.params), vocab_size), bool)
            for row, ids in enumerate(prompts):
                ids = np.asarray(ids, np.int64)
                self.seen[row, ids[ids < vocab_size]] = True  # ids >= vocab: soft-prompt positions

    def keep(self, rows: np.ndarray) -> None:
        """Drop finished rows: ``rows`` are the indices (in order) that stay."""
        idx = rows.tolist()
        self.params = [self.params[i] for i in idx]
        self.stop_ids = [self.stop_ids[i] for i in idx]
        self.rngs = [self.rngs[i] for i in idx]
        self.produced = self.produced[rows]
        if self.any_penalty:
            self.counts, self.seen = self.counts[rows], self.seen[rows]

    def sample(self, logits: np.ndarray) -> np.ndarray:
        """Pick one token per row from ``logits`` ``[B, V]`` fp32; returns ``[B]`` int64."""
        if self.all_greedy:
            tokens = logits.argmax(axis=-1)
        else:
            tokens = np.array([self._sample_row(i, logits[i]) for i in range(len(self.params))], np.int64)
        self.produced += 1
        if self.any_penalty:
            rows = np.arange(len(tokens))
            self.counts[rows, tokens] += 1
            self.seen[rows, tokens] = True
        return tokens

    def _sample_row(self, i: int, raw: np.ndarray) -> int:
        p = self.params[i]
        logits = raw.astype(np.float32, copy=True)
        if self.produced[i] < p.min_tokens and self.stop_ids[i]:
            logits[list(self.stop_ids[i])] = -np.inf
        if p.repetition_penalty != 1.0:
            apply_repetition_penalty(logits, self.seen[i], p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            apply_count_penalties(logits, self.counts[i], p.presence_penalty, p.frequency_penalty)
        if p.greedy:
            return int(logits.argmax())
        logits /= p.temperature
        top_k_filter(logits, p.top_k)
        top_p_filter(logits, p.top_p)
        min_p_filter(logits, p.min_p)
        probs = _softmax(logits.astype(np.float64))
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self.rngs[i].random() * cdf[-1], side="right"), len(cdf) - 1))


def top_logprobs(raw: np.ndarray, tokens: np.ndarray, n: int) -> list[dict[int, float]]:
    """Raw logprobs of the chosen token plus the top ``n`` per row of ``raw`` ``[B, V]``."""
    lp = log_softmax(raw)
    out = []
    for row, tok in enumerate(tokens.tolist()):
        entry = {int(tok): float(lp[row, tok])}
        if n:
            top = np.argpartition(-lp[row], n - 1)[:n] if n < lp.shape[1] else np.arange(lp.shape[1])
            for t in top[np.argsort(-lp[row, top], kind="stable")]:
                entry.setdefault(int(t), float(lp[row, t]))
        out.append(entry)
    return out
