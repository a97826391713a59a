"""Keep freed memory inside the process (Linux, glibc), so that a training step reuses the memory of the last one.

glibc returns the free top of the heap to the operating system once it exceeds a trim threshold (by default twice
the largest chunk freed so far) and serves large allocations by fresh ``mmap`` calls; every such buffer is then
zero-filled page by page by the kernel on first touch, on every step. A B'MOJO training step makes many large
intermediate tensors (band key slots, scan chunks, their gradients), so on CPU it pays this again each step: on the
project's 2-core machine, 2K-token training of the bench's 5M-parameter B'MOJO runs 6-7% faster with the settings
here (an SDPA Transformer of the same size does not change; ``benchmarks/RESULTS.md``). The price is that the process
keeps up to ``TRIM_THRESHOLD`` bytes of freed memory instead of returning it.

``bmojo`` commands apply it at start-up; ``BMOJO_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 32 << 20  # allocations up to this size come from the heap (glibc's largest allowed value, 64-bit)
TRIM_THRESHOLD = 1 << 30  # free heap top kept before any is returned to the operating system
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_applied = False


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (``mallopt``) for the whole process; whether they were set (False off
    Linux/glibc or with ``BMOJO_KEEP_FREED_MEMORY=0``)."""
    global _applied
    if os.environ.get("BMOJO_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def kept() -> bool:
    """Whether :func:`keep_freed_memory` has applied its settings in this process."""
    return _applied
