"""MessageWrites: the writes of the messages one actor handles in a batch, held until committed.

Each message's writes are all-or-nothing: when its handling ends ok they become one write unit;
when it fails (an error, a trap, fuel, a timeout, a stop) they are dropped. Reads see the kept
writes of earlier messages of the batch and the current message's own ones over what is committed.
Quota checks count the held writes. At the end of the batch `commit` hands the units to the writer
together and waits: it puts them (and other actors' units) into one transaction, one fsync; only
then are the batch's messages answered. Handing units over one by one as messages end was measured
slower (2x on 2 cores): the writer thread then competes for the GIL with the guests' thread.

`start_commit` hands the units over without waiting, so that the actor handles its next batch while
the fsync runs: the handed-over writes stay visible (the in-flight layer, under the next batch's
kept and current writes) until they are committed, and the next batch's units are handed over only
once the previous commit is confirmed; if it failed, the next batch's writes are dropped as well
(its messages may have read what was never written) and its messages fail with the same error.

The committed state of the owner cannot change during a batch other than by its own in-flight
commit: only its actor writes under its id, one commit at a time, in order.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wasmhost.core.errors import StorageError
from wasmhost.core.protocols import StorageUsage
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.writer import WriteOp, WriteUnit

if TYPE_CHECKING:
    from wasmhost.core.ids import ComponentId
    from wasmhost.storage.sqlite_store import SqliteStorage


class PendingCommit:
    """The commit of one batch's units, handed to the writer: wait for it on a thread (`wait`) or be
    called back from the writer's thread once every unit is done (`add_done_callback`)."""

    def __init__(self, storage: SqliteStorage, units: list[WriteUnit]) -> None:
        self._storage = storage
        self._units = units
        self._left = len(units)
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self._refused: StorageError | None = None  # the writer would not take a unit (not running)
        self.timeout_s = storage.write_timeout_s
        """How long the writer may take to confirm it (beyond that, `wait` ends it in io-error)."""
        self._deadline = math.inf  # when it is handed over: time.monotonic() + timeout_s

    def _hand_over(self) -> None:
        """Enqueue every unit at once; if the writer refuses them (it is not running), they count as
        done and failed."""
        for unit in self._units:
            unit.on_done = self._unit_done
        self._deadline = time.monotonic() + self.timeout_s
        try:
            self._storage.enqueue(*self._units)
        except StorageError as exc:  # nothing is written
            self._refused = exc
            self._units = []
            with self._lock:
                self._left = 1
            self._unit_done()

    def _unit_done(self) -> None:
        with self._lock:
            self._left -= 1
            callbacks = self._callbacks if self._left == 0 else []
        for callback in callbacks:
            callback()

    def done(self) -> bool:
        """Whether every unit is committed or has failed."""
        return self._left <= 0

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from whichever thread finishes the last unit, or now) once `done`."""
        with self._lock:
            if self._left > 0:
                self._callbacks.append(callback)
                return
        callback()

    def wait(self) -> StorageError | None:
        """Wait until every unit is committed, all within the writer's timeout of their handing over
        (one bound for the batch: a hung disk fails a batch of 64 messages in 10 s, not in 640); the
        first error otherwise. Cheap once `done`; may be called again, from any thread."""
        error = self._refused
        for unit in self._units:
            try:
                self._storage.wait(unit, self._deadline)
            except StorageError as exc:
                error = error or exc
        return error


@dataclass(slots=True)
class _Held:
    value: bytes | None  # None: deleted
    cost: int  # what it is charged (0 when deleted)


class MessageWrites:
    """Implements HeldWrites over SqliteStorage for one owner."""

    def __init__(self, storage: SqliteStorage, owner: ComponentId) -> None:
        self._storage = storage
        self._owner = owner
        self._name = str(owner)
        self._flight: dict[str, _Held] = {}  # the previous batch's kept writes, while its commit is in flight
        self._pending: PendingCommit | None = None  # that commit
        self._kept: dict[str, _Held] = {}  # earlier messages of the batch that ended ok
        self._current: dict[str, _Held] = {}  # the message being handled
        self._committed_cost: dict[str, int] = {}  # of held or present touched keys, as committed (0: absent)
        self._usage: tuple[int, int] | None = None  # (used, count) with the held writes, read lazily
        self._kept_usage: tuple[int, int] | None = None
        # Keys first written without looking up their committed size (a read per write, letting go of
        # the GIL each time): the usage above counts them as new keys, an overestimate, until
        # `_resolve` looks them all up at once (when the quota might be exceeded, at `usage`, and
        # before the batch is handed to the writer).
        self._unknown_kept: set[str] = set()
        self._unknown_current: set[str] = set()
        self._units: list[WriteUnit] = []  # one per message that ended ok with writes
        self._checked_quota = 0  # the largest quota the current message's sets were checked against
        self._abandoned = False  # given up (see `abandon`): nothing more is handed to the writer
        self._handing = threading.Lock()  # `abandon` against a hand-over on another thread

    def _held(self, key: str) -> _Held | None:
        held = self._current.get(key)
        if held is None:
            held = self._kept.get(key)
            if held is None and self._flight:
                held = self._flight.get(key)
        return held

    def _cost(self, key: str) -> int:
        held = self._held(key)
        if held is not None:
            return held.cost
        cost = self._committed_cost.get(key)
        if cost is None:
            size = self._storage.value_size(self._name, key)
            if size is None:
                return 0  # not remembered: a guest deleting endless absent keys would grow it unbounded
            cost = self._committed_cost[key] = entry_cost(self._name, key, size)
        return cost

    def _resolve(self) -> None:
        """Look up the committed sizes of the keys written without them and make the usage exact."""
        unknown = self._unknown_kept | self._unknown_current
        if not unknown:
            return
        sizes = self._storage.value_sizes(self._name, list(unknown))
        for key in unknown:
            size = sizes.get(key)
            cost = self._committed_cost[key] = 0 if size is None else entry_cost(self._name, key, size)
            if not cost:
                continue  # it was new indeed
            used, count = self._used()
            self._usage = (used - cost, count - 1)  # it replaced (or deleted) that entry
            if key in self._unknown_kept and self._kept_usage is not None:
                self._kept_usage = (self._kept_usage[0] - cost, self._kept_usage[1] - 1)
        self._unknown_kept, self._unknown_current = set(), set()

    def _used(self) -> tuple[int, int]:
        if self._usage is None:
            committed = self._storage.usage(self._owner)
            self._usage = self._kept_usage = (committed.used_bytes, committed.key_count)
        return self._usage

    # --- reads ---

    def get(self, key: str) -> bytes | None:
        """The value under `key` as the held writes leave it, or None."""
        held = self._held(key)
        return held.value if held is not None else self._storage.get(self._owner, key)

    def exists(self, key: str) -> bool:
        """Whether `key` is present, held writes included."""
        held = self._held(key)
        return held.value is not None if held is not None else self._storage.exists(self._owner, key)

    def list_keys(self, prefix: str | None) -> list[str]:
        """Keys in order (of their UTF-8 bytes, as SQLite orders them), held writes included."""
        keys = set(self._storage.list_keys(self._owner, prefix))
        for held_keys in (self._flight, self._kept, self._current):  # the current message's writes last: they win
            for key, held in held_keys.items():
                if prefix and not key.startswith(prefix):
                    continue
                if held.value is None:
                    keys.discard(key)
                else:
                    keys.add(key)
        return sorted(keys, key=lambda k: k.encode("utf-8", "surrogatepass"))

    def usage(self) -> StorageUsage:
        """Usage as if the held writes were committed."""
        self._resolve()
        used, count = self._used()
        return StorageUsage(used, self._storage.quota(self._name), count)

    # --- writes ---

    def set(self, key: str, value: bytes) -> None:
        """Hold `value` under `key`; quota-exceeded (holding nothing) when it does not fit with the
        held writes. Shrinking is always allowed."""
        self._storage.check_key(key)
        held = self._held(key)
        unknown = False
        if held is not None:
            old = held.cost
        elif (cost := self._committed_cost.get(key)) is not None:
            old = cost
        else:  # not looked up: counted as a new key for now (see _unknown_kept)
            old, unknown = 0, True
        new = entry_cost(self._name, key, len(value))
        used, count = self._used()
        quota = self._storage.quota(self._name)
        self._checked_quota = max(self._checked_quota, quota)
        if new > old and used - old + new > quota:
            if unknown or self._unknown_kept or self._unknown_current:  # maybe only the estimate is over
                self._resolve()
                old, unknown = self._cost(key), False
                used, count = self._used()
            if new > old and used - old + new > quota:
                raise StorageError("quota-exceeded")
        if unknown:
            self._unknown_current.add(key)
        self._current[key] = _Held(bytes(value), new)
        self._usage = (used - old + new, count + (0 if old else 1))

    def delete(self, key: str) -> None:
        """Hold the removal of `key` (absent keys are fine)."""
        self._storage.check_key(key)
        old = self._cost(key)
        if not old:
            return
        used, count = self._used()
        self._current[key] = _Held(None, 0)
        self._usage = (used - old, count - 1)

    # --- message and batch ends ---

    def end_message(self, ok: bool) -> None:
        """Keep the current message's writes (`ok`, as one unit) or drop them all."""
        if ok and self._current:
            self._units.append(WriteUnit(self._name, [WriteOp(key, held.value) for key, held in self._current.items()],
                                         checked_quota=self._checked_quota))
            self._kept.update(self._current)
            self._kept_usage = self._usage
            self._unknown_kept |= self._unknown_current
        else:
            self._usage = self._kept_usage
        self._unknown_current = set()
        self._current = {}
        self._checked_quota = 0

    def start_commit(self) -> PendingCommit | None:
        """Hand every kept message's unit to the writer without waiting for the commit (None: there
        was none); their writes stay visible to the next batch until then. First waits for the
        previous batch's commit (usually confirmed by then): when that failed, this batch's writes
        are dropped too and its error raised."""
        self.end_message(False)  # a message still open did not end ok
        self._resolve()  # while what is committed is still what these writes replace
        previous, self._pending = self._pending, None
        if previous is not None:
            error = previous.wait()
            committed, self._flight = self._flight, {}
            if error is not None:
                self._forget()
                raise error
            # What later writes of these keys replace now. Only these are kept: the map would otherwise
            # grow with every key a busy actor ever wrote (its held object lives while commits overlap);
            # the sizes dropped are read again when needed.
            self._committed_cost = {key: held.cost for key, held in committed.items()}
        units, self._units = self._units, []
        if not units:
            self._forget()
            return None
        self._flight, self._kept = self._kept, {}
        pending = self._pending = PendingCommit(self._storage, units)
        with self._handing:
            if self._abandoned:  # given up while this waited for the previous commit: nothing may land now
                self._forget()
                raise StorageError("io-error", "the batch was given up (a stop's grace ran out) before its "
                                   "writes were handed over: nothing of it was written")
            pending._hand_over()
        return pending

    def abandon(self) -> None:
        """Give the held writes up for good (from any thread): a `start_commit` still waiting for the
        previous batch's commit hands nothing over, so that writes made after this (a guest's `shutdown`)
        are never followed by these older ones."""
        with self._handing:
            self._abandoned = True

    def _forget(self) -> None:
        """Drop every held write and what was read of the committed state."""
        self._units, self._kept, self._flight, self._pending = [], {}, {}, None
        self._committed_cost.clear()
        self._usage = self._kept_usage = None
        self._unknown_kept, self._unknown_current = set(), set()

    def commit(self) -> None:
        """Hand every kept message's unit to the writer and wait until all are committed (and the
        previous batch's, if still in flight); raises the first error otherwise."""
        pending = self.start_commit()
        error = pending.wait() if pending is not None else None
        self._forget()
        if error is not None:
            raise error
