"""The on-disk cache shared by exported models, encoders and indexes' derived files.

Entries are built in a staging folder beside their final place and published by an atomic
rename after a completion marker is written, so a crash never leaves a half-written entry
that looks complete; content hashes key entries on what they were built from.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from rag_engine.checksum import update_from_file

_DONE_MARKER = "COMPLETE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The export cache: ``cache_dir``, else ``$RAG_ENGINE_CACHE``, else ``~/.cache/rag_engine``."""
    if cache_dir is not None:
        root = Path(cache_dir)
    elif os.environ.get("RAG_ENGINE_CACHE"):
        root = Path(os.environ["RAG_ENGINE_CACHE"])
    else:
        root = Path.home() / ".cache" / "rag_engine"
    root.mkdir(parents=True, exist_ok=True)
    return root


def hash_files(folder: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """sha256 over the names and bytes of the files in ``folder`` matching ``patterns``."""
    digest = hashlib.sha256()
    files = sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})
    for path in files:
        digest.update(path.name.encode())
        update_from_file(digest, path)
    return digest.hexdigest()


def is_complete(folder: Path) -> bool:
    """A cache entry is complete only once its marker was written as the last step."""
    return (folder / _DONE_MARKER).is_file()


def publish(tmp: Path, final: Path) -> Path:
    """Mark ``tmp`` complete and move it to ``final`` atomically (replacing a broken entry)."""
    (tmp / _DONE_MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def staging_dir(root: Path, name: str) -> Path:
    """A fresh temporary folder beside ``root/name`` so that ``publish`` is a same-disk rename."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
