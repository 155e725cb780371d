"""Keep a training step's freed memory in the process instead of handing it back to the kernel.

Why: glibc's malloc serves large blocks with ``mmap`` and trims the heap's free top once it
exceeds twice its (adaptive) mmap threshold, a few megabytes, so a step's temporaries
(activations, gradients, padded histories: tens of megabytes) go back to the kernel when freed
and are page-faulted back in, zeroed, at the next step: thousands of minor faults a step in a
fine-tuning run, none with the thresholds below (``tests/test_allocator.py``; what it is worth
end to end: ``benchmarks/README.md``).
A step's working set then stays mapped: the process holds at most its peak plus
:data:`TRIM_THRESHOLD` of free heap. Only glibc (Linux) is touched; elsewhere, and with
``GENCTR_KEEP_FREED_MEMORY=0``, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt's parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to 32 MiB (glibc's largest mmap threshold on 64-bit) from the heap, not mmap
MMAP_THRESHOLD = 32 << 20
# free heap kept before trimming (glibc's default: twice the mmap threshold, a few MiB)
TRIM_THRESHOLD = 1 << 30
ENV = "GENCTR_KEEP_FREED_MEMORY"
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True when they are set."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return False
    _applied = ok
    logger.debug("glibc malloc thresholds %s", "set" if ok else "refused")
    return ok
