"""StorageWriter: the one thread that writes to the storage database, fairly and with group commit.

Callers (worker threads running guests) hand it a `WriteUnit` and block until that unit is
committed or has failed. The writer takes units round-robin across owners, at most PER_OWNER per
owner per batch, applies a batch in one transaction (an owner's units together, each checked
against the quota on its own: a unit refused writes nothing) and commits once: one fsync for the
whole batch. A component
flooding storage therefore delays another one's write by about one batch, never by its backlog.

Every wait is bounded: a unit not committed within `timeout_s` (the disk hangs, the thread died)
ends in io-error; one not yet taken by the writer is withdrawn, so it is never written later.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import structlog

from wasmhost.core import affinity
from wasmhost.core.errors import StorageError

log = structlog.get_logger("wasmhost.storage")

PER_OWNER = 4
"""Units taken from one owner per batch."""
MAX_BATCH_UNITS = 256
"""Units in one transaction at most."""
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""Value bytes in one transaction at most (beyond the first unit), so one fsync stays short."""
MAX_BATCH_OPS = 256
"""Writes in one transaction at most (beyond the first unit), so a neighbour's commit never waits
behind a long one (a unit is a message's writes: it may hold many)."""
SMALL_UNIT_OPS = 16
"""Units of at most this many writes are small: they take turns with large ones (see _take)."""


@dataclass
class WriteOp:
    """One set (value given) or delete (value None) of `key`."""

    key: str
    value: bytes | None


@dataclass(eq=False)
class WriteUnit:
    """Writes of one owner acknowledged together: committed all, or none with one error (a
    message's writes, or one write made outside any message)."""

    owner: str
    ops: list[WriteOp]
    checked_quota: int = 0
    """The quota a message's held writes were checked against as they were made (0: none). The writer
    refuses the unit only beyond the larger of it and the quota now: a quota lowered while a batch's
    commit is on its way applies to writes made after it, so no batch is refused in part."""
    error: StorageError | None = None
    taken: bool = False
    finished: bool = False
    """Committed, or failed with `error` (set under the writer's lock)."""
    on_done: Callable[[], None] | None = None
    """Called once `finished` (from the thread that finished it; it must not block), then dropped:
    it usually points back at what holds the unit (a PendingCommit's method), and a cycle left in
    place per unit would make every acknowledged write garbage for the cyclic collector."""
    event: threading.Event | None = field(default=None, repr=False)
    """Made by the first waiter that has to block (most units are waited for through on_done)."""

    @property
    def nbytes(self) -> int:
        """Value bytes the unit writes."""
        return sum(len(op.value) for op in self.ops if op.value is not None)


Written = list[tuple[str, str, bytes | None]]
"""What a transaction writes: (owner, key, value), None for a delete, the last per key."""
Apply = Callable[[sqlite3.Connection, list[WriteUnit]], tuple[dict[int, StorageError], Written]]
"""Applies a transaction's units (each owner's in order) inside the open transaction; returns the
errors of the units it refused (by id): they write nothing, the others are written; and what it wrote."""
Settled = Callable[[Written | None], None]
"""Told what a transaction wrote once it is committed (None: it was not), before any of its units is
finished."""


