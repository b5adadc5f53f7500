"""RequestDeadlines: the timeouts of guests' pending requests on one heap, watched by one loop timer.

Guests make requests on worker threads. Arming an event-loop timer for each one would cost a loop
wake-up per request (`call_soon_threadsafe`) and a timer to create and cancel; instead a request's
deadline goes on a heap under a lock, and the loop is woken only when that deadline is earlier than
the one its single timer is armed for (rare: requests mostly use the same timeout, so deadlines
arrive in order). When the timer fires, every entry that is due is expired and the timer is armed
for the next one. An answered request's entry is just forgotten; its heap entry is dropped when it
comes due or when stale entries pile up.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import threading
import time
from collections.abc import Callable

COMPACT_AFTER = 1024
"""Stale heap entries (answered requests) tolerated before the heap is rebuilt without them."""


class RequestDeadlines:
    """Deadlines by correlation id; `expire(correlation_id)` is called on the loop when one passes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expire: Callable[[str], None]) -> None:
        self.loop = loop
        self._expire = expire
        self._lock = threading.Lock()
        self._heap: list[tuple[float, str]] = []
        self._live: dict[str, float] = {}  # correlation id -> its deadline (time.monotonic())
        self._armed_for = math.inf  # the deadline the loop's timer is (or is about to be) armed for
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._live)

    def add(self, correlation_id: str, seconds: float) -> None:
        """Expire `correlation_id` in `seconds` unless it is discarded first (any thread)."""
        deadline = time.monotonic() + seconds
        with self._lock:
            self._live[correlation_id] = deadline
            heapq.heappush(self._heap, (deadline, correlation_id))
            if len(self._heap) > COMPACT_AFTER and len(self._heap) > 2 * len(self._live):
                self._heap = [entry for entry in self._heap if self._live.get(entry[1]) == entry[0]]
                heapq.heapify(self._heap)
            rearm = deadline < self._armed_for
            if rearm:
                self._armed_for = deadline
        if rearm:
            if _on_loop(self.loop):
                self._arm()
            else:
                self.loop.call_soon_threadsafe(self._arm)

    def discard(self, correlation_id: str) -> None:
        """The request was answered or cancelled: it does not expire (any thread)."""
        with self._lock:
            self._live.pop(correlation_id, None)

    def _arm(self) -> None:
        """(Re)arm the loop's one timer for the earliest live deadline (event loop only)."""
        with self._lock:
            heap = self._heap
            while heap and self._live.get(heap[0][1]) != heap[0][0]:
                heapq.heappop(heap)  # answered meanwhile
            earliest = heap[0][0] if heap else math.inf
            self._armed_for = earliest
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if heap:
                self._timer = self.loop.call_later(max(0.0, earliest - time.monotonic()), self._fire)

    def _fire(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            self._timer = None
            heap = self._heap
            while heap and heap[0][0] <= now:
                deadline, correlation_id = heapq.heappop(heap)
                if self._live.get(correlation_id) == deadline:
                    del self._live[correlation_id]
                    due.append(correlation_id)
        try:
            for correlation_id in due:
                self._expire(correlation_id)
        finally:
            self._arm()  # whatever an expiry raised, the later deadlines still get their timer

    def close(self) -> None:
        """Forget every deadline and disarm the timer (event loop only)."""
        with self._lock:
            self._live.clear()
            self._heap.clear()
            self._armed_for = math.inf
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
