"""Split documents into overlapping passages by tokens, keeping character offsets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChunkConfig:
    """passage_tokens: tokens per passage; overlap_tokens: tokens shared by neighbours."""

    passage_tokens: int = 128
    overlap_tokens: int = 32

    def __post_init__(self) -> None:
        if self.passage_tokens < 8:
            raise ValueError(f"ChunkConfig: passage_tokens must be >= 8, got {self.passage_tokens}")
        if not 0 <= self.overlap_tokens < self.passage_tokens:
            raise ValueError(f"ChunkConfig: overlap_tokens must be in [0, passage_tokens={self.passage_tokens}), "
                             f"got {self.overlap_tokens}")


def chunk_spans(text: str, tokenizer: Any, config: ChunkConfig = ChunkConfig()) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the passages of `text`.

    Windows of `passage_tokens` tokens advance by `passage_tokens - overlap_tokens`;
    a window ends on a whitespace boundary of the token offsets, so words are
    never cut. A text with no tokens gives no passages.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                    verbose=False)
    offsets = [o for o in enc["offset_mapping"] if o[1] > o[0]]
    if not offsets:
        return []
    step = config.passage_tokens - config.overlap_tokens
    spans = []
    t0 = 0
    while True:
        t1 = min(t0 + config.passage_tokens, len(offsets))
        start, end = offsets[t0][0], offsets[t1 - 1][1]
        if t1 < len(offsets):  # extend to the end of a word split into sub-tokens
            while t1 < len(offsets) and offsets[t1][0] == end:
                end = offsets[t1][1]
                t1 += 1
        spans.append((start, end))
        if t1 >= len(offsets):
            break
        t0 += step
    return spans
