"""Linear memories made by us for wasmtime, so each component's memory size is known.

wasmtime's C API has no way to reach the memories inside a component instance, so their sizes are
out of sight. What it does offer is the host memory creator: the engine asks us for every linear
memory and asks us again whenever one grows. Each memory is then an anonymous mapping of ours,
charged to the MemoryAccount that was current on the thread when it was created (the component
being instantiated), and its growth and release update that account (our own: no library does it).

The layout is the one wasmtime itself uses: the whole reservation plus the guard region is mapped
inaccessible, and only the memory's current size is made readable and writable. Compiled guest code
relies on that guard to elide bounds checks, so a guest access past its memory still faults and
traps, never reaching other memory.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from wasmtime import _bindings

from wasmhost.runtime import capi

_PROT_NONE = mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0
_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_MAP_FAILED = ctypes.c_void_p(-1).value

DYNAMIC_RESERVATION = 8 << 30
"""What a memory wasmtime does not need pinned (no reservation asked for) may grow to without moving;
far past any limit a Store gets, and only address space until it is used."""

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class MemoryAccount:
    """The linear-memory bytes of one component's Stores, now and at their highest."""

    bytes: int = 0
    """What its live memories hold now (their sizes, as the guest sees them)."""
    high_water: int = 0
    """The most they have held at once since the account was made."""
    memories: int = 0
    """How many of its memories are alive."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def figures(self) -> tuple[int, int]:
        """(bytes, high_water), read together."""
        with self._lock:
            return self.bytes, self.high_water

    def change(self, delta: int, memories: int = 0) -> None:
        """Add `delta` bytes (and `memories` memories); raise the high-water mark if passed."""
        with self._lock:  # grows of one Store run on one thread, but frees may come from another
            self.bytes += delta
            self.memories += memories
            if self.bytes > self.high_water:
                self.high_water = self.bytes


@dataclass
class _Region:
    """One linear memory: its mapping and the account it is charged to."""

    base: int
    mapped: int
    """Bytes mapped: the reservation plus the guard region."""
    capacity: int
    """How far it may grow without moving (the reservation)."""
    size: int
    account: MemoryAccount


class LinearMemories:
    """The engine's memory creator; `charged_to` says whose memories the current thread is making."""

    def __init__(self) -> None:
        self._regions: dict[int, _Region] = {}
        self._ids = itertools.count(1)
        self._local = threading.local()
        self.unattributed = MemoryAccount()
        """Memories made outside `charged_to` (a Store no component owns)."""
        # The callbacks must stay referenced as long as the engine lives: the engine is process-wide.
        self._get = _bindings.wasmtime_memory_get_callback_t(self._get_memory)
        self._grow = _bindings.wasmtime_memory_grow_callback_t(self._grow_memory)
        self._free = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self._finalize)
        self._new = _bindings.wasmtime_new_memory_callback_t(self._new_memory)
        self._no_finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()  # NULL: the creator lives as long as the process
        self.creator = _bindings.wasmtime_memory_creator_t(None, self._new, self._no_finalizer)

    def install(self, config: Any) -> None:
        """Make this the memory creator of an engine built from `config` (a wasmtime.Config)."""
        # wasmtime maps copy-on-write memory images only into memories it made itself (and panics
        # otherwise), so data segments are copied in at instantiation instead.
        _bindings.wasmtime_config_memory_init_cow_set(config.ptr(), False)
        _bindings.wasmtime_config_host_memory_creator_set(config.ptr(), ctypes.byref(self.creator))

    @contextmanager
    def charged_to(self, account: MemoryAccount) -> Iterator[None]:
        """Charge the memories this thread creates inside the block to `account`."""
        previous = getattr(self._local, "account", None)
        self._local.account = account
        try:
            yield
        finally:
            self._local.account = previous

    # --- the callbacks wasmtime calls (on whatever thread runs the Store; they must never raise) ---

    def _new_memory(self, _env: Any, _ty: Any, minimum: int, maximum: int, reserved: int, guard: int,
                    out: Any) -> int:
        try:
            capacity = reserved or min(maximum, DYNAMIC_RESERVATION)
            if minimum > capacity:
                return _error(f"a linear memory of {minimum} bytes does not fit its reservation of {capacity}")
            mapped = capacity + guard
            base = _mmap(None, mapped, _PROT_NONE, _MAP_FLAGS, -1, 0)
            if base in (None, _MAP_FAILED):
                return _error(f"cannot reserve {mapped} bytes for a linear memory: {_errno_text()}")
            if minimum and _mprotect(base, minimum, _PROT_RW) != 0:
                text = _errno_text()
                _munmap(base, mapped)
                return _error(f"cannot commit {minimum} bytes of a linear memory: {text}")
            account = getattr(self._local, "account", None) or self.unattributed
            key = next(self._ids)
            self._regions[key] = _Region(base, mapped, capacity, minimum, account)
            account.change(minimum, memories=1)
            memory = out.contents
            memory.env = key
            memory.get_memory = self._get
            memory.grow_memory = self._grow
            memory.finalizer = self._free
            return 0
        except BaseException as exc:  # an exception cannot cross into wasmtime
            return _error(f"linear memory creator failed: {exc!r}")

    def _get_memory(self, env: int, size_out: Any, capacity_out: Any) -> int:
        try:
            region = self._regions[env]
            size_out[0] = region.size
            capacity_out[0] = region.capacity
            return region.base
        except BaseException:  # no error can be returned here, and a wrong base would hand the guest
            os.abort()  # any memory: stop the process rather than run on (never seen; a bug of ours)

    def _grow_memory(self, env: int, new_size: int) -> int:
        try:
            region = self._regions[env]
            if new_size > region.capacity:
                return _error(f"a linear memory cannot grow to {new_size} bytes: its reservation is {region.capacity}")
            if new_size > region.size:
                if _mprotect(region.base + region.size, new_size - region.size, _PROT_RW) != 0:
                    return _error(f"cannot commit linear memory up to {new_size} bytes: {_errno_text()}")
                region.account.change(new_size - region.size)
                region.size = new_size
            return 0
        except BaseException as exc:  # an exception cannot cross into wasmtime
            return _error(f"linear memory grow failed: {exc!r}")

    def _finalize(self, env: int) -> None:
        region = self._regions.pop(env, None)
        if region is not None:
            _munmap(region.base, region.mapped)
            region.account.change(-region.size, memories=-1)


def _errno_text() -> str:
    code = ctypes.get_errno()
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


def _error(message: str) -> int:
    """A wasmtime_error_t* carrying `message`, as the integer the callbacks return."""
    return capi.error_new(message.encode()) or 0
