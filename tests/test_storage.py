"""SQLite storage: isolation, key rules, quotas, durability across kill -9, io errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from wasmhost.core import ComponentId, StorageError
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.sqlite_store import SqliteStorage

A = ComponentId.parse("org/a/0")
B = ComponentId.parse("org/b/0")


@pytest.fixture
def storage(tmp_path: Path) -> SqliteStorage:
    store = SqliteStorage(tmp_path / "state" / "storage.sqlite3", default_quota_bytes=1000)
    yield store
    store.close()


def test_basic_operations(storage: SqliteStorage) -> None:
    assert storage.get(A, "k") is None
    storage.set(A, "k", b"v1")
    storage.set(A, "k", b"value-2")
    assert storage.get(A, "k") == b"value-2"
    assert storage.exists(A, "k") and not storage.exists(A, "other")
    storage.set(A, "k2", b"")
    assert storage.list_keys(A, None) == ["k", "k2"]
    usage = storage.usage(A)
    charged = entry_cost(str(A), "k", 7) + entry_cost(str(A), "k2", 0)
    assert (usage.used_bytes, usage.quota_bytes, usage.key_count) == (charged, 1000, 2)
    storage.delete(A, "k")
    storage.delete(A, "absent")
    assert storage.list_keys(A, None) == ["k2"]
    assert storage.usage(A).used_bytes == entry_cost(str(A), "k2", 0)


def test_prefixes_match_literally(storage: SqliteStorage) -> None:
    for key in ("a%b", "axb", "a_c", "abc", "a\\d"):
        storage.set(A, key, b"1")
    assert storage.list_keys(A, "a%") == ["a%b"]
    assert storage.list_keys(A, "a_") == ["a_c"]
    assert storage.list_keys(A, "a\\") == ["a\\d"]


def test_components_never_see_each_others_keys(storage: SqliteStorage) -> None:
    storage.set(A, "shared", b"from a")
    storage.set(B, "shared", b"from b")
    for sneaky in ("../a/0/shared", "org/a/0/shared", "%", "shared\x01"):
        assert storage.get(B, sneaky) is None
    assert storage.get(A, "shared") == b"from a"
    assert storage.get(B, "shared") == b"from b"
    assert storage.list_keys(B, None) == ["shared"]
    storage.delete(B, "shared")
    assert storage.get(A, "shared") == b"from a"


@pytest.mark.parametrize(("key", "reason"), [("", "empty"), ("a\x00b", "NUL"), ("k" * 1025, "limit is 1024")])
def test_bad_keys_are_invalid_key(storage: SqliteStorage, key: str, reason: str) -> None:
    with pytest.raises(StorageError) as info:
        storage.set(A, key, b"v")
    assert info.value.case == "invalid-key" and reason in str(info.value)
    with pytest.raises(StorageError, match="invalid-key"):
        storage.get(A, key)


def test_quota_exceeded_writes_nothing(storage: SqliteStorage) -> None:
    one = entry_cost(str(A), "k", 10)
    storage.set_quota(str(A), one + entry_cost(str(A), "k2", 10) - 1)
    storage.set(A, "k", b"x" * 10)
    with pytest.raises(StorageError) as info:
        storage.set(A, "k2", b"y" * 10)
    assert info.value.case == "quota-exceeded"
    assert storage.get(A, "k2") is None and storage.usage(A).used_bytes == one
    storage.set(A, "k", b"z" * 19)  # replacing within the quota is fine
    assert storage.get(A, "k") == b"z" * 19


def test_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    first = SqliteStorage(path)
    first.set(A, "k", b"kept")
    first.close()
    second = SqliteStorage(path)
    assert second.get(A, "k") == b"kept" and second.usage(A).key_count == 1
    second.close()


def test_concurrent_writers_all_land(storage: SqliteStorage) -> None:
    storage.set_quota(str(A), 1 << 20)

    def write(thread: int) -> None:
        for i in range(50):
            storage.set(A, f"t{thread}-{i}", b"v")

    threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert storage.usage(A).key_count == 400
    assert len(storage.list_keys(A, "t3-")) == 50


def test_an_unusable_database_gives_io_errors(tmp_path: Path) -> None:
    path = tmp_path / "blocked"
    path.mkdir()  # a directory where the database file should be: fails even as root
    store = SqliteStorage(path)
    with pytest.raises(StorageError) as info:
        store.set(A, "k", b"v")
    assert info.value.case == "io-error"
    assert store.io_errors >= 1 and store.last_io_error
    store.close()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from wasmhost.core import ComponentId
    from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.sqlite_store import SqliteStorage
    store = SqliteStorage(Path(sys.argv[1]), default_quota_bytes=1 << 30)
    owner = ComponentId.parse("org/writer/0")
    i = 0
    while True:
        store.set(owner, f"key-{i}", f"value-{i}".encode())
        print(i, flush=True)
        i += 1
    """
)


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "durable.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    acknowledged = -1
    for line in proc.stdout:
        acknowledged = int(line)
        if acknowledged >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = SqliteStorage(path)
    owner = ComponentId.parse("org/writer/0")
    missing = [i for i in range(acknowledged + 1) if store.get(owner, f"key-{i}") != f"value-{i}".encode()]
    store.close()
    assert missing == []
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
