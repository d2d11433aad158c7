"""PassageIndex: passages + their vectors (CorpusMatrix, searched by ops.topk_ip) + BM25.

Passage ids are row numbers of the vector matrix. Deleting a document
tombstones its rows (masked out of every search through the kernel's
ids_filter); saving compacts the index, so passage ids are stable until the
next save. Texts and metadata live in SQLite on disk, vectors in a raw `.npy`
memory-mapped at load.
"""

from __future__ import annotations

import copy
import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rag_engine import ops
from rag_engine.corpus import STORAGE_DTYPES, CorpusMatrix
from rag_engine.errors import IndexFormatError
from rag_engine.retrieval import persist
from rag_engine.retrieval.bm25 import BM25Index

log = logging.getLogger(__name__)

DENSE_BACKENDS = ("topk_ip", "faiss_flat", "faiss_hnsw", "faiss_ivf")


@dataclass(frozen=True)
class Passage:
    passage_id: int
    doc_id: str
    text: str
    start: int  # character offsets in the source document
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    passage_id: int
    text: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)


def json_metadata(metadata: dict[str, Any] | None, op: str) -> dict[str, Any]:
    """A private copy of a document's metadata as it will be saved: JSON values only (tuples
    become lists), so filters match the same before and after a save/load round trip."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"{op}: metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{op}: metadata must be JSON-serialisable (str keys; str, number, bool, "
                        f"None, list, dict values): {exc}") from exc


def _meta_equal(meta: dict[str, Any], key: str, value: Any) -> bool:
    """JSON equality of one metadata field: a missing key matches nothing (not even None), and
    true/false are not the numbers 1/0."""
    if key not in meta:
        return False
    have = meta[key]
    return have == value and isinstance(have, bool) == isinstance(value, bool)


def _json_value(v: Any) -> Any:
    try:
        return json.loads(json.dumps(v))
    except (TypeError, ValueError):
        return v  # not storable, so it matches nothing stored


class _Vectors:
    """Growable storage-dtype matrix (amortised appends; memory-mapped after load)."""

    def __init__(self, dim: int, dtype: str) -> None:
        self.dim, self.dtype, self.n = dim, dtype, 0
        self._data = np.empty((0, dim), CorpusMatrix.from_float(np.zeros((1, dim), np.float32), dtype).data.dtype)
        self._scales = np.empty(0, np.float32) if dtype == "int8" else None

    def append(self, x: np.ndarray) -> None:
        cm = CorpusMatrix.from_float(x, self.dtype)
        need = self.n + cm.n
        if need > self._data.shape[0] or not self._data.flags.writeable:
            cap = max(need, 2 * self._data.shape[0], 1024)
            grown = np.empty((cap, self.dim), self._data.dtype)
            grown[: self.n] = self._data[: self.n]
            self._data = grown
            if self._scales is not None:
                s = np.empty(cap, np.float32)
                s[: self.n] = self._scales[: self.n]
                self._scales = s
        self._data[self.n : need] = cm.data
        if self._scales is not None:
            self._scales[self.n : need] = cm.scales
        self.n = need

    def matrix(self) -> CorpusMatrix:
        return CorpusMatrix(self._data[: self.n], self.dtype, None if self._scales is None else self._scales[: self.n])

    @classmethod
    def from_arrays(cls, data: np.ndarray, dtype: str, scales: np.ndarray | None) -> _Vectors:
        v = cls(data.shape[1], dtype)
        v._data, v._scales, v.n = data, scales, data.shape[0]
        return v


class PassageIndex:
    """Passages with dense vectors and a BM25 index, persisted crash-safely."""

    def __init__(self, encoder_name: str, dim: int, dtype: str = "fp32") -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"PassageIndex: dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
        self.encoder_name, self.dim, self.dtype = encoder_name, dim, dtype
        self._passages: list[Passage | None] = []
        self._vectors = _Vectors(dim, dtype)
        self._by_doc: dict[str, list[int]] = {}
        self._dead = 0  # tombstoned rows
        self._masks: dict[str, np.ndarray] = {}  # allow masks by `where`, dropped on every change
        self._bm25: BM25Index | None = None
        # "topk_ip" (exact, the fused kernel) or "faiss_flat" / "faiss_hnsw" / "faiss_ivf".
        self.dense_backend = "topk_ip"
        self._faiss = None
        self._next_num: int | None = None  # cache of next_numeric_id()

    def set_dense_backend(self, name: str) -> None:
        if name not in DENSE_BACKENDS:
            raise ValueError(f"dense backend must be one of {DENSE_BACKENDS}, got {name!r}")
        self.dense_backend, self._faiss = name, None

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        """Live passages."""
        return len(self._passages) - self._dead

    @property
    def num_documents(self) -> int:
        return len(self._by_doc)

    def passage(self, pid: int) -> Passage:
        p = self._passages[pid] if 0 <= pid < len(self._passages) else None
        if p is None:
            raise KeyError(f"passage {pid} does not exist or was deleted")
        return p

    def doc_ids(self) -> list[str]:
        return list(self._by_doc)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._by_doc

    def next_numeric_id(self) -> int:
        """An integer above every all-digit live document id (ids the engine hands out)."""
        if self._next_num is None:
            self._next_num = max((int(d) + 1 for d in self._by_doc if d.isascii() and d.isdigit()), default=0)
        return self._next_num

    def reserve_numeric_ids(self, n: int) -> int:
        """The first of ``n`` consecutive new numeric ids, taken (a concurrent caller gets others)."""
        start = self.next_numeric_id()
        self._next_num = start + n
        return start

    def add(self, doc_id: str, spans: Sequence[tuple[int, int]], texts: Sequence[str],
            vectors: np.ndarray, metadata: dict[str, Any] | None = None) -> list[int]:
        """Append the passages of one document (replacing a document of the same id)."""
        if len(texts) != vectors.shape[0] or len(spans) != len(texts):
            raise ValueError(f"PassageIndex.add: {len(texts)} texts, {len(spans)} spans, {vectors.shape[0]} vectors")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"PassageIndex.add: vectors must be [n, {self.dim}], got {vectors.shape}")
        meta = json_metadata(metadata, "PassageIndex.add")
        # Store (and so validate) the new rows before the old version of the document goes:
        # a refused call leaves the index as it was.
        self._vectors.append(np.asarray(vectors, np.float32))
        if doc_id in self._by_doc:
            self.delete([doc_id])
        first = len(self._passages)
        for j, ((a, b), t) in enumerate(zip(spans, texts)):
            self._passages.append(Passage(first + j, doc_id, t, a, b, meta))
        self._by_doc[doc_id] = list(range(first, first + len(texts)))
        if self._next_num is not None and doc_id.isascii() and doc_id.isdigit():
            self._next_num = max(self._next_num, int(doc_id) + 1)
        self._bm25 = self._faiss = None
        self._masks.clear()
        return self._by_doc[doc_id]

    def delete(self, doc_ids: Sequence[str]) -> int:
        """Tombstone every passage of these documents; returns how many passages went."""
        gone = 0
        for d in doc_ids:
            for pid in self._by_doc.pop(d, []):
                self._passages[pid] = None
                gone += 1
        if gone:
            self._bm25 = None
            self._dead += gone
            self._masks.clear()
        return gone

    def allow_mask(self, where: dict[str, Any] | None = None) -> np.ndarray | None:
        """Read-only bool mask over passage ids of live passages matching `where` (metadata
        equality); None when every row is allowed. Built per document (passages share their
        document's metadata) and cached until the index changes, so repeated searches with the
        same filter cost nothing here."""
        if not where and self._dead == 0:
            return None
        key = json.dumps(where or {}, sort_keys=True, default=repr)
        mask = self._masks.get(key)
        if mask is None:
            # Stored metadata went through JSON (tuples are lists there): so do the values asked for.
            want = {k: _json_value(v) for k, v in (where or {}).items()}
            mask = np.zeros(len(self._passages), np.bool_)
            for pids in self._by_doc.values():
                meta = self._passages[pids[0]].metadata
                if all(_meta_equal(meta, k, v) for k, v in want.items()):
                    mask[pids] = True
            mask.flags.writeable = False
            if len(self._masks) >= 64:
                self._masks.clear()
            self._masks[key] = mask
        return mask

    # ------------------------------------------------------------------ search
    def search_dense(self, qvecs: np.ndarray, k: int, where: dict[str, Any] | None = None,
                     threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Q, k], passage ids [Q, k]) by inner product over live passages matching
        `where`; -inf / -1 pad missing slots."""
        nq = qvecs.shape[0]
        allow = self.allow_mask(where)
        if self._vectors.n == 0 or (allow is not None and not allow.any()):
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if self.dense_backend != "topk_ip":
            if self._faiss is None:
                from rag_engine.retrieval.faiss_backend import FaissIndex

                self._faiss = FaissIndex(self._vectors.matrix().to_float(), self.dense_backend.split("_", 1)[1])
            s, i = self._faiss.search(qvecs, min(k, self._vectors.n), allow)
        else:
            s, i = ops.topk_ip(qvecs, self._vectors.matrix(), k, ids_filter=allow, threads=threads)
        if s.shape[1] < k:  # k > N: pad to the asked width
            pad = k - s.shape[1]
            s = np.pad(s, ((0, 0), (0, pad)), constant_values=-np.inf)
            i = np.pad(i, ((0, 0), (0, pad)), constant_values=-1)
        return s, i

    def bm25(self) -> BM25Index:
        if self._bm25 is None:
            live = [p for p in self._passages if p is not None]
            self._bm25 = BM25Index.build([p.text for p in live], np.array([p.passage_id for p in live], np.int64))
        return self._bm25

    def search_bm25(self, queries: list[str], k: int, where: dict[str, Any] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        return self.bm25().search(queries, k, self.allow_mask(where))

    def collapse(self, scores: np.ndarray, ids: np.ndarray, k: int, per_doc: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Keep at most `per_doc` passages of each document (0 = no limit), then the top k.

        Candidates must be sorted best first; the order is kept."""
        out_s = np.full((ids.shape[0], k), -np.inf, np.float32)
        out_i = np.full((ids.shape[0], k), -1, np.int64)
        for q in range(ids.shape[0]):
            seen: dict[str, int] = {}
            j = 0
            for s, pid in zip(scores[q], ids[q]):
                if pid < 0 or j == k:
                    break
                doc = self.passage(int(pid)).doc_id
                if per_doc and seen.get(doc, 0) >= per_doc:
                    continue
                seen[doc] = seen.get(doc, 0) + 1
                out_s[q, j], out_i[q, j] = s, pid
                j += 1
        return out_s, out_i

    def hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        out = []
        for srow, irow in zip(scores, ids):
            row = []
            for s, pid in zip(srow, irow):
                if pid < 0:
                    continue
                p = self.passage(int(pid))
                row.append(Hit(p.doc_id, p.passage_id, p.text, float(s), copy.deepcopy(p.metadata)))
            out.append(row)
        return out

    # ------------------------------------------------------------------ persistence
    def vectors(self) -> CorpusMatrix:
        """All rows (deleted ones included: mask them with allow_mask)."""
        return self._vectors.matrix()

    def save(self, path: str | Path, extra: dict[str, bytes | np.ndarray] | None = None) -> None:
        """Compact and write atomically (see rag_engine.retrieval.persist); `extra` files
        (bytes, or arrays saved as .npy) join the same version."""
        root = Path(path)
        live = [p for p in self._passages if p is not None]
        keep = np.array([p.passage_id for p in live], np.int64)
        m = self._vectors.matrix()
        data = np.ascontiguousarray(m.data[keep]) if len(live) else m.data[:0]
        scales = None if m.scales is None else np.ascontiguousarray(m.scales[keep])
        compact = [Passage(j, p.doc_id, p.text, p.start, p.end, p.metadata) for j, p in enumerate(live)]
        version = persist.new_version(root)
        np.save(version / "vectors.npy", data)
        if scales is not None:
            np.save(version / "scales.npy", scales)
        with sqlite3.connect(version / "passages.sqlite") as db:
            db.execute("CREATE TABLE passages (passage_id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, "
                       "start INTEGER, end INTEGER, text TEXT NOT NULL, metadata TEXT)")
            db.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?)",
                           [(p.passage_id, p.doc_id, p.start, p.end, p.text, json.dumps(p.metadata))
                            for p in compact])
        db.close()
        BM25Index.build([p.text for p in compact], np.arange(len(compact))).save(version / "bm25")
        for name, payload in (extra or {}).items():
            if isinstance(payload, np.ndarray):
                np.save(version / name, payload)
            else:
                (version / name).write_bytes(payload)
        persist.commit_version(root, version, {
            "encoder": self.encoder_name, "dim": self.dim, "dtype": self.dtype,
            "num_passages": len(compact), "num_documents": len({p.doc_id for p in compact})})
        self._passages, self._by_doc, self._dead = list(compact), {}, 0
        self._masks.clear()
        for p in compact:
            self._by_doc.setdefault(p.doc_id, []).append(p.passage_id)
        self._vectors = _Vectors.from_arrays(data, self.dtype, scales)
        self._bm25 = self._faiss = None

    @classmethod
    def load(cls, path: str | Path, encoder_name: str | None = None, verify: bool = True,
             opened: tuple[Path, dict] | None = None) -> PassageIndex:
        """Open a saved index; vectors are memory-mapped (copied on the first add).

        encoder_name: if given, the index must have been built by that encoder.
        opened: the (version folder, manifest) a caller already took from
        `persist.open_version`, so that everything it reads comes from that one version
        (reading CURRENT again could land on a newer save).
        """
        version, man = opened if opened is not None else persist.open_version(Path(path), verify=verify)
        fields = {"encoder": str, "dim": int, "dtype": str, "num_passages": int}
        bad = [k for k, t in fields.items() if not isinstance(man.get(k), t) or isinstance(man.get(k), bool)]
        if bad:
            raise IndexFormatError(f"{path}: manifest lacks or has malformed fields {bad} "
                                   f"(expected {', '.join(f'{k}: {t.__name__}' for k, t in fields.items())})")
        if encoder_name is not None and man["encoder"] != encoder_name:
            raise IndexFormatError(f"{path}: index built with encoder {man['encoder']!r}, "
                                   f"this engine uses {encoder_name!r}")
        if man["dtype"] not in STORAGE_DTYPES:
            raise IndexFormatError(f"{path}: unknown vector dtype {man['dtype']!r} (expected one of {STORAGE_DTYPES})")
        idx = cls(man["encoder"], man["dim"], man["dtype"])
        n = man["num_passages"]
        try:
            data = np.load(version / "vectors.npy", mmap_mode="r")
            scales = np.load(version / "scales.npy") if (version / "scales.npy").exists() else None
            db = sqlite3.connect(f"file:{version / 'passages.sqlite'}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT passage_id, doc_id, start, end, text, metadata FROM passages "
                                  "ORDER BY passage_id").fetchall()
            finally:
                db.close()
            metas = [json.loads(meta) if meta else {} for *_, meta in rows]
            bm25 = BM25Index.load(version / "bm25")
        except (OSError, ValueError, KeyError, sqlite3.Error) as exc:  # json errors are ValueErrors
            raise IndexFormatError(f"{path}: unreadable index files in {version.name} ({type(exc).__name__}: {exc})") from exc
        if data.shape != (n, idx.dim):
            raise IndexFormatError(f"{path}: vectors.npy has shape {data.shape}, manifest says ({n}, {idx.dim})")
        want = idx._vectors._data.dtype
        if data.dtype != want:
            raise IndexFormatError(f"{path}: vectors.npy holds {data.dtype}, a {man['dtype']} index stores {want}")
        if (scales is None) != (man["dtype"] != "int8") or (scales is not None and scales.shape != (n,)):
            raise IndexFormatError(f"{path}: scales.npy must exist exactly for int8 indexes, with shape ({n},); "
                                   f"got {None if scales is None else scales.shape}")
        if [r[0] for r in rows] != list(range(n)):
            raise IndexFormatError(f"{path}: passages.sqlite holds {len(rows)} passages, expected ids 0..{n - 1}")
        if (bad_meta := next((j for j, m in enumerate(metas) if not isinstance(m, dict)), None)) is not None:
            raise IndexFormatError(f"{path}: passage {bad_meta} has metadata that is not a JSON object")
        if not np.array_equal(np.sort(bm25.ids), np.arange(n)):
            raise IndexFormatError(f"{path}: the BM25 index covers {len(bm25.ids)} passages, expected {n}")
        idx._vectors = _Vectors.from_arrays(data, idx.dtype, scales)
        for (pid, doc, a, b, text, _), meta in zip(rows, metas):
            idx._passages.append(Passage(pid, doc, text, a, b, meta))
            idx._by_doc.setdefault(doc, []).append(pid)
        idx._bm25 = bm25
        return idx
