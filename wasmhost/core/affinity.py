"""The home core: where the threads that mostly run Python share the GIL.

Only one thread runs Python at a time (the GIL). When the event loop and a worker running short guest
calls sit on different cores, every hand-over of the GIL between them wakes the other core, and both
lose their caches: measured on 2 cores, guests relaying messages ran 1.4x and request round trips
1.7x faster with the whole process on one core than spread over two. So the daemon's event loop thread
and the worker threads running short calls stay on one core, the home core; a worker whose guest
computes (it runs mostly without the GIL) roams over every core the process may use, as do the
threads that work outside the GIL (the storage writer, compiles, the epoch ticker). Threads inherit
their creator's cores, so those roam from their start.

Linux only (`os.sched_setaffinity` on one thread); elsewhere, with one core, or where the system
refuses, both calls do nothing.
"""

from __future__ import annotations

import ctypes
import os

import structlog

ALL_CORES: frozenset[int] = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
"""The cores the process may use, as it started."""
_home: frozenset[int] | None = None


def home() -> frozenset[int]:
    """The home core: the one the first thread to stay home ran on then, so that several daemons on
    one machine tend to settle on different cores (empty when there is no choice to make)."""
    global _home
    if _home is None:
        current = _current_core()
        _home = frozenset({current if current in ALL_CORES else min(ALL_CORES)}) if len(ALL_CORES) > 1 else frozenset()
    return _home


def _current_core() -> int:
    """The core the calling thread runs on now (-1 when unknown)."""
    try:
        return int(ctypes.CDLL(None, use_errno=True).sched_getcpu())
    except (OSError, AttributeError):
        return -1


def stay_home() -> None:
    """Keep the calling thread on the home core (threads it starts from now on inherit that)."""
    _place(home())


def roam() -> None:
    """Let the calling thread run on every core the process may use."""
    if home():
        _place(ALL_CORES)


def _place(cores: frozenset[int]) -> None:
    """Pin the calling thread to `cores`; if the system refuses (a core taken away since the start,
    a sandbox without the call), placing is given up for good and threads stay where they are."""
    global _home
    if not cores:
        return
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        _home = frozenset()
        structlog.get_logger("wasmhost.affinity").warning("core_placement_unavailable", error=str(exc))
