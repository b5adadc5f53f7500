"""SqliteStorage: per-component key-value storage in one SQLite file (WAL, durable on return,
one fair writer thread, quotas in bytes really used)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import structlog

from wasmhost.core.errors import StorageError
from wasmhost.core.ids import ComponentId
from wasmhost.core.private_files import private_dir, private_file, tighten_if_present
from wasmhost.core.protocols import StorageUsage
from wasmhost.storage.accounting import PAGE_SIZE, entry_cost
from wasmhost.storage.held import MessageWrites
from wasmhost.storage.writer import StorageWriter, WriteOp, WriteUnit

log = structlog.get_logger("wasmhost.storage")

MAX_KEY_BYTES = 1024
_CHUNK = 500
"""Keys per `IN (...)` lookup when applying a unit (well below SQLite's limit on parameters)."""
ACCOUNTING_VERSION = 2
"""PRAGMA user_version of a file whose usage rows follow accounting.entry_cost (1 and 0: key + value)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    owner TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (owner, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT PRIMARY KEY, used_bytes INTEGER NOT NULL, key_count INTEGER NOT NULL
) WITHOUT ROWID;
"""


def check_key(key: str, what: str = "key") -> None:
    """Raise invalid-key for an empty key, one over 1 KiB (UTF-8) or one containing NUL."""
    if not key:
        raise StorageError("invalid-key", f"{what} is empty")
    if "\x00" in key:
        raise StorageError("invalid-key", f"{what} contains a NUL byte")
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        raise StorageError("invalid-key", f"{what} is {size} bytes, the limit is {MAX_KEY_BYTES}")


class SqliteStorage:
    """Implements StoragePort. Synchronous: callers run it on worker threads, never on the event loop.

    The owner of every row is the calling component's id, never derived from the key, so a
    component cannot reach another one's keys whatever key it passes. Reads use one connection per
    thread (WAL lets them run beside the writer); writes go through the one StorageWriter thread,
    fair between owners and committed in groups. Each entry is charged `entry_cost` (key, value and
    the per-entry overhead it really takes on disk) against its owner's quota. The file, its WAL
    and the directory it creates are owner-only.
    """

    def __init__(self, path: Path, default_quota_bytes: int = 16 * 1024 * 1024, write_timeout_s: float = 10.0) -> None:
        self.path = path
        self.default_quota_bytes = default_quota_bytes
        self._quotas: dict[str, int] = {}
        # One connection per thread: sqlite3 connections must not be shared between threads, and
        # WAL lets readers on several threads proceed while one writes.
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.io_errors = 0
        self.last_io_error: str | None = None
        self.closed = False
        try:
            self._prepare_files()
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # what accounting assumes; before WAL fixes it
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
                if page_size != PAGE_SIZE:  # a file made elsewhere: charges are approximate
                    log.warning("storage_page_size_unexpected", path=str(path), page_size=page_size,
                                accounted=PAGE_SIZE)
                self._migrate(db)
            finally:
                db.close()
        except (sqlite3.Error, OSError) as exc:
            self._io_error(exc)
        self._writer = StorageWriter(self._open_writer, self._apply, self._io_error, timeout_s=write_timeout_s)

    # --- files and connections ---

    def _prepare_files(self) -> None:
        """Create the database owner-only before SQLite does (it gives the WAL and shm files the
        database's mode) and tighten what an older version left readable by others."""
        if not self.path.parent.is_dir():
            private_dir(self.path.parent)
        private_file(self.path)
        for suffix in ("-wal", "-shm", "-journal"):
            tighten_if_present(self.path.with_name(self.path.name + suffix))

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA busy_timeout=30000")
        return db

    def _open_writer(self) -> sqlite3.Connection:
        db = self._open()
        db.execute("PRAGMA synchronous=FULL")  # a write is on disk before it is acknowledged
        return db

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            if self.closed:
                raise sqlite3.ProgrammingError("storage is closed")
            db = self._open()
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A read transaction; every sqlite or OS error becomes storage-error.io-error."""
        try:
            db = self._connection()
            db.execute("BEGIN")
            try:
                yield db
            finally:
                if db.in_transaction:
                    db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._io_error(exc)
            raise StorageError("io-error", str(exc)) from None

    def _io_error(self, exc: BaseException) -> None:
        self.io_errors += 1
        self.last_io_error = f"{type(exc).__name__}: {exc}"
        log.error("storage_io_error", path=str(self.path), error=self.last_io_error)

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Recount every owner's usage when the file was written by an older accounting rule."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version >= ACCOUNTING_VERSION:
            return
        totals: dict[str, tuple[int, int]] = {}
        db.execute("BEGIN IMMEDIATE")
        try:
            for owner, key, value_len in db.execute("SELECT owner, key, length(value) FROM kv"):
                used, count = totals.get(owner, (0, 0))
                totals[owner] = (used + entry_cost(owner, key, int(value_len)), count + 1)
            db.execute("DELETE FROM usage")
            db.executemany("INSERT INTO usage (owner, used_bytes, key_count) VALUES (?, ?, ?)",
                           [(owner, used, count) for owner, (used, count) in totals.items()])
            db.execute(f"PRAGMA user_version={ACCOUNTING_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if totals:
            log.info("storage_usage_recounted", path=str(self.path), owners=len(totals), accounting=ACCOUNTING_VERSION)

    # --- quotas ---

    def set_quota(self, owner: str, quota_bytes: int) -> None:
        """Give `owner` its own quota instead of the default."""
        self._quotas[owner] = quota_bytes

    def quota(self, owner: str) -> int:
        """The quota of `owner` in bytes."""
        return self._quotas.get(owner, self.default_quota_bytes)

    # --- the StoragePort protocol ---

    def _row(self, sql: str, params: tuple[str, ...]) -> tuple[object, ...] | None:
        """The first row of one read statement, in its own (implicit) read transaction: one call
        into SQLite, the fast path for the single reads guests make; errors become io-error."""
        try:
            db: sqlite3.Connection | None = getattr(self._local, "db", None)
            row: tuple[object, ...] | None = (db or self._connection()).execute(sql, params).fetchone()
        except (sqlite3.Error, OSError) as exc:
            self._io_error(exc)
            raise StorageError("io-error", str(exc)) from None
        return row

    def get(self, owner: ComponentId, key: str) -> bytes | None:
        """The value under `key`, or None."""
        check_key(key)
        row = self._row("SELECT value FROM kv WHERE owner = ? AND key = ?", (str(owner), key))
        return row[0] if row else None  # type: ignore[return-value]  # a BLOB: bytes already

    def set(self, owner: ComponentId, key: str, value: bytes) -> None:
        """Store `value` under `key`; returns once committed. quota-exceeded writes nothing."""
        check_key(key)
        self._writer.submit(WriteUnit(str(owner), [WriteOp(key, bytes(value))]))

    def delete(self, owner: ComponentId, key: str) -> None:
        """Remove `key` (absent keys are fine); returns once committed."""
        check_key(key)
        self._writer.submit(WriteUnit(str(owner), [WriteOp(key, None)]))

    def hold(self, owner: ComponentId) -> MessageWrites:
        """Held writes for `owner`, for the messages of one batch (see storage.held)."""
        return MessageWrites(self, owner)

    def enqueue(self, unit: WriteUnit) -> None:
        """Hand `unit` (written all or nothing) to the writer; `wait` for it later."""
        self._writer.enqueue(unit)

    def wait(self, unit: WriteUnit) -> None:
        """Return once the enqueued `unit` is committed; raises its StorageError otherwise."""
        self._writer.wait(unit)

    @staticmethod
    def check_key(key: str) -> None:
        """Raise invalid-key unless `key` is a valid key."""
        check_key(key)

    def value_size(self, owner: str, key: str) -> int | None:
        """Length of the committed value under `key`, or None when absent."""
        row = self._row("SELECT length(value) FROM kv WHERE owner = ? AND key = ?", (owner, key))
        return int(row[0]) if row else None  # type: ignore[call-overload]

    def _apply(self, db: sqlite3.Connection, unit: WriteUnit) -> None:
        """Apply `unit` in the writer's open transaction, with the owner's up-to-date usage. The quota
        is checked once for the whole unit: a unit that grows usage beyond it writes nothing. The old
        sizes are read and the rows written a statement per chunk, not per write (a message's unit
        may hold many writes)."""
        name = unit.owner
        final = {op.key: op.value for op in unit.ops}  # the last write of a key wins
        keys = list(final)
        old: dict[str, int] = {}
        for at in range(0, len(keys), _CHUNK):
            chunk = keys[at:at + _CHUNK]
            marks = ",".join("?" * len(chunk))
            old.update(db.execute(f"SELECT key, length(value) FROM kv WHERE owner = ? AND key IN ({marks})",
                                  (name, *chunk)).fetchall())
        used, count = self._usage(db, name)
        before = used
        puts: list[tuple[str, str, bytes]] = []
        deletes: list[tuple[str, str]] = []
        for key, value in final.items():
            prior = old.get(key)
            freed = entry_cost(name, key, prior) if prior is not None else 0
            if value is None:
                if prior is not None:
                    deletes.append((name, key))
                    used, count = used - freed, count - 1
                continue
            puts.append((name, key, value))
            used, count = used - freed + entry_cost(name, key, len(value)), count + (prior is None)
        if used > before and used > self.quota(name):  # shrinking is always allowed
            raise StorageError("quota-exceeded")  # nothing written yet
        db.executemany("DELETE FROM kv WHERE owner = ? AND key = ?", deletes)
        db.executemany("INSERT OR REPLACE INTO kv (owner, key, value) VALUES (?, ?, ?)", puts)
        self._set_usage(db, name, used, count)

    def exists(self, owner: ComponentId, key: str) -> bool:
        """Whether `key` is present."""
        check_key(key)
        return self._row("SELECT 1 FROM kv WHERE owner = ? AND key = ?", (str(owner), key)) is not None

    def list_keys(self, owner: ComponentId, prefix: str | None) -> list[str]:
        """Keys of `owner` in order; `prefix` matches literally (no wildcards)."""
        if prefix:
            check_key(prefix, "prefix")
        with self._transaction() as db:
            if prefix:
                rows = db.execute(
                    "SELECT key FROM kv WHERE owner = ? AND substr(key, 1, ?) = ? ORDER BY key",
                    (str(owner), len(prefix), prefix),
                ).fetchall()
            else:
                rows = db.execute("SELECT key FROM kv WHERE owner = ? ORDER BY key", (str(owner),)).fetchall()
        return [row[0] for row in rows]

    def usage(self, owner: ComponentId) -> StorageUsage:
        """Bytes charged (see accounting.entry_cost), quota and key count of `owner`."""
        name = str(owner)
        with self._transaction() as db:
            used, count = self._usage(db, name)
        return StorageUsage(used, self.quota(name), count)

    @staticmethod
    def _usage(db: sqlite3.Connection, owner: str) -> tuple[int, int]:
        row = db.execute("SELECT used_bytes, key_count FROM usage WHERE owner = ?", (owner,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    @staticmethod
    def _set_usage(db: sqlite3.Connection, owner: str, used: int, count: int) -> None:
        db.execute("INSERT OR REPLACE INTO usage (owner, used_bytes, key_count) VALUES (?, ?, ?)",
                   (owner, used, count))

    def all_usage(self) -> list[tuple[str, int, int]]:
        """(owner, bytes charged, keys) of every owner with something stored, for metrics: on its own
        short-lived connection, so that any thread (an HTTP server's per-request one) may ask."""
        if self.closed:
            return []
        try:
            db = self._open()
            try:
                rows = db.execute("SELECT owner, used_bytes, key_count FROM usage").fetchall()
            finally:
                db.close()
        except (sqlite3.Error, OSError) as exc:
            self._io_error(exc)
            return []
        return [(str(owner), int(used), int(count)) for owner, used, count in rows]

    # --- housekeeping ---

    def close(self) -> None:
        """Commit queued writes, checkpoint the WAL and close every connection."""
        self._writer.close()
        self.closed = True
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            with suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with suppress(sqlite3.Error):
                db.close()
