"""A process-wide byte budget for handing large payloads to guests.

wasmtime's C API passes a `list<u8>` as one 32-byte value per byte, and wasmtime converts that
again into 48-byte values of its own, and the same for the reply: an echo of S bytes transiently
needs about 160 x S of host memory (measured: 320 MiB for 2 MiB). Nothing cheaper exists in the C
API of wasmtime 50, so this budget bounds how many such conversions run at once: an actor waits
(on the event loop, holding no worker thread) until the payload bytes it is about to hand a guest
fit, in arrival order. A payload larger than the whole budget runs alone. What a guest produces
(its reply, a payload it sends, a value it stores) is converted during its own call, before the host sees its size;
an actor whose guest recently produced a large payload budgets its next calls for that size too.

Freed conversion memory sits in glibc's per-thread arenas; each large call is followed by a trim on
its worker thread (actor.py), and once the budget has been idle for IDLE_TRIM_S the replies and
envelopes of the burst are gone too, so one more trim hands the rest back to the OS (both coalesced by
malloc.Trimmer).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from wasmhost.runtime import malloc

LARGE_PAYLOAD = 64 * 1024
"""Payloads from this size on are budgeted (and handled one per hop to a worker thread)."""

DEFAULT_BUDGET_BYTES = 1024 * 1024
"""Payload bytes converted at once across the process: a transient window of about 200 MiB."""
IDLE_TRIM_S = 0.5
"""Seconds without large conversions after which free heap memory is handed back to the OS."""
IDLE_TRIM_WAIT_S = 10.0
"""At most this long an idle trim waits for its turn (it comes within malloc.TRIM_GAP_S plus one trim)."""


class ConversionBudget:
    """Counts payload bytes being converted; `reserve` waits (first come, first served) for room."""

    def __init__(self, total_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if total_bytes <= 0:
            raise ValueError(f"conversion budget must be > 0 bytes, got {total_bytes}")
        self.total_bytes = total_bytes
        self.in_use = 0
        self.peak_waiters = 0
        self.idle_trims = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Reservations waiting for room."""
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self.in_use == 0 or self.in_use + size <= self.total_bytes

    async def acquire(self, size: int) -> int:
        """Wait for and take `size` bytes (all of the budget when `size` is larger); returns what was
        taken, to give back with `release`. Cancelled while waiting, it takes nothing."""
        size = min(size, self.total_bytes)
        if self._waiters or not self._fits(size):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (size, future)
            self._waiters.append(entry)
            self.peak_waiters = max(self.peak_waiters, len(self._waiters))
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self.release(size)  # granted just as we were cancelled: hand it on
                elif entry in self._waiters:
                    self._waiters.remove(entry)
                raise
        else:
            self.in_use += size
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        return size

    def release(self, size: int) -> None:
        """Give back `size` bytes taken by `acquire` (event loop only)."""
        self._release(size)
        if self.in_use == 0:  # restart the idle timer (a stale one may belong to a closed loop)
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(IDLE_TRIM_S, self._trim_when_idle, loop)

    @asynccontextmanager
    async def reserve(self, size: int) -> AsyncIterator[None]:
        """Hold `size` bytes of the budget (all of it when `size` is larger) for the block."""
        taken = await self.acquire(size)
        try:
            yield
        finally:
            self.release(taken)

    def _trim_when_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        self._idle_timer = None
        if self.in_use == 0:
            # off the loop: a trim walks every arena. A timer callback has no task group to start a task in;
            # the default executor is joined by the loop on exit, and a trim takes milliseconds
            loop.run_in_executor(None, self._trim)

    def _trim(self) -> None:
        # merged with the trims large calls asked for (malloc.Trimmer): a guest pacing its calls just past
        # IDLE_TRIM_S would otherwise get a trim, and its stall of every allocating thread, per call
        trimmer = malloc.TRIMMER
        trimmer.wait(trimmer.request(), IDLE_TRIM_WAIT_S)
        self.idle_trims += 1  # counted once done, so a caller waiting on it sees the memory back

    def _release(self, size: int) -> None:
        self.in_use -= size
        while self._waiters and self._fits(self._waiters[0][0]):
            size, future = self._waiters.popleft()
            if future.cancelled():
                continue
            self.in_use += size
            future.set_result(None)


CONVERSIONS = ConversionBudget()
"""The budget every actor of this process shares."""
