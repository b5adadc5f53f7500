"""SqliteStorage: per-component key-value storage in one SQLite file (WAL, durable on return,
one fair writer thread, quotas in bytes really used)."""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import msgspec
import structlog

from wasmhost.core.errors import StorageError
from wasmhost.core.ids import ComponentId
from wasmhost.core.private_files import private_dir, private_file, tighten_if_present
from wasmhost.core.protocols import StorageUsage
from wasmhost.storage.accounting import PAGE_SIZE, entry_cost
from wasmhost.storage.held import MessageWrites
from wasmhost.storage.read_cache import DEFAULT_MAX_BYTES as DEFAULT_CACHE_BYTES
from wasmhost.storage.read_cache import Cached, ReadCache
from wasmhost.storage.writer import StorageWriter, WriteOp, WriteUnit, Written

log = structlog.get_logger("wasmhost.storage")

MAX_KEY_BYTES = 1024
_CHUNK = 500
"""Keys per `IN (...)` lookup when applying a unit (well below SQLite's limit on parameters)."""
_SIZES = msgspec.json.Decoder(dict[str, int])
_SIZE_ROWS = msgspec.json.Decoder(list[tuple[str, str, int]])
_TRIPLES = msgspec.json.Decoder(list[tuple[str, int, int]])
_ROWS = 300
"""Rows per multi-row INSERT (3 parameters each: well below SQLite's limit)."""
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


class _ThreadToken:
    """Lives in one thread's local data, so it is dropped when that thread ends."""

    __slots__ = ("__weakref__",)


