"""Lexical retrieval with bm25s (English stopwords, Snowball stemming when PyStemmer is present)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _stemmer():
    try:
        import Stemmer

        return Stemmer.Stemmer("english").stemWords
    except ImportError:  # optional: BM25 still works, with lower recall on inflected words
        return None


class BM25Index:
    """BM25 over passage texts; row i of the index is passage `ids[i]`."""

    def __init__(self, model, ids: np.ndarray) -> None:
        self.model = model
        self.ids = np.asarray(ids, np.int64)

    @classmethod
    def build(cls, texts: list[str], ids: np.ndarray) -> BM25Index:
        import bm25s

        model = bm25s.BM25()
        if texts:
            tokens = bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False)
            model.index(tokens, show_progress=False)
        return cls(model, ids)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def search(self, queries: list[str], k: int, allow: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k] float32, passage ids [Q, k] int64); -inf / -1 where fewer match.

        allow: optional bool mask over passage ids (deleted or filtered-out rows False).
        """
        import bm25s

        out_s = np.full((len(queries), k), -np.inf, np.float32)
        out_i = np.full((len(queries), k), -1, np.int64)
        if len(self) == 0 or not queries:
            return out_s, out_i
        mask = None
        if allow is not None:
            mask = allow[self.ids].astype(np.float32)
        stem = _stemmer()
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stem, show_progress=False, return_ids=False)
        vocab = self.model.vocab_dict
        for qi, toks in enumerate(tokens):
            toks = [t for t in toks if t in vocab]
            if not toks:
                continue
            scores = self.model.get_scores(toks)
            if mask is not None:
                scores = scores * mask
            kk = min(k, scores.shape[0])
            top = np.argpartition(-scores, kk - 1)[:kk]
            top = top[np.lexsort((top, -scores[top]))]
            top = top[scores[top] > 0]
            out_s[qi, : len(top)] = scores[top]
            out_i[qi, : len(top)] = self.ids[top]
        return out_s, out_i

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "bm25_ids.npy", self.ids)
        if len(self):
            self.model.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path) -> BM25Index:
        import bm25s

        ids = np.load(folder / "bm25_ids.npy")
        model = bm25s.BM25.load(str(folder), show_progress=False) if len(ids) else bm25s.BM25()
        return cls(model, ids)
