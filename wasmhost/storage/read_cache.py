"""ReadCache: the committed values of recently read or written small entries, so that a guest's
`get` of a hot key skips SQLite.

Measured in a direct loop of guest `get` messages: a SQLite read right after a wasm call costs
18 - 26 us (7 us in a loop of reads alone; each also makes two `fcntl` calls, the WAL index's read
lock), a third of the whole message; a hit here costs one lock and one dict lookup. Our own code
because no cache library keeps a value coherent with a writer on another thread the way this needs
(see `offer`).

Coherence. Only the storage writer changes the database while the daemon runs (one daemon per
state_dir: system/state_lock.py), and it tells the cache what it committed (`committed`) before any
waiter hears of the commit. What a worker thread read from SQLite is kept only if its owner had no
commit since the read began (`token`), so an old value read just before a commit can never
overwrite the new one. A failed commit clears the cache: what reached the disk is then unknown.

Whole namespaces. A component whose storage is small (at most 1 / WHOLE_SHARE of the cache) is read
whole at its first miss (`fill`); from then on its namespace is *complete*: a key the cache does not
hold is known to be absent, and no read of it goes to SQLite, until one of its entries is evicted.

Forgetting. What the cache keeps per owner besides its entries (its commit count, whether it is complete,
its tries at being read whole) would stay for every component ever removed: `forget` drops it, with the
owner's entries, when a reload removes the component (its rows stay on the disk).

Bounds. At most `max_bytes` (each entry counted as its key as Python stores it, its value and
ENTRY_OVERHEAD; an owner's name is kept once, whatever string object each read brings), least
recently used first out; values above MAX_VALUE_BYTES are never kept. A guest reading many keys
evicts other components' entries, which then cost one SQLite read again: never more than without
the cache.
"""

from __future__ import annotations

import sys
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
_EMPTY_STRING_BYTES = sys.getsizeof("")
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
WHOLE_SHARE = 8
"""A namespace is read whole when it would take at most max_bytes / WHOLE_SHARE of the cache."""
WHOLE_TRIES = 3
"""Times a namespace is read whole at most (a commit of its own during the read voids one)."""

Cached = bytes | _Absent
"""A cached entry: the committed value, or ABSENT."""
Token = tuple[int, int]
"""What a read from SQLite must still find when it is offered (see `token`)."""


