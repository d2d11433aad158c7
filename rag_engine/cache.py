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

from rag_engine.checksum import sha256_file, update_from_file

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


def file_records(folder: Path, names) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files in ``folder``: what an entry records to be checked later."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in names}


def file_problem(folder: Path, records: dict, verify: bool = True) -> str | None:
    """The first way the files of ``folder`` differ from ``records`` (missing, size, and with
    ``verify`` sha256), or None. Malformed records raise KeyError/TypeError/AttributeError."""
    for name, meta in records.items():
        file = folder / name
        if not file.is_file():
            return f"{folder}: {name} is missing"
        size = file.stat().st_size
        if size != meta["bytes"]:
            return f"{file} is corrupted: expected {meta['bytes']} bytes, got {size}"
        if verify and sha256_file(file) != meta["sha256"]:
            return f"{file} is corrupted: sha256 differs from its record"
    return None


def is_complete(folder: Path) -> bool:
    """A cache entry is complete only once its marker was written as the last step."""
    return (folder / _DONE_MARKER).is_file()


def publish(tmp: Path, final: Path, usable=None) -> Path:
    """Mark ``tmp`` complete and move it to ``final`` atomically.

    Several processes may build the same entry at once: the first to publish wins and the
    others drop their copy (``usable(final)`` tells a good entry from the broken one being
    replaced; without it any complete entry counts). A broken entry is first renamed aside,
    so a reader never sees it half deleted."""
    (tmp / _DONE_MARKER).write_text("ok\n")
    good = usable if usable is not None else is_complete
    if final.exists():
        if good(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        try:
            os.replace(final, trash / "entry")
        except FileNotFoundError:  # another process moved it first
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)  # fails if another process published meanwhile
    except OSError:
        if final.exists() and good(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        raise
    return final


def staging_dir(root: Path, name: str) -> Path:
    """A fresh temporary folder beside ``root/name`` so that ``publish`` is a same-disk rename."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
