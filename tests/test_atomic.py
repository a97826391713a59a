"""Crash-safe writes: the new file or the old one, never a part, and no temporary files left."""

from __future__ import annotations

import os

import pytest

from bmojo import atomic
from bmojo.atomic import atomic_file, atomic_write, fsync_path


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_file(path) as f:
            f.write(b"half of the ne")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_folders_are_not_opened_on_windows(tmp_path, monkeypatch):
    """Windows refuses to open a folder (``PermissionError``), so its entries are not flushed there; files still are."""
    assert atomic.FLUSH_FOLDERS == (os.name != "nt")
    opened = []
    real_open = os.open

    def windows_open(path, flags, *args):
        if os.path.isdir(path):
            raise PermissionError(13, "Permission denied", str(path))
        opened.append(str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(atomic.os, "open", windows_open)
    with pytest.raises(PermissionError):  # elsewhere a folder is flushed, so the refusal would surface
        fsync_path(tmp_path)
    monkeypatch.setattr(atomic, "FLUSH_FOLDERS", False)
    fsync_path(tmp_path)
    atomic_write(tmp_path / "f.bin", b"data")
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    fsync_path(tmp_path / "f.bin")
    assert str(tmp_path / "f.bin") in opened
