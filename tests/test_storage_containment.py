"""Storage containment: a flooding component cannot starve another's writes, the quota bounds the
disk really used, failures stay per write and every wait is bounded, and everything on disk is
owner-only whatever the umask."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import fixture_path
from tests.support import guarded_supervisor
from tests.test_actors import ask, launch
from tests.test_daemon import Daemon, component, config_text, wasmhost
from tests.waits import until, wait_for
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId, StorageError
from wasmhost.core.blocking import blocking
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import Capabilities
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.storage.writer import MAX_BATCH_UNITS, WriteOp, WriteUnit
from wasmhost.system.config import parse_config
from wasmhost.system.daemon import prepare_state_dir

FLOOD = ComponentId.parse("org/flood/0")
QUIET = ComponentId.parse("org/quiet/0")


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[SqliteStorage]:
    store = SqliteStorage(tmp_path / "state" / "storage.sqlite3", default_quota_bytes=1 << 30)
    yield store
    store.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- fairness ---------------------------------------------------------------------------------------


def test_the_writer_serves_owners_round_robin_whatever_one_has_queued(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStorage(path)
    writer = store._writer
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.executescript("""
        CREATE TABLE commit_log (seq INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL);
        CREATE TRIGGER log_rows AFTER INSERT ON kv BEGIN INSERT INTO commit_log (owner) VALUES (new.owner); END;
    """)
    blocker.execute("BEGIN EXCLUSIVE")  # hold the writer while the queues fill up
    first = WriteUnit(str(FLOOD), [WriteOp("first", b"")])
    store.enqueue(first)
    wait_for(lambda: writer.units_taken == 1, "the writer takes it and waits for the lock", 10, every=0.002)
    backlog = [WriteUnit(str(FLOOD), [WriteOp(f"k{i}", b"")]) for i in range(2 * MAX_BATCH_UNITS)]
    for unit in backlog:
        store.enqueue(unit)
    quiet = WriteUnit(str(QUIET), [WriteOp("q", b"v")])
    store.enqueue(quiet)
    blocker.execute("ROLLBACK")
    for unit in [first, *backlog, quiet]:
        store.wait(unit)
    order = [owner for (owner,) in blocker.execute("SELECT owner FROM commit_log ORDER BY seq")]
    blocker.close()
    store.close()
    assert order.count(str(FLOOD)) == 1 + 2 * MAX_BATCH_UNITS and order.count(str(QUIET)) == 1
    # The transaction in progress ("first"), then the next one (at most MAX_BATCH_UNITS units, in
    # whatever order within it): the quiet write goes with the flood's next writes, not after its
    # backlog of two transactions' worth.
    assert order[:order.index(str(QUIET))].count(str(FLOOD)) <= MAX_BATCH_UNITS, order


def test_one_failing_write_in_a_batch_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStorage(path, default_quota_bytes=1 << 20)
    store.set_quota(str(FLOOD), entry_cost(str(FLOOD), "k", 10))
    errors: dict[str, StorageError | None] = {}

    def write(owner: ComponentId, key: str, value: bytes) -> None:
        try:
            store.set(owner, key, value)
            errors[key] = None
        except StorageError as exc:
            errors[key] = exc

    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer waits on it with everything queued behind
    writer, taken = store._writer, store._writer.units_taken
    first = threading.Thread(target=write, args=(QUIET, "first", b"1"))
    first.start()
    wait_for(lambda: writer.units_taken == taken + 1, 'the writer takes "first" alone and waits', 10, every=0.002)
    batches = writer.batches
    later = [threading.Thread(target=write, args=args) for args in (
        (FLOOD, "big", b"x" * 100), (QUIET, "second", b"2"), (ComponentId.parse("org/third/0"), "third", b"3"))]
    for t in later:
        t.start()
    wait_for(lambda: writer.queued() == 3, "three units queued", 10, every=0.002)
    blocker.execute("ROLLBACK")
    for t in [first, *later]:
        t.join(10)
    assert errors["big"] is not None and errors["big"].case == "quota-exceeded"
    assert errors["first"] is None and errors["second"] is None and errors["third"] is None
    assert writer.batches - batches == 2  # "first" alone, then the three together
    assert store.get(QUIET, "second") == b"2" and store.get(FLOOD, "big") is None
    assert store.usage(FLOOD).key_count == 0
    store.close()


def test_a_hung_database_answers_io_error_within_the_bound_and_withdraws_queued_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    store = SqliteStorage(path, write_timeout_s=0.5)
    store.set(QUIET, "before", b"1")
    results: dict[str, str] = {}

    def write(key: str) -> None:
        try:
            store.set(QUIET, key, b"v")
            results[key] = "ok"
        except StorageError as exc:
            results[key] = str(exc)

    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # as if the disk hung: the writer cannot commit
    taken = store._writer.units_taken
    stuck = threading.Thread(target=write, args=("stuck",))
    stuck.start()
    wait_for(lambda: store._writer.units_taken == taken + 1, "taken, and the writer waits on the lock", 10,
             every=0.002)
    queued = threading.Thread(target=write, args=("queued",))
    queued.start()
    stuck.join(5)
    queued.join(5)
    assert not stuck.is_alive() and not queued.is_alive()
    assert "io-error" in results["stuck"] and "not confirmed" in results["stuck"]
    assert "io-error" in results["queued"] and "nothing was written" in results["queued"]
    blocker.execute("ROLLBACK")
    blocker.close()
    store._writer.timeout_s = 10.0
    store.set(QUIET, "after", b"2")  # the writer recovers once the database answers again
    assert store.get(QUIET, "queued") is None and store.get(QUIET, "after") == b"2"
    assert store.io_errors >= 2
    store.close()


def test_a_hung_database_fails_a_batch_of_many_messages_within_one_bound(tmp_path: Path) -> None:
    """A batch's commit is one unit per message; each unit's wait had the whole bound of its own, so a
    hung disk held the actor's thread for 64 x 10 s. The batch's units now share one bound."""
    path = tmp_path / "s.sqlite3"
    store = SqliteStorage(path, write_timeout_s=0.3)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        held = store.hold(QUIET)
        for i in range(8):  # a batch of eight messages, one unit each
            held.set(f"k{i}", b"v")
            held.end_message(True)
        blocker.execute("BEGIN EXCLUSIVE")  # as if the disk hung: the writer cannot commit
        pending = held.start_commit()
        assert pending is not None
        began = time.monotonic()
        error = pending.wait()
        waited = time.monotonic() - began
        assert error is not None and error.case == "io-error"
        assert waited < 2 * store.write_timeout_s, f"{waited:.2f} s for a bound of {store.write_timeout_s} s"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        store.close()


def test_if_the_writer_thread_dies_writes_are_io_errors_not_hangs(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = SqliteStorage(tmp_path / "s.sqlite3")
    store.set(QUIET, "k", b"v")

    class Died(BaseException):
        pass

    def die() -> list[object]:
        raise Died("simulated")

    monkeypatch.setattr(store._writer, "_take", die)
    with structlog.testing.capture_logs() as logs, pytest.raises(StorageError) as queued:
        store.set(QUIET, "k2", b"v")  # queued when the thread died: failed by it on the way out
    assert queued.value.case == "io-error" and "writer stopped" in str(queued.value)
    assert any(e["event"] == "storage_writer_died" for e in logs)
    with pytest.raises(StorageError, match="not running"):
        store.set(QUIET, "k3", b"v")
    assert store.get(QUIET, "k") == b"v" and store.get(QUIET, "k2") is None  # reads still work
    store.close()


def test_writes_after_close_are_io_errors_not_hangs(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.sqlite3")
    store.set(QUIET, "k", b"v")
    store.close()
    with pytest.raises(StorageError) as info:
        store.set(QUIET, "k2", b"v")
    assert info.value.case == "io-error"


# --- quota accounting --------------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(db.execute("PRAGMA page_count").fetchone()[0]) * int(db.execute("PRAGMA page_size").fetchone()[0])


@pytest.mark.parametrize(("key", "value"), [
    (lambda i: f"k{i}", b""),                      # the reported case: many tiny keys
    (lambda i: f"key-{i:06d}-" + "z" * 30, b"v"),  # longer keys
    (lambda i: f"k{i}", b"x" * 1100),              # rows just too large for one cell: an overflow page each
])
def test_the_quota_bounds_the_disk_really_used(tmp_path: Path, key: object, value: bytes) -> None:
    quota = 96 * 1024
    empty = tmp_path / "empty.sqlite3"
    SqliteStorage(empty).close()
    path = tmp_path / "full.sqlite3"
    store = SqliteStorage(path, default_quota_bytes=quota)
    owner = ComponentId.parse("some-namespace/flooder/0")
    stored = 0
    while True:
        try:
            store.set(owner, key(stored), value)  # type: ignore[operator]
        except StorageError as exc:
            assert exc.case == "quota-exceeded"
            break
        stored += 1
    usage = store.usage(owner)
    store.close()
    assert usage.key_count == stored >= 20 and usage.used_bytes <= quota
    grown = file_bytes(path) - file_bytes(empty)
    assert grown <= quota + 4 * 4096, f"{stored} keys charged {usage.used_bytes} bytes took {grown} on disk"


def test_usage_written_by_an_older_version_is_recounted_at_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # what version 0 left: usage = key + value bytes
        db.executescript("""
            CREATE TABLE kv (owner TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                             PRIMARY KEY (owner, key)) WITHOUT ROWID;
            CREATE TABLE usage (owner TEXT PRIMARY KEY, used_bytes INTEGER NOT NULL,
                                key_count INTEGER NOT NULL) WITHOUT ROWID;
        """)
        db.executemany("INSERT INTO kv VALUES (?, ?, ?)", [(str(QUIET), f"k{i}", b"") for i in range(100)])
        db.execute("INSERT INTO usage VALUES (?, ?, ?)", (str(QUIET), 290, 100))
    with structlog.testing.capture_logs() as logs:
        store = SqliteStorage(path)
    expected = sum(entry_cost(str(QUIET), f"k{i}", 0) for i in range(100))
    assert store.usage(QUIET).used_bytes == expected and store.usage(QUIET).key_count == 100
    assert [e["owners"] for e in logs if e["event"] == "storage_usage_recounted"] == [1]
    store.close()
    with structlog.testing.capture_logs() as logs:
        SqliteStorage(path).close()  # recounted once: the file now says which rule it follows
    assert not [e for e in logs if e["event"] == "storage_usage_recounted"]


# --- file modes --------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o000], ids=["umask022", "umask000"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_storage_and_cache_files_are_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "state"
    store = SqliteStorage(state / "storage.sqlite3")
    store.set(QUIET, "secret", b"v")
    assert store.get(QUIET, "secret") == b"v"  # a reader connection exists: the -shm file too
    files = {p.name: mode(p) for p in state.iterdir()}
    store.close()
    assert mode(state) == 0o700
    assert files == {"storage.sqlite3": 0o600, "storage.sqlite3-wal": 0o600, "storage.sqlite3-shm": 0o600}

    runtime = Runtime(cache_dir=state / "cache")
    try:
        runtime.load(QUIET, fixture_path("echo"))
    finally:
        runtime.close()
    assert mode(state / "cache") == 0o700
    entries = list((state / "cache").iterdir())
    assert entries and {mode(p) for p in entries} == {0o600}


def test_looser_existing_files_and_directories_are_tightened_and_logged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    SqliteStorage(state / "storage.sqlite3").close()
    (state / "cache").mkdir(mode=0o755)
    for path, loose in ((state, 0o755), (state / "storage.sqlite3", 0o644), (state / "cache", 0o777)):
        os.chmod(path, loose)
    with structlog.testing.capture_logs() as logs:
        SqliteStorage(state / "storage.sqlite3").close()
        Runtime(cache_dir=state / "cache").close()
    assert (mode(state / "storage.sqlite3"), mode(state / "cache")) == (0o600, 0o700)
    tightened = {e["path"]: (e["was"], e["now"]) for e in logs if e["event"] == "permissions_tightened"}
    assert tightened == {str(state / "storage.sqlite3"): ("0644", "0600"), str(state / "cache"): ("0777", "0700")}


def test_the_daemon_keeps_its_state_owner_only_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o777)
    os.chmod(state, 0o777)  # an existing directory anyone could enter: tightened at start
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(state, component("t/notes/0", "storage", "capabilities = { storage = true }")))
    d = Daemon(tmp_path, config)  # inherits this umask
    try:
        d.expect("READY=1")
        assert d.call("t/notes/0", "set secret 42") == "ok"
        assert mode(state) == 0o700
        db_files = {p.name: mode(p) for p in state.iterdir() if p.name.startswith("storage.sqlite3")}
        assert db_files == {"storage.sqlite3": 0o600, "storage.sqlite3-wal": 0o600, "storage.sqlite3-shm": 0o600}
        assert mode(state / "cache") == 0o700
        assert {mode(p) for p in (state / "cache").iterdir()} == {0o600}
    finally:
        assert d.stop() == 0
    events = [json.loads(line) for line in d.log.read_text().splitlines() if line.startswith("{")]
    assert any(e["event"] == "permissions_tightened" and e["path"] == str(state) for e in events)


def test_wasmhost_check_creates_the_state_and_cache_owner_only(tmp_path: Path, umask: int) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", component("t/echo/0", "echo")))
    result = wasmhost("check", str(config))  # inherits this umask
    assert result.returncode == 0, result.stderr
    assert (mode(tmp_path / "state"), mode(tmp_path / "state" / "cache")) == (0o700, 0o700)
    assert {mode(p) for p in (tmp_path / "state" / "cache").iterdir()} == {0o600}


def test_a_group_control_socket_inside_state_dir_gets_group_traverse_only(tmp_path: Path) -> None:
    import grp

    state = tmp_path / "state"
    config = parse_config(f'[host]\nstate_dir = "{state}"\nsocket_mode = "0660"\nsocket_group = "nogroup"\n',
                          tmp_path / "wasmhost.toml")
    prepare_state_dir(config)
    assert mode(state) == 0o710 and state.stat().st_gid == grp.getgrnam("nogroup").gr_gid
    outside = parse_config(f'[host]\nstate_dir = "{state}"\nsocket_mode = "0660"\nsocket_group = "nogroup"\n'
                           f'control_socket = "{tmp_path / "ctl.sock"}"\n', tmp_path / "wasmhost.toml")
    prepare_state_dir(outside)
    assert mode(state) == 0o700


# --- a hostile guest next to a well-behaved one -------------------------------------------------------


@pytest.fixture
async def guarded(runtime: Runtime, tmp_path: Path) -> AsyncIterator[Supervisor]:
    async with guarded_supervisor(runtime, tmp_path / "storage.sqlite3", 1 << 30) as sup:
        yield sup  # type: ignore[misc]


@pytest.mark.anyio
async def test_a_storage_flooding_guest_does_not_starve_its_neighbours_writes(guarded: Supervisor) -> None:
    assert guarded.stores.permissions is not None and guarded.stores.storage is not None
    flood, notes = "test-org/storageflood/0", "test-org/storage/0"
    for cid, fixture in ((flood, "storageflood"), (notes, "storage")):
        guarded.stores.permissions.grant(ComponentId.parse(cid), Capabilities(storage=True))
        await launch(guarded, fixture, cid)
    store, flooder = guarded.stores.storage, ComponentId.parse(flood)
    stop = asyncio.Event()

    async def keep_flooding() -> int:
        calls = 0
        while not stop.is_set():  # back to back: the flooder is always in its write loop
            assert await ask(guarded, flood, b"200", timeout=30.0) == b"200"
            calls += 1
        return calls

    task = asyncio.ensure_future(keep_flooding())
    while store.usage(flooder).key_count < 50:
        await asyncio.sleep(0.005)
    counts = []
    for i in range(30):
        before = store.usage(flooder).key_count
        assert await ask(guarded, notes, f"set n{i} value-{i}".encode(), timeout=10.0) == b"ok"
        counts.append(store.usage(flooder).key_count - before)
    assert not task.done(), "the flood should still be running"
    stop.set()
    assert await task >= 1
    assert await ask(guarded, notes, b"get n29") == b"value-29"
    assert sum(counts) > 0, "the flood must have overlapped the neighbour's writes"
    # A message's writes commit as one unit, so the flooder's land 200 at a time (its messages are
    # atomic), and it has one unit in flight at a time: each of the neighbour's writes waits for at
    # most the flooder's unit being committed and shares the next batch with another (the bound has
    # room for this thread being descheduled). Before the writer was fair: thousands of writes at times.
    assert all(count % 200 == 0 for count in counts), counts
    assert sum(counts) // 200 <= 3 * len(counts), counts


@pytest.mark.anyio
async def test_a_guest_reading_endless_distinct_keys_keeps_the_read_cache_bounded_and_its_neighbour_right(
        runtime: Runtime, tmp_path: Path) -> None:
    cache_bytes = 16 * 1024
    async with guarded_supervisor(runtime, tmp_path / "storage.sqlite3", 1 << 30, cache_bytes) as sup:
        assert isinstance(sup, Supervisor) and sup.stores.permissions is not None
        prober, neighbour = "test-org/storage/1", "test-org/storage/0"
        for cid in (prober, neighbour):
            sup.stores.permissions.grant(ComponentId.parse(cid), Capabilities(storage=True))
            await launch(sup, "storage", cid)
        for i in range(20):  # too large a namespace to be read whole: its misses go to SQLite, key by key
            assert await ask(sup, prober, f"set k{i} {'v' * 64}".encode()) == b"ok"
        assert await ask(sup, neighbour, b"set hot mine") == b"ok"
        store = sup.stores.storage
        assert store is not None
        for i in range(600):  # each a new key: a cache entry that evicts an older one
            await ask(sup, prober, f"get probe-{i}".encode())
            if i % 50 == 0:
                assert await ask(sup, neighbour, b"get hot") == b"mine"
            assert store.cache.nbytes <= cache_bytes
        assert await ask(sup, neighbour, b"set hot changed") == b"ok"
        assert await ask(sup, neighbour, b"get hot") == b"changed"
        assert await ask(sup, prober, b"get k7") == b"v" * 64


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.anyio
async def test_threads_lent_while_guests_wait_leave_no_storage_connection_open(guarded: Supervisor) -> None:
    # Threads waiting in host calls (a storage commit; sleep-millis was one before it suspended calls
    # instead) make the pool lend threads, which end once idle again; a lent thread that served a storage
    # read (`usage` always reads SQLite) opened a connection of its own. Before, every one stayed open,
    # about 100 files a second under such a load, until the daemon ran out of descriptors.
    assert guarded.stores.permissions is not None
    readers = [f"test-org/storage/{i}" for i in range(6)]
    for cid in readers:
        guarded.stores.permissions.grant(ComponentId.parse(cid), Capabilities(storage=True))
        await launch(guarded, "storage", cid)
    pool = guarded.workers

    def wait_in_a_host_call() -> None:
        with blocking():  # as a storage write waits for its group commit: the pool lends a thread meanwhile
            time.sleep(0.005)

    async def round_of_naps_and_reads() -> None:
        await asyncio.gather(*(pool.run(wait_in_a_host_call) for _ in range(6)),
                             *(ask(guarded, cid, b"usage") for cid in readers))
        await until(lambda: pool.threads == pool.size)  # the lent threads have ended

    await round_of_naps_and_reads()
    before, started = open_files(), pool.started
    for _ in range(30):
        await round_of_naps_and_reads()
    lent = pool.started - started
    assert lent >= 10, "the waits should have made the pool lend threads"
    assert open_files() - before < 10, f"{open_files() - before} files left open after {lent} lent threads ended"