class ReadCache:
    """Committed values by (owner, key), bounded by bytes, least recently used evicted first."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Cached] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # workers read, the writer thread updates
        self._clears = 0  # clears and forgets: each voids every read from SQLite under way (see `token`)
        self._commits: dict[str, int] = {}  # per owner: commits that touched it
        self._complete: set[str] = set()  # owners whose every committed key is cached
        self._whole_tries: dict[str, int] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the entries are counted as."""
        return self._bytes

    def fits_whole(self, charged_bytes: int, keys: int) -> bool:
        """Whether a namespace of `keys` entries charged `charged_bytes` (its keys and values, and
        more) is small enough to be read whole."""
        return charged_bytes + keys * ENTRY_OVERHEAD <= self.max_bytes // WHOLE_SHARE

    def lookup(self, owner: str, key: str) -> Cached | None:
        """The cached entry of `key` (ABSENT too when `owner`'s namespace is complete), or None when
        only SQLite knows."""
        with self._lock:
            entry = self._entries.get((owner, key))
            if entry is not None:
                self._entries.move_to_end((owner, key))
            elif owner in self._complete:
                entry = ABSENT
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def token(self, owner: str) -> Token:
        """Taken before reading `owner`'s rows from SQLite, handed to `offer` or `fill` after."""
        return self._clears, self._commits.get(owner, 0)  # two reads, each atomic under the GIL

    def offer(self, owner: str, key: str, value: bytes | None, token: Token) -> None:
        """Keep what a read that began at `token` found, unless `owner` had a commit since."""
        with self._lock:
            if token == (self._clears, self._commits.get(owner, 0)):
                self._put(owner, key, ABSENT if value is None else value)

    def claim_whole(self, owner: str) -> bool:
        """Whether the caller should read `owner`'s namespace whole now (once, retried WHOLE_TRIES
        times at most when a commit voids it)."""
        with self._lock:
            if self.max_bytes <= 0 or owner in self._complete:
                return False
            tries = self._whole_tries.get(owner, 0)
            if tries >= WHOLE_TRIES:
                return False
            self._whole_tries[owner] = tries + 1
            return True

    def fill(self, owner: str, rows: list[tuple[str, bytes]], token: Token) -> bool:
        """Keep `owner`'s whole namespace, read at `token`, and mark it complete; False when `owner`
        had a commit since (nothing kept) or a value is too large to keep (the others are kept)."""
        with self._lock:
            if token != (self._clears, self._commits.get(owner, 0)):
                return False
            for key, value in rows:
                self._put(owner, key, value)
            if any((owner, key) not in self._entries for key, _ in rows):
                return False  # a value too large to keep (or evicted at once): misses still go to SQLite
            self._complete.add(owner)
            return True

    def committed(self, writes: Iterable[tuple[str, str, bytes | None]]) -> None:
        """The writer committed `writes` ((owner, key, value or None for a delete), the last per
        key winning): update what the cache holds of them, before any waiter learns of the commit.
        Keys it does not hold are not added (a writer flooding new keys would churn the cache on the
        writer's thread: measured, 10% of a flood's write rate), unless their namespace is whole."""
        with self._lock:
            touched = set()
            for owner, key, value in writes:
                touched.add(owner)
                if (owner, key) in self._entries or owner in self._complete:
                    self._put(owner, key, ABSENT if value is None else value)
            for owner in touched:
                self._commits[owner] = self._commits.get(owner, 0) + 1

    def clear(self) -> None:
        """Forget everything (a commit failed: the disk's state is unknown)."""
        with self._lock:
            self._clears += 1
            self._entries.clear()
            self._complete.clear()
            self._bytes = 0

    def forget(self, owners: Iterable[str]) -> None:
        """Drop everything kept for `owners` (components no longer configured): their entries, commit counts,
        completeness and whole-read tries, which would otherwise stay for every component ever removed. A
        read of theirs still under way (a left-running guest's) is voided: its owner's commit count starts
        again from zero, so its token could otherwise match a later one's."""
        gone = set(owners)
        if not gone:
            return
        with self._lock:
            self._clears += 1
            for owner in gone:
                self._commits.pop(owner, None)
                self._whole_tries.pop(owner, None)
                self._complete.discard(owner)
            if any(owner in gone for owner, _ in self._entries):
                for owner, key in [k for k in self._entries if k[0] in gone]:
                    self._bytes -= self._cost(key, self._entries.pop((owner, key)))

    def owners(self) -> set[str]:
        """The owners the cache keeps anything for (entries or bookkeeping)."""
        with self._lock:
            return {owner for owner, _ in self._entries} | set(self._commits) | self._complete | set(self._whole_tries)

    def _put(self, owner: str, key: str, entry: Cached) -> None:
        """Store or replace one entry and evict down to max_bytes (under the lock). An entry that
        cannot be kept, or an evicted one, makes its namespace incomplete."""
        owner = sys.intern(owner)  # each read brings its own copy of the name: keep one
        old = self._entries.pop((owner, key), None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        if (isinstance(entry, bytes) and len(entry) > MAX_VALUE_BYTES) or self.max_bytes <= 0:
            self._complete.discard(owner)
            return
        self._entries[(owner, key)] = entry
        self._bytes += self._cost(key, entry)
        while self._bytes > self.max_bytes:
            (evicted_owner, evicted_key), evicted = self._entries.popitem(last=False)
            self._bytes -= self._cost(evicted_key, evicted)
            self._complete.discard(evicted_owner)

    @staticmethod
    def _cost(key: str, entry: Cached) -> int:
        # The key as stored: 1, 2 or 4 bytes per character (one emoji makes every character 4 bytes).
        key_bytes = sys.getsizeof(key) - _EMPTY_STRING_BYTES
        return ENTRY_OVERHEAD + key_bytes + (len(entry) if isinstance(entry, bytes) else 0)
