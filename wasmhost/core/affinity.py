"""The home core: where the threads that mostly run Python share the GIL.

Only one thread runs Python at a time (the GIL). When the event loop and a worker running short guest
calls sit on different cores, every hand-over of the GIL between them wakes the other core, and both
lose their caches: measured on 2 cores, guests relaying messages ran 1.4x and request round trips
1.7x faster with the whole process on one core than spread over two. So the daemon's event loop thread
and the worker threads running short calls stay on one core, the home core; a worker whose guest
computes (it runs mostly without the GIL) roams over every core the process may use, as do the
threads that work outside the GIL (the storage writer, compiles, the epoch ticker). Threads inherit
their creator's cores, so those roam from their start. The log writers go where the event loop goes:
every line the loop logs wakes one, which then wants the GIL (a restart, two lines: median 1.09 ms
with the writer on the home core, 1.39 ms with it roaming).

While a guest computes, its thread may take the home core too, and the event loop would wait there
for its turn (measured: the p99 of echoes answered next to two hogs went from 3.7 - 3.9 ms to 5.6 -
6.9 ms): so while any guest computes, the worker pool spreads the event loop and the other workers
over every core as well, and brings them home once guests have stopped computing for a moment.

Daemons on one machine take different home cores while there are enough: each holds its home by an
abstract Unix socket name for as long as it lives (`_claim`). Measured with two daemons on 2 cores
and a cross-host request between them (the lattice rows), alternating runs: 1,930 - 2,340 requests/s
and a p99 at half that rate of 11 - 31 ms (median 21 ms) on different cores, 1,510 - 2,060/s and
14 - 51 ms (median 34 ms) on one. Those names live in the network namespace: daemons in different
ones (systemd's `PrivateNetwork=`) do not see each other's, and are given their cores by
`CPUAffinity=` instead (deploy/README.md).

Linux only (`os.sched_setaffinity` on one thread); elsewhere, with one core, or where the system
refuses, these calls do nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading

import structlog

ALL_CORES: frozenset[int] = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
"""The cores the process may use, as it started."""
_home: frozenset[int] | None = None
_claimed: socket.socket | None = None  # the name by which this process holds its home core (see `_claim`)
_choosing = threading.Lock()
MAX_CLAIMS_PER_CORE = 64
"""Processes on one machine that `home` spreads over the cores; beyond them, it takes the caller's core."""
CLAIM_NAMES = "wasmhost/home-core"
"""Where the abstract socket names of the claims live: `{CLAIM_NAMES}/{core}/{rank}`."""


def home() -> frozenset[int]:
    """The home core, chosen at the first call: the first core, starting with the one the caller runs
    on, that no other process on this machine holds as its home (`_claim`), so that daemons started
    side by side settle on different cores; when each core is held, the one held by the fewest.
    Empty when there is no choice to make."""
    global _home
    if _home is None:
        with _choosing:  # the first callers may be several threads at once: one choice, one claim
            if _home is None:
                _home = _choose_home() if len(ALL_CORES) > 1 else frozenset()
    return _home


def _choose_home() -> frozenset[int]:
    cores = sorted(ALL_CORES)
    current = _current_core()
    start = cores.index(current) if current in ALL_CORES else 0
    order = cores[start:] + cores[:start]
    try:
        for rank in range(MAX_CLAIMS_PER_CORE):
            for core in order:
                if _claim(core, rank):
                    return frozenset({core})
    except OSError as exc:  # no abstract sockets here: choose alone
        structlog.get_logger("wasmhost.affinity").warning("home_core_claim_unavailable", error=str(exc))
    return frozenset({order[0]})


def _claim(core: int, rank: int) -> bool:
    """Hold `core` as this process's home, as its `rank`-th holder on this machine, for as long as the
    process lives: an abstract Unix socket name (Linux), which the kernel frees when the process ends,
    however it ends. False when another process holds that name; OSError when there are no such names."""
    global _claimed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(f"\0{CLAIM_NAMES}/{core}/{rank}")
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            return False
        raise
    _claimed = sock
    return True


def leave_home() -> None:
    """This process hosts no event loop any more (a benchmark or test that ran actors in-process is
    done): the calling thread roams, and the home core is given up for other processes to take. With
    no home chosen yet, none is chosen (nor claimed) just to be left."""
    global _home
    roam()
    with _choosing:
        _release_claim()
        _home = None


def _release_claim() -> None:
    """Give the claimed home core up (with `_choosing` held)."""
    global _claimed
    if _claimed is not None:
        _claimed.close()
        _claimed = None


def _current_core() -> int:
    """The core the calling thread runs on now (-1 when unknown)."""
    try:
        return int(ctypes.CDLL(None, use_errno=True).sched_getcpu())
    except (OSError, AttributeError):
        return -1


_anchored: set[int] = set()  # native ids of the threads `spread` moves (the event loop's, the log writers')


def anchor() -> None:
    """Keep the calling thread (the event loop's, or one the event loop wakes often: a log writer) on
    the home core while no guest computes; `spread` moves it. Threads it starts inherit the cores it
    has then."""
    _anchored.add(threading.get_native_id())
    _place(home())


def spread(out: bool) -> None:
    """Let the anchored threads run on every core (`out`: a guest computes, and the home core may be
    busy with it), or bring them home again."""
    if home():
        for thread in list(_anchored):
            _place(ALL_CORES if out else home(), thread)


def stay_home() -> None:
    """Keep the calling thread on the home core (threads it starts from now on inherit that)."""
    _place(home())


def roam() -> None:
    """Let the calling thread run on every core the process may use (and no longer be anchored). With
    no home chosen (yet, or since `leave_home`), none is chosen (nor claimed) just to roam: a log
    writer ending after its process left home must not claim a core again."""
    _anchored.discard(threading.get_native_id())
    if _home:
        _place(ALL_CORES)


def _place(cores: frozenset[int], thread: int = 0) -> None:
    """Pin `thread` (0: the calling one) to `cores`; if the system refuses (a core taken away since
    the start, a sandbox without the call), placing is given up for good and threads stay where they
    are. A thread that has ended is forgotten."""
    global _home
    if not cores:
        return
    try:
        os.sched_setaffinity(thread, cores)
    except ProcessLookupError:
        _anchored.discard(thread)
    except OSError as exc:
        with _choosing:
            _home = frozenset()
            _release_claim()  # a core it will not keep to is no home: other daemons may take it
        structlog.get_logger("wasmhost.affinity").warning("core_placement_unavailable", error=str(exc))
