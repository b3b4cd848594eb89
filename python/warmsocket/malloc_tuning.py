"""Keep glibc's allocator from handing memory back to the OS after every large request.

With an upstream, every turn builds and frees buffers the size of the whole context
(the request body, the context's JSON). glibc serves allocations above its mmap
threshold with fresh `mmap`s and trims the heap top on `free`, so each such buffer
costs page faults: building a 150 KB body measured 142 us per turn instead of 8 us
on the reference machine. Raising both thresholds keeps that memory in the process
(bounded by the peak size of those buffers). Linux/glibc only; elsewhere a no-op.
Set WARMSOCKET_MALLOC_TUNING=0 to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's largest allowed value on 64-bit systems."""
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. Returns whether it did."""
    if not sys.platform.startswith("linux") or os.environ.get("WARMSOCKET_MALLOC_TUNING") == "0":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
