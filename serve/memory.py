"""Handing freed heap memory back to the operating system.

glibc keeps the pages of freed allocations in its arenas (gRPC's threads each get one), so after a
burst of streams the process's RSS stays near its peak although the memory is free. malloc_trim
returns it; elsewhere (another libc) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_libc = None


def release_free_memory() -> bool:
    """malloc_trim(0): True if memory was returned to the system."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    return bool(_libc and _libc.malloc_trim(0))
