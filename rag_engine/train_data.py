"""Training pairs for the latent mode, without any download.

Self-supervised pairs come from the index's own passages: the opening ``query_tokens`` tokens
(generator tokenizer) of a passage are the query, the next ``target_tokens`` the target.
Retrieval for a pair excludes its own passage and every passage of the same document whose
character span overlaps it (overlapping chunks would otherwise hand the target over verbatim).
Optional JSONL pairs ({"question", "answer"}) join them. Train and held-out sets are split by
document, so no held-out document is seen in training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """One (query, target) example. passage_id -1: not from the index (JSONL)."""

    doc_id: str
    passage_id: int
    query: str  # text given to the query encoder
    query_ids: tuple[int, ...]  # generator tokens of the query ("text" prompt format)
    target_ids: tuple[int, ...]


def corpus_pairs(index, tokenizer, max_pairs: int, query_tokens: int, target_tokens: int,
                 seed: int) -> list[Pair]:
    """Up to ``max_pairs`` pairs from passages with at least query + target tokens, chosen by seed."""
    live = live_passages(index)
    order = np.random.default_rng(seed).permutation(len(live))
    pairs = []
    for j in order.tolist():
        if len(pairs) == max_pairs:
            break
        p = live[j]
        ids = tokenizer.encode(p.text, add_special_tokens=False)
        if len(ids) < query_tokens + target_tokens:
            continue
        q = ids[:query_tokens]
        pairs.append(Pair(p.doc_id, p.passage_id, tokenizer.decode(q).strip(), tuple(q),
                          tuple(ids[query_tokens : query_tokens + target_tokens])))
    if not pairs:
        raise ValueError(f"no passage of the index has {query_tokens + target_tokens} generator tokens: "
                         "expected longer passages or smaller query_tokens/target_tokens")
    return pairs


def jsonl_pairs(path: str | Path, tokenizer, target_tokens: int) -> list[Pair]:
    """Pairs from a JSONL file with "question" and "answer" fields (one document per line)."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            question, answer = str(item["question"]), str(item["answer"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n + 1}: expected a JSON object with 'question' and 'answer', got "
                             f"{line[:80]!r} ({exc})") from None
        q = tokenizer.encode(question + "\n", add_special_tokens=False)
        t = tokenizer.encode(answer, add_special_tokens=False)[:target_tokens]
        if t:
            pairs.append(Pair(f"jsonl:{n}", -1, question, tuple(q), tuple(t)))
    return pairs


def split_by_document(pairs: Sequence[Pair], heldout_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): whole documents go to one side; at least one document on each side."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    docs = sorted({p.doc_id for p in pairs})
    if len(docs) < 2:
        raise ValueError(f"splitting by document needs at least 2 documents, got {len(docs)}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_held = min(max(1, round(heldout_fraction * len(docs))), len(docs) - 1)
    held = {docs[i] for i in order[:n_held].tolist()}
    return [p for p in pairs if p.doc_id not in held], [p for p in pairs if p.doc_id in held]


def live_passages(index) -> list:
    """Every passage of the index not deleted, by passage id."""
    out = []
    for pid in range(index.vectors().data.shape[0]):
        try:
            out.append(index.passage(pid))
        except KeyError:  # deleted
            continue
    return out


def excluded_passages(by_doc: dict[str, list], pair: Pair) -> set[int]:
    """The pair's passage and the same document's passages that overlap it."""
    if pair.passage_id < 0:
        return set()
    src = next(p for p in by_doc[pair.doc_id] if p.passage_id == pair.passage_id)
    return {p.passage_id for p in by_doc[pair.doc_id] if p.start < src.end and src.start < p.end}


def retrieve_for_pairs(index, encoder, pairs: Sequence[Pair], k: int, threads: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(h_in [N, dim] float32, passage ids [N, k] int64, -1 = empty) by dense retrieval of each
    pair's query, its own passage and overlapping neighbours excluded."""
    h_in = encoder.encode([p.query for p in pairs])
    by_doc: dict[str, list] = {}
    for p in live_passages(index):
        by_doc.setdefault(p.doc_id, []).append(p)
    excluded = [excluded_passages(by_doc, p) for p in pairs]
    depth = k + max((len(e) for e in excluded), default=0)
    _, cand = index.search_dense(h_in, depth, threads=threads)
    ids = np.full((len(pairs), k), -1, np.int64)
    for n, (row, skip) in enumerate(zip(cand, excluded)):
        kept = [int(i) for i in row if i >= 0 and int(i) not in skip][:k]
        ids[n, : len(kept)] = kept
    return h_in, ids
