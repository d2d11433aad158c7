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


# Bumped when the same text and settings give different passages (cached indexes keyed by it).
CHUNKER_VERSION = 3
# Tokens a window may grow by to finish a word, and its start may move back to begin one:
# a bound, so text without word breaks (CJK without a word tokenizer, long identifiers, CSV)
# still comes in windows of about passage_tokens.
WORD_SLACK = 8


def chunk_spans(text: str, tokenizer: Any, config: ChunkConfig = ChunkConfig(),
                max_tokens: int | None = None) -> list[tuple[int, int]]:
    """Character spans `(start, end)` of the passages of `text`.

    Windows of `passage_tokens` tokens advance by `passage_tokens - overlap_tokens`. A window
    ends at the end of a word and starts at the start of one (words from the tokenizer's
    word ids, else tokens that touch with no gap), moving by at most WORD_SLACK tokens, so a
    word is cut only where it is longer than that. `max_tokens` caps every window (e.g. the
    encoder's length less its special tokens). A text with no tokens gives no passages.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False,
                    verbose=False)
    keep = [i for i, o in enumerate(enc["offset_mapping"]) if o[1] > o[0]]
    offsets = [enc["offset_mapping"][i] for i in keep]
    if not offsets:
        return []
    try:
        all_words = enc.word_ids()
        words = [all_words[i] for i in keep]
    except (AttributeError, ValueError):  # a slow tokenizer has no word ids
        words = None
    if words is not None and any(w is None for w in words):
        words = None

    def same_word(i: int) -> bool:  # tokens i - 1 and i belong to one word
        return words[i - 1] == words[i] if words is not None else offsets[i][0] == offsets[i - 1][1]

    n, size = len(offsets), config.passage_tokens
    cap = min(size + WORD_SLACK, max_tokens) if max_tokens is not None else size + WORD_SLACK
    size = min(size, cap)
    step = max(1, size - config.overlap_tokens)
    spans = []
    t0 = 0
    while True:
        t1 = min(t0 + size, n)
        while t1 < n and t1 - t0 < cap and same_word(t1):  # finish the last word
            t1 += 1
        back = 0
        while t1 < n and t1 - 1 > t0 and back < WORD_SLACK and same_word(t1):  # at the cap: end before it
            t1 -= 1
            back += 1
        spans.append((offsets[t0][0], offsets[t1 - 1][1]))
        if t1 >= n:
            break
        nxt = t0 + step
        back = 0
        while nxt - 1 > t0 and back < WORD_SLACK and same_word(nxt):  # start at a word's start
            nxt -= 1
            back += 1
        t0 = nxt
    return spans
