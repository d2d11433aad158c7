"""Crash-safe index directories.

An index directory holds numbered versions and a `CURRENT` file naming the
live one. A save writes a complete new version (files fsynced, manifest with
sha256 of every file written last), then swaps `CURRENT` with an atomic
rename, then removes older versions. A crash at any point leaves `CURRENT`
naming a complete version, so a failed save never damages the previous index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from rag_engine.checksum import sha256_file
from rag_engine.errors import IndexFormatError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"


_VERSION_NAME = re.compile(r"v\d{6}")


def _versions(root: Path) -> list[Path]:
    """The version folders of `root` (v + six digits); anything else there is not ours."""
    return [p for p in root.iterdir() if p.is_dir() and _VERSION_NAME.fullmatch(p.name)]


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_version(root: Path) -> Path:
    """Empty folder for the next version (named after the highest existing one + 1)."""
    root.mkdir(parents=True, exist_ok=True)
    nums = [int(p.name[1:]) for p in _versions(root)]
    path = root / f"v{max(nums, default=0) + 1:06d}"
    if path.exists():  # leftover of a crashed save: never live, safe to drop
        shutil.rmtree(path)
    path.mkdir()
    return path


def commit_version(root: Path, version: Path, manifest: dict) -> None:
    """Write the manifest (with checksums), fsync everything, then flip CURRENT."""
    files = sorted(p for p in version.rglob("*") if p.is_file())
    manifest = dict(manifest, format_version=FORMAT_VERSION,
                    files={str(p.relative_to(version)): sha256_file(p) for p in files})
    (version / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for p in [*files, version / MANIFEST]:
        _fsync_path(p)
    for d in {p.parent for p in files} | {version}:
        _fsync_path(d)
    tmp = root / f"{CURRENT}.tmp"
    tmp.write_text(version.name + "\n")
    _fsync_path(tmp)
    os.replace(tmp, root / CURRENT)
    _fsync_path(root)
    for old in _versions(root):
        if old != version:
            shutil.rmtree(old, ignore_errors=True)


def open_version(root: Path, verify: bool = True) -> tuple[Path, dict]:
    """(live version folder, manifest); checks format version and, if `verify`, checksums."""
    root = Path(root)
    if not (root / CURRENT).is_file():
        raise FileNotFoundError(f"{root} is not an index directory (no {CURRENT} file)")
    version = root / (root / CURRENT).read_text().strip()
    try:
        manifest = json.loads((version / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{version}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{version}: {MANIFEST} must hold a JSON object, got {type(manifest).__name__}")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise IndexFormatError(f"{root}: index format version {fv}, this engine reads version {FORMAT_VERSION}")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            path = version / rel
            if not path.is_file():
                raise IndexFormatError(f"{root}: file {rel} listed in the manifest is missing")
            if sha256_file(path) != digest:
                raise IndexFormatError(f"{root}: checksum mismatch for {rel} (file damaged or modified)")
    return version, manifest
