"""bmojo.malloc: freed memory stays in the process once the thresholds are set (Linux/glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource, sys
from bmojo.malloc import keep_freed_memory, kept
applied = keep_freed_memory() if sys.argv[1] == "on" else False
assert kept() == applied
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
buffers = [ctypes.create_string_buffer(8 << 20) for _ in range(16)]  # 128 MiB, zero-filled (touched)
peak = resident()
del buffers
print(applied, (peak - resident()) / (128 << 20))
"""


def _returned(mode: str, env: dict | None = None) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
    applied, fraction = out.stdout.split()
    return applied == "True", float(fraction)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_keep_freed_memory_keeps_freed_buffers_resident():
    applied, returned = _returned("on")
    if not applied:
        pytest.skip("not glibc")
    assert returned < 0.1  # kept for the next allocations
    _, returned_default = _returned("off")
    assert returned_default > 0.9  # glibc's default hands 8 MiB buffers back (mmap) as they are freed


def test_keep_freed_memory_can_be_turned_off(monkeypatch):
    import bmojo.malloc as malloc

    monkeypatch.setenv("BMOJO_KEEP_FREED_MEMORY", "0")
    monkeypatch.setattr(malloc, "_applied", False)
    assert malloc.keep_freed_memory() is False and malloc.kept() is False
