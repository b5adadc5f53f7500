"""ReadCache: the committed values of recently read or written small entries, so that a guest's
`get` of a hot key skips SQLite.

Measured in a direct loop of guest `get` messages: a SQLite read right after a wasm call costs
18 - 26 us (7 us in a loop of reads alone), a third of the whole message; a hit here costs one
lock and one dict lookup. Our own code because no cache library keeps a value coherent with a
writer on another thread the way this needs (see `offer`).

Coherence. Only the storage writer changes the database while the daemon runs, and it tells the
cache what it committed (`committed`) before any waiter hears of the commit. A value read from
SQLite on a worker thread is kept only if no commit happened since the read began (`generation`),
so an old value read just before a commit can never overwrite the new one. A failed commit clears
the cache: what reached the disk is then unknown.

Bounds. At most `max_bytes` (each entry counted as its key, its value and ENTRY_OVERHEAD), least
recently used first out; values above MAX_VALUE_BYTES are never kept. A guest reading many keys
evicts other components' entries, which then cost one SQLite read again: never more than without
the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final


class _Absent:
    """A key known to have no committed value."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()
MAX_VALUE_BYTES = 4096
"""Larger values are read from SQLite every time: copying them dwarfs the read itself."""
ENTRY_OVERHEAD = 240
"""Python's own bytes per entry (the key tuple, its strings, the value object, the dict slot; measured)."""
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

Cached = bytes | _Absent
"""A cached entry: the committed value, or ABSENT."""


class ReadCache:
    """Committed values by (owner, key), bounded by bytes, least recently used evicted first."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # workers read, the writer thread updates
        self.generation = 0
        """Counts commits and clears: a read that began under an older generation is not kept."""
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the entries are counted as."""
        return self._bytes

    def lookup(self, owner: str, key: str) -> Cached | None:
        """The cached entry of `key`, or None when it is not cached."""
        with self._lock:
            entry = self._entries.get((owner, key))
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end((owner, key))
            return entry

    def offer(self, owner: str, key: str, value: bytes | None, generation: int) -> None:
        """Keep what a read that began at `generation` found, unless a commit came since."""
        with self._lock:
            if generation == self.generation:
                self._put(owner, key, ABSENT if value is None else value)

    def committed(self, writes: Iterable[tuple[str, str, bytes | None]]) -> None:
        """The writer committed `writes` ((owner, key, value or None for a delete), the last per
        key winning): cache them, before any waiter learns of the commit."""
        with self._lock:
            self.generation += 1
            for owner, key, value in writes:
                self._put(owner, key, ABSENT if value is None else value)

    def clear(self) -> None:
        """Forget everything (a commit failed: the disk's state is unknown)."""
        with self._lock:
            self.generation += 1
            self._entries.clear()
            self._bytes = 0

    def _put(self, owner: str, key: str, entry: Cached) -> None:
        """Store or replace one entry and evict down to max_bytes (under the lock)."""
        size = len(entry) if isinstance(entry, bytes) else 0
        old = self._entries.pop((owner, key), None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        if size > MAX_VALUE_BYTES or self.max_bytes <= 0:
            return
        self._entries[(owner, key)] = entry
        self._bytes += self._cost(key, entry)
        while self._bytes > self.max_bytes:
            (_, evicted_key), evicted = self._entries.popitem(last=False)
            self._bytes -= self._cost(evicted_key, evicted)

    @staticmethod
    def _cost(key: str, entry: Cached) -> int:
        return ENTRY_OVERHEAD + len(key) + (len(entry) if isinstance(entry, bytes) else 0)
