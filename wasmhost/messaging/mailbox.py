"""A bounded, thread-safe mailbox: guests on worker threads enqueue, the actor task drains it.

Waking an idle actor from a worker thread costs a loop wake-up (`call_soon_threadsafe`). While an
actor handles a batch, its guest's sends and requests only note which mailboxes to wake
(`deferring_wakes`): they are woken together with one loop call at the next slice boundary, when
the guest is about to wait in a host call (`flush_wakes`), or when the batch ends. So a batch that
sends 64 messages costs one wake-up, not 64, and the receiver finds them all queued at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable, Generator
from typing import TypeVar

from wasmhost.messaging.envelope import Envelope

T = TypeVar("T")

_deferred = threading.local()  # .wakes: the mailboxes to wake after this thread's current step, or None;
# .loop: the loop that wakes them


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
        """No new envelopes (sealed or closed); callbacks still come in until `close`."""
        self._ended = False  # closed: not even callbacks
        self.on_filled: Callable[[], None] | None = None
        """Called (on the thread that filled it) when the mailbox goes from empty to not empty: its
        actor's `status` row shows the queue (see actors/changes.py)."""

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        self._ready.set()

    def _signal(self) -> None:
        if _on_loop(self.loop):
            self._ready.set()
            return
        wakes: list[Mailbox] | None = getattr(_deferred, "wakes", None)
        if wakes is not None:
            wakes.append(self)  # a guest's send within a batch: woken with the others (see the module docstring)
        else:  # anyio's from_thread would block that thread until the loop runs it
            self.loop.call_soon_threadsafe(self._wake)

    def offer(self, envelope: Envelope) -> bool:
        """Enqueue from any thread; False when the mailbox is full or closed."""
        return self._append(envelope, bounded=True)

    def force(self, envelope: Envelope) -> bool:
        """Enqueue past the capacity (for callbacks answering this actor's own requests); False once
        closed. A sealed mailbox, being drained, still takes them: its actor may still handle them."""
        return self._append(envelope, bounded=False)

    def _append(self, envelope: Envelope, bounded: bool) -> bool:
        with self._lock:
            if (self.closed if bounded else self._ended) or (bounded and len(self._items) >= self.capacity):
                return False
            was_empty = not self._items
            self._items.append(envelope)
        if was_empty:
            if self.on_filled is not None:
                self.on_filled()
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
            if self.on_filled is not None:
                self.on_filled()
            self._ready.set()

    async def take(self, limit: int, timeout: float | None = None) -> list[Envelope]:
        """Up to `limit` envelopes, waiting up to `timeout` seconds for the first one (event loop only);
        none when the time ran out or `wake` came first."""
        if not self._items:
            self._ready.clear()
            if not self._items:
                await self._wait_ready(timeout)
        with self._lock:
            count = min(limit, len(self._items))
            batch = [self._items.popleft() for _ in range(count)]
        self._space.set()
        return batch

    async def _wait_ready(self, timeout: float | None) -> None:
        if timeout is None:
            await self._ready.wait()
            return
        # A timer that wakes the wait instead of asyncio.wait_for, which makes a task per wait: 8 against
        # 18 us per wait (measured), paid by every idle actor a message wakes.
        timer = self.loop.call_later(timeout, self._ready.set)
        try:
            await self._ready.wait()
        finally:
            timer.cancel()

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
            self.closed = self._ended = True
            remaining = list(self._items)
            self._items.clear()
        self._ready.set()
        self._space.set()
        return remaining

    def reopen(self) -> None:
        """Accept envelopes again (after a stopped actor is started anew)."""
        with self._lock:
            self.closed = self._ended = False


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def deferring_wakes(steps: Generator[float, None, T], loop: asyncio.AbstractEventLoop,
                    wakes: list[Mailbox]) -> Generator[float, None, T]:
    """Run `steps` (a guest call's time slices, one per worker step) collecting the mailboxes its
    sends fill into `wakes` instead of waking each one; at every slice boundary those collected so
    far are woken with one loop call. What the last step collects is left in `wakes` for the
    caller to wake on the loop (with `wake_all`), also when the steps fail or are closed."""
    while True:
        previous = getattr(_deferred, "wakes", None), getattr(_deferred, "loop", None)
        _deferred.wakes, _deferred.loop = wakes, loop
        try:
            deadline = next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        finally:
            _deferred.wakes, _deferred.loop = previous
        if wakes:
            _wake_later(loop, wakes)
        try:
            yield deadline
        except GeneratorExit:
            steps.close()  # abandons the call in progress, on this thread, as `yield from` would
            raise


def flush_wakes() -> None:
    """Wake now what the calling thread's guest call has sent so far (it is about to wait in a host
    call: its sends must not wait for that); a no-op outside `deferring_wakes`."""
    wakes: list[Mailbox] | None = getattr(_deferred, "wakes", None)
    if wakes:
        _wake_later(_deferred.loop, wakes)


def _wake_later(loop: asyncio.AbstractEventLoop, wakes: list[Mailbox]) -> None:
    """Hand `wakes` to the loop in one call (from a worker thread) and empty it."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these messages any more
        loop.call_soon_threadsafe(wake_all, wakes[:])
    wakes.clear()


def wake_all(mailboxes: list[Mailbox]) -> None:
    """Wake the actors of `mailboxes` (event loop only)."""
    for mailbox in mailboxes:
        mailbox.wake()
