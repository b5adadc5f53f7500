"""glibc's heap under wasmtime's large value conversions: how it is tuned, and handing freed memory
back to the operating system.

`keep_large_allocations_in_heap` (called once by the engine) keeps large allocations in glibc's heap
(a 256 MiB trim threshold) because mmap/munmap per call made 1 MiB calls 2.5x slower; the price was
that hundreds of MiB freed after a burst of large messages stayed resident. `release_free_memory`
trims explicitly; after a large payload was handled the host asks for one with `trim_soon`, which
coalesces them (`Trimmer`): a trim holds the heap's lock while it walks it (5 - 36 ms measured after
2 MB stored values and 900,000-pair log contexts), stalling every thread that allocates, the event
loop included, so a guest repeating such calls must not make one per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("wasmhost.malloc")

_libc: Any = None


def _libc_function(name: str) -> Any:
    """A function of the C library, or None where there is none (not glibc)."""
    global _libc
    if _libc is None:
        path = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(path) if path else False
    return getattr(_libc, name, None) if _libc else None


def keep_large_allocations_in_heap() -> None:
    """Stop glibc from mmap/munmap-ing every large value array wasmtime allocates per call.

    Measured on the echo guest: 64 KiB payloads 201 -> 489 calls/s, 1 MiB 12 -> 30 calls/s.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_arena_max = -1, -2, -3, -8
    # One arena: malloc_trim can hand back only the main arena's top, so memory freed in per-thread
    # arenas after large conversions stayed resident (measured: 219 MiB after six guests sent 2 MiB
    # five times each; 14 MiB with one arena).
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    mallopt(m_trim_threshold, 256 * 1024 * 1024)
    mallopt(m_top_pad, 16 * 1024 * 1024)


def release_free_memory() -> bool:
    """Return free heap memory to the OS (glibc); False where unsupported."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(ctypes.c_size_t(0))
    return True


TRIM_GAP_S = 1.0
"""Least time from the end of one coalesced trim to the start of the next: the share of time the heap's
lock can be held by trims asked for with `trim_soon` (at most some 4% at the 36 ms measured)."""


class Trimmer:
    """Coalesces trims asked for from any thread: at most one per `gap` seconds, none twice at once.

    A trim asked for while none ran for `gap` seconds is done at once by the asking thread (a lone large
    call hands its memory back before it is answered, as before); one asked for sooner, or while one
    runs, is merged with every other such request into a single trim, done by the trimmer's own thread
    `gap` seconds after the last one ended. So a trim starts at most `gap` seconds after each request,
    or after the end of the trim running when it came, whichever is later: within `gap` plus one trim
    (1.0 s + 5 - 50 ms measured) of the memory being freed.
    """

    def __init__(self, gap: float = TRIM_GAP_S, trim: Callable[[], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gap = gap
        self.trims = 0
        """Trims done (counted once done)."""
        self._trim_function = trim
        self._clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._last_end = -math.inf
        self._started = 0
        self._running = False
        self._pending = False
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> bool:
        """A trim was asked for and is not yet done (or not yet started)."""
        with self._lock:
            return self._pending

    def settle(self, timeout: float) -> bool:
        """Wait until no trim is asked for or running (at most `timeout` seconds); False if one still is."""
        with self._lock:
            return self._changed.wait_for(lambda: not self._pending and not self._running, timeout)

    def request(self) -> int:
        """Ask for a trim: done now, or merged into one the trimmer's thread does within `gap` seconds.
        Returns a ticket for `wait`."""
        with self._lock:
            ticket = self._started + 1  # the next trim to start covers this request (trims run one at a time)
            if self._running or self._clock() - self._last_end < self.gap:
                self._pending = True
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="wasmhost-trim", daemon=True)
                    self._thread.start()
                self._changed.notify_all()
                return ticket
            self._start()
        self._do_trim()
        return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        """Wait (at most `timeout` seconds) until the trim `ticket` asked for is done; False if it is not."""
        with self._lock:
            return self._changed.wait_for(lambda: self.trims >= ticket, timeout)

    def _start(self) -> None:
        self._running = True
        self._started += 1

    def _do_trim(self) -> None:
        try:
            (self._trim_function or release_free_memory)()
        finally:
            with self._lock:
                self._running = False
                self._last_end = self._clock()
                self.trims += 1
                self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    wait = self.gap - (self._clock() - self._last_end)
                    if self._pending and not self._running and wait <= 0:
                        break
                    # woken by a request or a trim's end; otherwise once the gap is over
                    self._changed.wait(wait if self._pending and not self._running else None)
                self._pending = False
                self._start()
            try:
                self._do_trim()
            except Exception:  # keep serving later requests: no trim would be done again otherwise
                log.exception("heap_trim_failed")


TRIMMER = Trimmer()
"""The process's trimmer: every trim asked for after a large conversion or a metrics scrape goes through it."""


def trim_soon() -> int:
    """Hand free heap memory back to the OS now or within `TRIM_GAP_S` seconds (see `Trimmer`); returns the
    ticket to wait for it with `TRIMMER.wait`."""
    return TRIMMER.request()
