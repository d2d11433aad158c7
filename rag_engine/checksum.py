"""sha256 of files, read in 4 MiB blocks (export manifests, index manifests, cache keys)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def update_from_file(digest: Any, path: Path) -> None:
    """Feed the bytes of `path` to a hashlib digest."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    update_from_file(digest, path)
    return digest.hexdigest()