class SqliteStorage:
    """Implements StoragePort. Synchronous: callers run it on worker threads, never on the event loop.

    The owner of every row is the calling component's id, never derived from the key, so a
    component cannot reach another one's keys whatever key it passes. Reads use one connection per
    thread (WAL lets them run beside the writer); writes go through the one StorageWriter thread,
    fair between owners and committed in groups. Each entry is charged `entry_cost` (key, value and
    the per-entry overhead it really takes on disk) against its owner's quota. The file, its WAL
    and the directory it creates are owner-only.
    """

    def __init__(self, path: Path, default_quota_bytes: int = 16 * 1024 * 1024, write_timeout_s: float = 10.0,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self.cache = ReadCache(cache_bytes)
        self.default_quota_bytes = default_quota_bytes
        self.write_timeout_s = write_timeout_s
        self._quotas: dict[str, int] = {}
        # One connection per thread: sqlite3 connections must not be shared between threads, and
        # WAL lets readers on several threads proceed while one writes. Each is closed when its
        # thread ends (see _connection) or at `close`, whichever comes first.
        self._local = threading.local()
        self._connections: set[sqlite3.Connection] = set()
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
        self._writer = StorageWriter(self._open_writer, self._apply, self._io_error, timeout_s=write_timeout_s,
                                     settled=self._settled)

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
            # The worker pool lends threads for guests waiting in host calls and ends them when idle:
            # a thread's data goes when it ends, and with it this token, which closes its connection.
            token = self._local.token = _ThreadToken()
            weakref.finalize(token, self._thread_ended, db)
            with self._lock:
                self._connections.add(db)
        return db

    def _thread_ended(self, db: sqlite3.Connection) -> None:
        """Close the connection of a thread that ended (unless `close` has taken it already)."""
        with self._lock:
            if db not in self._connections:
                return
            self._connections.discard(db)
        with suppress(sqlite3.Error):
            db.close()

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

    def forget(self, owners: Iterable[str]) -> None:
        """Drop what is kept in memory for `owners`, components a reload removed: their quotas and what the read
        cache holds of them (reload after reload, an entry per component ever removed stayed). Their rows stay
        in the file, as the README says, for a component configured again under the same id, which is given
        its quota again as it is deployed. A write of theirs still committing (a stop that overran) is checked
        against the default quota and the one its writes were checked against as they were made."""
        owners = list(owners)
        for owner in owners:
            self._quotas.pop(owner, None)
        self.cache.forget(owners)

    def tracked_owners(self) -> set[str]:
        """The owners anything is kept for in memory (a quota of their own, read cache entries or bookkeeping)."""
        return set(self._quotas) | self.cache.owners()

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
        """The value under `key`, or None (from the read cache when it has the key)."""
        check_key(key)
        name = str(owner)
        cached = self._cached(name, key)
        if cached is not None:
            return cached if isinstance(cached, bytes) else None
        token = self.cache.token(name)
        row = self._row("SELECT value FROM kv WHERE owner = ? AND key = ?", (name, key))
        value: bytes | None = row[0] if row else None  # type: ignore[assignment]  # a BLOB: bytes already
        self.cache.offer(name, key, value, token)
        return value

    def _cached(self, owner: str, key: str) -> Cached | None:
        """What the read cache knows of `key`, after reading `owner`'s namespace whole at its first
        miss when it is small (see storage/read_cache.py); None: only SQLite knows."""
        cached = self.cache.lookup(owner, key)
        if cached is None and self.cache.claim_whole(owner):
            token = self.cache.token(owner)
            rows = None
            with self._transaction() as db:  # one snapshot: a commit in between cannot grow what is read
                used, keys = db.execute("SELECT used_bytes, key_count FROM usage WHERE owner = ?",
                                        (owner,)).fetchone() or (0, 0)
                if self.cache.fits_whole(used, keys):
                    rows = db.execute("SELECT key, value FROM kv WHERE owner = ?", (owner,)).fetchall()
            if rows is not None and self.cache.fill(owner, rows, token):
                cached = self.cache.lookup(owner, key)
        return cached

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

    def enqueue(self, *units: WriteUnit) -> None:
        """Hand `units` (each written all or nothing, in order) to the writer; `wait` for each later."""
        self._writer.enqueue(*units)

    def wait(self, unit: WriteUnit, deadline: float | None = None) -> None:
        """Return once the enqueued `unit` is committed; raises its StorageError otherwise (see
        StorageWriter.wait for the bound)."""
        self._writer.wait(unit, deadline)

    @staticmethod
    def check_key(key: str) -> None:
        """Raise invalid-key unless `key` is a valid key."""
        check_key(key)

    def value_size(self, owner: str, key: str) -> int | None:
        """Length of the committed value under `key`, or None when absent."""
        cached = self._cached(owner, key)
        if cached is not None:
            return len(cached) if isinstance(cached, bytes) else None
        row = self._row("SELECT length(value) FROM kv WHERE owner = ? AND key = ?", (owner, key))
        return int(row[0]) if row else None  # type: ignore[call-overload]

    def value_sizes(self, owner: str, keys: list[str]) -> dict[str, int]:
        """Lengths of the committed values under those of `keys` that are present (one row per chunk)."""
        sizes: dict[str, int] = {}
        for at in range(0, len(keys), _CHUNK):
            chunk = keys[at:at + _CHUNK]
            row = self._row(f"SELECT json_group_object(key, length(value)) FROM kv WHERE owner = ? AND key IN "
                            f"({','.join('?' * len(chunk))})", (owner, *chunk))
            sizes.update(_SIZES.decode(row[0]) if row else {})  # type: ignore[arg-type]
        return sizes

    def _apply(self, db: sqlite3.Connection, units: list[WriteUnit]) -> tuple[dict[int, StorageError], Written]:
        """Apply a transaction's `units` in the writer's open transaction, with each owner's
        up-to-date usage; returns the units refused (by id) and what it wrote (for the read cache).
        The quota is checked per unit, in each owner's order, on the sizes its earlier units leave: a
        unit that grows usage beyond it writes nothing. The checks are made in Python before anything
        is written, so the units need no savepoint each, and every owner's old sizes and usage are
        read, and the rows written, a statement per chunk for the whole transaction, not per owner or
        per write: every statement step lets go of the GIL, and getting it back behind busy guest
        threads may take a switch interval (5 ms)."""
        by_owner: dict[str, list[WriteUnit]] = {}
        for unit in units:
            by_owner.setdefault(unit.owner, []).append(unit)
        sizes, usage = self._old_sizes(db, units, list(by_owner))
        refused: dict[int, StorageError] = {}
        written: Written = []
        puts: list[tuple[str, str, bytes]] = []
        usages: list[tuple[str, int, int]] = []
        for name, owned in by_owner.items():
            used, count = usage.get(name, (0, 0))
            quota = self.quota(name)
            final: dict[str, bytes | None] = {}  # the last write of a key wins
            for unit in owned:
                changed = {op.key: op.value for op in unit.ops}
                before, after, new_count = used, used, count
                for key, value in changed.items():
                    prior = sizes.get((name, key))
                    if prior is not None:
                        after -= entry_cost(name, key, prior)
                        new_count -= 1
                    if value is not None:
                        after += entry_cost(name, key, len(value))
                        new_count += 1
                if after > before and after > max(quota, unit.checked_quota):  # shrinking is always allowed
                    refused[id(unit)] = StorageError("quota-exceeded")
                    continue
                used, count = after, new_count
                for key, value in changed.items():
                    sizes[(name, key)] = None if value is None else len(value)
                    final[key] = value
            if not final:
                continue
            usages.append((name, used, count))
            written.extend((name, key, value) for key, value in final.items())
            puts.extend((name, key, value) for key, value in final.items() if value is not None)
            deletes = [key for key, value in final.items() if value is None]
            for at in range(0, len(deletes), _CHUNK):
                chunk = deletes[at:at + _CHUNK]
                db.execute(f"DELETE FROM kv WHERE owner = ? AND key IN ({','.join('?' * len(chunk))})", (name, *chunk))
        for table, rows in (("kv (owner, key, value)", puts), ("usage (owner, used_bytes, key_count)", usages)):
            for at in range(0, len(rows), _ROWS):
                chunk_rows = rows[at:at + _ROWS]
                db.execute(f"INSERT OR REPLACE INTO {table} VALUES " + ",".join(["(?, ?, ?)"] * len(chunk_rows)),
                           [item for row in chunk_rows for item in row])
        return refused, written

    def _settled(self, written: Written | None) -> None:
        """The writer's transaction ended: the read cache learns what it wrote, or, when the commit
        failed (None), is cleared (what reached the disk is unknown)."""
        if written is None:
            self.cache.clear()
        else:
            self.cache.committed(written)

    @staticmethod
    def _old_sizes(db: sqlite3.Connection, units: list[WriteUnit], owners: list[str]) -> tuple[
            dict[tuple[str, str], int | None], dict[str, tuple[int, int]]]:
        """The committed value sizes of every (owner, key) the units write, and the owners' usage:
        one JSON row per chunk (a row per entry would let go of the GIL for each)."""
        pairs = list({(unit.owner, op.key): None for unit in units for op in unit.ops})
        sizes: dict[tuple[str, str], int | None] = dict.fromkeys(pairs)
        usage: dict[str, tuple[int, int]] = {}
        for at in range(0, len(owners), _CHUNK):
            chunk = owners[at:at + _CHUNK]
            found = db.execute("SELECT json_group_array(json_array(owner, used_bytes, key_count)) FROM usage "
                               f"WHERE owner IN ({','.join('?' * len(chunk))})", chunk).fetchone()[0]
            usage.update((owner, (used, count)) for owner, used, count in _TRIPLES.decode(found))
        for at in range(0, len(pairs), _CHUNK):
            chunk_pairs = pairs[at:at + _CHUNK]
            found = db.execute(
                "SELECT json_group_array(json_array(kv.owner, kv.key, length(kv.value))) FROM (VALUES "
                + ",".join(["(?, ?)"] * len(chunk_pairs))
                + ") AS w CROSS JOIN kv ON kv.owner = w.column1 AND kv.key = w.column2",  # w outside: key lookups
                [item for pair in chunk_pairs for item in pair]).fetchone()[0]
            sizes.update(((owner, key), size) for owner, key, size in _SIZE_ROWS.decode(found))
        return sizes, usage

    def exists(self, owner: ComponentId, key: str) -> bool:
        """Whether `key` is present."""
        check_key(key)
        cached = self._cached(str(owner), key)
        if cached is not None:
            return isinstance(cached, bytes)
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
            connections, self._connections = self._connections, set()
        for db in connections:
            with suppress(sqlite3.Error):
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            with suppress(sqlite3.Error):
                db.close()
