"""A bounded, thread-safe mailbox: guests on worker threads enqueue, the actor task drains it."""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from wasmhost.messaging.envelope import Envelope


class Mailbox:
    """FIFO of envelopes with a fixed capacity; `offer` never blocks and never grows past it."""

    def __init__(self, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        if capacity <= 0:
            raise ValueError(f"mailbox capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.loop = loop
        self._items: deque[Envelope] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        self._ready.set()

    def _signal(self) -> None:
        if _on_loop(self.loop):
            self._ready.set()
        else:  # a guest's send on a worker thread: anyio's from_thread would block that thread until the loop runs it
            self.loop.call_soon_threadsafe(self._wake)

    def offer(self, envelope: Envelope) -> bool:
        """Enqueue from any thread; False when the mailbox is full or closed."""
        return self._append(envelope, bounded=True)

    def force(self, envelope: Envelope) -> bool:
        """Enqueue past the capacity (for callbacks answering this actor's own requests); False when closed."""
        return self._append(envelope, bounded=False)

    def _append(self, envelope: Envelope, bounded: bool) -> bool:
        with self._lock:
            if self.closed or (bounded and len(self._items) >= self.capacity):
                return False
            was_empty = not self._items
            self._items.append(envelope)
        if was_empty:
            self._signal()
        return True

    async def put(self, envelope: Envelope) -> bool:
        """Enqueue from the event loop, waiting for room instead of failing; False when closed."""
        while True:
            if self.offer(envelope):
                return True
            if self.closed:
                return False
            self._space.clear()
            await self._space.wait()

    def withdraw(self, envelope: Envelope) -> bool:
        """Remove `envelope` if it is still queued (its sender gave up on it); False when the actor
        has taken it already (or it was never queued)."""
        with self._lock:
            # by identity: two envelopes with equal contents are still two messages
            index = next((i for i, queued in enumerate(self._items) if queued is envelope), None)
            if index is None:
                return False
            del self._items[index]
        self._space.set()
        return True

    def requeue_front(self, envelopes: list[Envelope]) -> None:
        """Put envelopes taken but not processed back at the head, in order (may exceed capacity)."""
        with self._lock:
            self._items.extendleft(reversed(envelopes))
        if envelopes:
            self._ready.set()

    async def take(self, limit: int, timeout: float | None = None) -> list[Envelope]:
        """Up to `limit` envelopes, waiting up to `timeout` seconds for the first one (event loop only)."""
        if not self._items:
            self._ready.clear()
            if not self._items:
                try:
                    await asyncio.wait_for(self._ready.wait(), timeout)
                except TimeoutError:
                    return []
        with self._lock:
            count = min(limit, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
        self._space.set()
        return batch

    def seal(self) -> None:
        """Refuse new envelopes but keep the queued ones for draining."""
        with self._lock:
            self.closed = True
        self._space.set()

    def wake(self) -> None:
        """Make a pending `take` return now (event loop only)."""
        self._ready.set()

    def close(self) -> list[Envelope]:
        """Refuse new envelopes and hand back everything still queued."""
        with self._lock:
            self.closed = True
            remaining = list(self._items)
            self._items.clear()
        self._ready.set()
        self._space.set()
        return remaining

    def reopen(self) -> None:
        """Accept envelopes again (after a stopped actor is started anew)."""
        with self._lock:
            self.closed = False


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
