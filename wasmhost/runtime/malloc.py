"""Handing freed heap memory back to the operating system after large value conversions.

engine.py keeps large allocations in glibc's heap (a 256 MiB trim threshold) because mmap/munmap
per call made 1 MiB calls 2.5x slower; the price was that hundreds of MiB freed after a burst of
large messages stayed resident. `release_free_memory` trims every arena explicitly, and is called
only after a large payload was handled, where it costs little next to the conversion itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_libc: Any = None


def _malloc_trim() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    return getattr(_libc, "malloc_trim", None) if _libc else None


def release_free_memory() -> bool:
    """Return free heap memory of every malloc arena to the OS (glibc); False where unsupported."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True