class StorageWriter:
    """Owns the write connection and the writer thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], apply: Apply,
                 on_io_error: Callable[[Exception], None], timeout_s: float = 10.0,
                 settled: Settled | None = None) -> None:
        self._connect = connect
        self._apply = apply
        self._settled = settled
        self._on_io_error = on_io_error
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._queues: dict[str, deque[WriteUnit]] = {}
        self._ring: deque[str] = deque()  # owners with queued units, next to serve first
        self._closing = False
        self._small_turn = True
        self._db: sqlite3.Connection | None = None
        self.batches = 0
        self.units_taken = 0
        self._thread = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self._thread.start()

    # --- callers ---

    def submit(self, unit: WriteUnit) -> None:
        """Queue `unit` and wait until it is committed; raises its StorageError otherwise."""
        self.enqueue(unit)
        self.wait(unit)

    def enqueue(self, *units: WriteUnit) -> None:
        """Queue `units` (in order, all or none) without waiting; `wait` for each later (every
        enqueued unit must be waited for)."""
        with self._cond:
            if self._closing or not self._thread.is_alive():
                raise StorageError("io-error", "storage writer is not running")
            for unit in units:
                queue = self._queues.get(unit.owner)
                if queue is None:
                    queue = self._queues[unit.owner] = deque()
                    self._ring.append(unit.owner)
                queue.append(unit)
            self._cond.notify_all()

    def wait(self, unit: WriteUnit, deadline: float | None = None) -> None:
        """Wait until the enqueued `unit` is committed (bounded by timeout_s from now, or by `deadline`, a
        time.monotonic() shared by the units of one batch); raises its StorageError otherwise."""
        if not unit.finished:
            with self._cond:
                if not unit.finished and unit.event is None:
                    unit.event = threading.Event()  # set by _finish, under the same lock
            event = unit.event
            bound = self.timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
            if event is not None and not event.wait(bound):
                self._give_up(unit)
        if unit.error is not None:
            raise unit.error

    def _give_up(self, unit: WriteUnit) -> None:
        """End the wait for `unit` in io-error: withdrawn if the writer has not taken it yet."""
        gave_up = False
        on_done = None
        with self._cond:
            if not unit.finished:
                if unit.taken:
                    unit.error = StorageError(
                        "io-error", f"storage write not confirmed within {self.timeout_s:g} s (it may land later)")
                else:
                    self._withdraw(unit)
                    unit.error = StorageError(
                        "io-error", f"storage writer did not take the write within {self.timeout_s:g} s; "
                                    "nothing was written")
                self._on_io_error(TimeoutError(str(unit.error)))
                on_done = self._mark(unit)
                gave_up = True
        if gave_up and on_done is not None:
            on_done()

    def queued(self) -> int:
        """Units waiting for the writer to take them."""
        with self._cond:
            return sum(len(queue) for queue in self._queues.values())

    def _withdraw(self, unit: WriteUnit) -> None:
        queue = self._queues.get(unit.owner)
        if queue is not None and unit in queue:
            queue.remove(unit)
            if not queue:
                del self._queues[unit.owner]
                self._ring.remove(unit.owner)

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued, then stop the thread and close the connection."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # --- the writer thread ---

    def _run(self) -> None:
        affinity.roam()  # SQLite works outside the GIL: any core
        try:
            while True:
                with self._cond:
                    while not self._ring and not self._closing:
                        self._cond.wait()
                    if not self._ring:
                        break  # closing and nothing left
                    batch = self._take()
                self._commit(batch)
        except BaseException as exc:  # whatever ends the thread, nobody may wait forever
            log.error("storage_writer_died", error=f"{type(exc).__name__}: {exc}")
            self._on_io_error(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        finally:
            with self._cond:
                self._closing = True
                left = [unit for queue in self._queues.values() for unit in queue]
                self._queues.clear()
                self._ring.clear()
            self._finish_all(left, {}, StorageError("io-error", "storage writer stopped"))
            if self._db is not None:
                self._db.close()

    def _take(self) -> list[WriteUnit]:
        """The next transaction's units. Small units (a message that wrote a few keys) and large
        ones (a message that wrote many) take turns: every other transaction holds only small units
        when any are queued, so a component writing a key or two never waits behind more than one
        transaction of another's large units, and large units are never starved."""
        if self._small_turn:
            self._small_turn = False
            batch = self._take_round_robin(small_only=True)
            if batch:
                return batch
        self._small_turn = True
        return self._take_round_robin(small_only=False)

    def _take_round_robin(self, small_only: bool) -> list[WriteUnit]:
        """Up to PER_OWNER units from each owner in ring order, round after round, within the batch
        bounds: one owner alone gets its whole backlog into one transaction (one fsync), several
        take turns in it. With `small_only`, an owner whose next unit is large is passed over."""
        batch: list[WriteUnit] = []
        size = ops = 0

        def full() -> bool:
            return len(batch) >= MAX_BATCH_UNITS or (bool(batch) and (size >= MAX_BATCH_BYTES or ops >= MAX_BATCH_OPS))

        progress = True
        while progress and not full():
            progress = False
            for _ in range(len(self._ring)):
                owner = self._ring.popleft()
                queue = self._queues[owner]
                for _ in range(PER_OWNER):
                    if not queue or full() or (small_only and len(queue[0].ops) > SMALL_UNIT_OPS):
                        break
                    unit = queue.popleft()
                    unit.taken = True
                    self.units_taken += 1
                    batch.append(unit)
                    size += unit.nbytes
                    ops += len(unit.ops)
                    progress = True
                if queue:
                    self._ring.append(owner)  # served (or passed over): to the back of the ring
                else:
                    del self._queues[owner]
                if full():
                    break
        return batch

    def _commit(self, batch: list[WriteUnit]) -> None:
        """Apply `batch` in one transaction and acknowledge each unit after the commit."""
        failed: dict[int, StorageError] = {}
        written: Written = []
        try:
            if self._db is None:
                self._db = self._connect()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                refused, written = self._apply(db, batch)
                failed.update(refused)
                db.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, OSError) as exc:
            self._on_io_error(exc)
            if self._db is not None:  # reconnect for the next batch: the connection may be unusable
                with suppress(sqlite3.Error):
                    self._db.close()
                self._db = None
            self._tell_settled(None)
            self._finish_all(batch, failed, StorageError("io-error", str(exc)))
            return
        except Exception as exc:  # a bug must fail this batch, not stop the writer
            log.exception("storage_batch_failed")
            self._on_io_error(exc)
            self._tell_settled(None)
            self._finish_all(batch, {}, StorageError("io-error", f"{type(exc).__name__}: {exc}"))
            return
        self.batches += 1
        self._tell_settled(written)
        self._finish_all(batch, failed)

    def _tell_settled(self, written: Written | None) -> None:
        if self._settled is not None:
            self._settled(written)

    def _finish_all(self, units: list[WriteUnit], errors: dict[int, StorageError],
                    default: StorageError | None = None) -> None:
        """Finish `units` (with their error in `errors`, else `default`) under one lock, then call
        their on_done callbacks."""
        callbacks = []
        with self._cond:
            for unit in units:
                if unit.finished:
                    continue  # its caller already gave up and reported io-error
                unit.error = errors.get(id(unit), default)
                on_done = self._mark(unit)
                if on_done is not None:
                    callbacks.append(on_done)
        for on_done in callbacks:
            on_done()

    @staticmethod
    def _mark(unit: WriteUnit) -> Callable[[], None] | None:
        """Mark `unit` finished and wake its waiter, if any (under the lock); returns its on_done,
        now taken off it (see WriteUnit.on_done), for the caller to call once out of the lock."""
        unit.finished = True
        if unit.event is not None:
            unit.event.set()
        on_done, unit.on_done = unit.on_done, None
        return on_done
