"""Keep freed large blocks in the process heap (glibc only), so batch passes do not page-fault.

A batch Jacobian allocates tangent blocks of 10-100 MB per layer. glibc serves blocks above
its mmap threshold with fresh ``mmap`` pages and unmaps them on free, so every call pays the
kernel for zeroed pages again: measured on the 784-512-512-512-10 MLP at batch 256 (float64,
``python bench/passes.py``), 25-40% of the Jacobian's time went to first-touch page faults.
Raising the mmap and trim thresholds keeps those pages mapped for the next call. The heap then
holds on to up to ``TRIM_BYTES`` of free memory; set ``PBXC_MALLOC_TUNING=0`` to leave the
allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD_BYTES = 256 << 20   # blocks below this come from the reusable heap
TRIM_BYTES = 512 << 20             # free heap top kept before returning memory to the OS
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # <malloc.h>
_tuned: bool | None = None


def tune_allocator() -> bool:
    """Once per process: raise glibc's thresholds. True when they were set."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux") and os.environ.get("PBXC_MALLOC_TUNING", "1") != "0":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):   # musl and other libcs: nothing to tune
                return False
            _tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    return _tuned
