"""Crash-safe file writes (temporary file beside the target, fsync, rename, fsync the folder) and file checksums."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

# Windows opens no folder for flushing (NTFS journals a folder's entries itself)
FLUSH_FOLDERS = os.name != "nt"


class atomic_file:
    """A binary file written to ``<path>.<random>.tmp`` and renamed to ``path`` after ``fsync`` on success."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> io.BufferedWriter:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".", suffix=".tmp")
        self.tmp = Path(tmp)
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                fsync_path(self.path.parent)
        finally:
            self.tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    with atomic_file(path) as f:
        f.write(data)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk; a folder only where :data:`FLUSH_FOLDERS`."""
    if not FLUSH_FOLDERS and os.path.isdir(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
