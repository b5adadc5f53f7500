"""The storage read cache: reads answered from it always equal what is committed, whatever the
interleaving with the writer, and it stays within its bytes however many keys a guest reads."""

from __future__ import annotations

import gc
import tempfile
import threading
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wasmhost.core import ComponentId, StorageError
from wasmhost.core.ids import MAX_PART_CHARS
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.held import MessageWrites
from wasmhost.storage.read_cache import ABSENT, DEFAULT_MAX_BYTES, ENTRY_OVERHEAD, MAX_VALUE_BYTES, ReadCache
from wasmhost.storage.sqlite_store import SqliteStorage

A = ComponentId.parse("org/a/0")


@pytest.fixture
def storage(tmp_path: Path) -> SqliteStorage:
    store = SqliteStorage(tmp_path / "storage.sqlite3", default_quota_bytes=1 << 20)
    yield store
    store.close()


def test_a_read_that_began_before_a_commit_never_brings_back_the_old_value() -> None:
    cache = ReadCache()
    cache.offer("org/a/0", "k", b"older", cache.token("org/a/0"))  # held: commits update it
    began = cache.token("org/a/0")  # a worker starts reading "k" from SQLite and finds b"old"...
    cache.committed([("org/a/0", "k", b"new")])  # ...while the writer commits b"new"
    cache.offer("org/a/0", "k", b"old", began)
    assert cache.lookup("org/a/0", "k") == b"new"
    assert not cache.fill("org/a/0", [("k", b"old")], began)  # nor does a whole namespace read meanwhile
    assert cache.lookup("org/a/0", "k") == b"new" and cache.lookup("org/a/0", "other") is None
    began = cache.token("org/a/0")
    cache.committed([("org/b/0", "k", b"b's")])  # another owner's commit changes nothing of a's
    cache.offer("org/a/0", "k2", b"read", began)
    assert cache.lookup("org/a/0", "k2") == b"read"
    cache.clear()
    cache.offer("org/a/0", "k", b"new", began)  # a failed commit voids every read begun before it
    assert cache.lookup("org/a/0", "k") is None


def test_forgetting_an_owner_drops_all_it_kept_and_voids_its_reads_under_way() -> None:
    """A removed component's bookkeeping goes with its entries; its commit count then starts again from zero,
    so a read begun before the forget must not match a token taken after as many commits again."""
    cache = ReadCache()
    cache.offer("org/a/0", "k", b"v1", cache.token("org/a/0"))
    cache.offer("org/b/0", "k", b"b", cache.token("org/b/0"))
    assert cache.claim_whole("org/a/0")
    began = cache.token("org/a/0")  # commit count 0: a read of b"v1" under way (a left-running guest's)
    cache.committed([("org/a/0", "k", b"v2")])
    cache.forget(["org/a/0"])
    assert cache.owners() == {"org/b/0"} and cache.lookup("org/a/0", "k") is None
    assert cache.nbytes == ENTRY_OVERHEAD + 1 + 1  # org/b/0's one entry: key "k", value b"b"
    cache.offer("org/a/0", "k", b"v1", began)  # the same commit count as now: still not kept
    assert cache.lookup("org/a/0", "k") is None


def test_commits_update_what_the_cache_holds_and_add_keys_only_to_whole_namespaces() -> None:
    cache = ReadCache()
    cache.committed([("flood/0", f"new-{i}", b"v") for i in range(1000)])  # a flood of new keys...
    assert len(cache) == 0  # ...churns nothing
    assert cache.fill("small/0", [("a", b"1")], cache.token("small/0"))
    cache.committed([("small/0", "b", b"2"), ("small/0", "a", None)])
    assert cache.lookup("small/0", "b") == b"2" and cache.lookup("small/0", "a") is ABSENT


def test_the_cache_keeps_within_its_bytes_dropping_the_least_recently_used() -> None:
    per_entry = ENTRY_OVERHEAD + 2 + 10
    cache = ReadCache(max_bytes=3 * per_entry)

    def read(key: str, value: bytes) -> None:
        cache.offer("o", key, value, cache.token("o"))

    for key in ("k1", "k2", "k3"):
        read(key, b"x" * 10)
    assert cache.lookup("o", "k1") == b"x" * 10  # k1 is now the most recently used
    read("k4", b"y" * 10)
    assert cache.lookup("o", "k2") is None and cache.lookup("o", "k1") is not None
    assert len(cache) == 3 and cache.nbytes == 3 * per_entry
    cache.committed([("o", "k1", b"z" * (MAX_VALUE_BYTES + 1))])  # too large to keep: dropped, not stale
    assert cache.lookup("o", "k1") is None and len(cache) == 2


def test_reads_see_every_committed_write_with_the_cache_warm(storage: SqliteStorage) -> None:
    assert storage.get(A, "k") is None and not storage.exists(A, "k")  # absent, and cached so
    storage.set(A, "k", b"v1")
    assert storage.get(A, "k") == b"v1" and storage.exists(A, "k")
    storage.set(A, "k", b"v2")
    assert storage.get(A, "k") == b"v2" and storage.value_size(str(A), "k") == 2
    storage.delete(A, "k")
    assert storage.get(A, "k") is None and not storage.exists(A, "k")
    big = b"b" * (MAX_VALUE_BYTES + 1)
    storage.set(A, "big", big)
    assert storage.get(A, "big") == big and storage.cache.lookup(str(A), "big") is None


def test_a_write_refused_by_the_quota_leaves_the_cached_value(storage: SqliteStorage) -> None:
    storage.set_quota(str(A), entry_cost(str(A), "k", 10))
    storage.set(A, "k", b"x" * 10)
    assert storage.get(A, "k") == b"x" * 10
    with pytest.raises(StorageError, match="quota-exceeded"):
        storage.set(A, "k", b"y" * 11)
    assert storage.get(A, "k") == b"x" * 10


def test_a_failed_commit_clears_the_cache_and_reads_go_to_the_disk(storage: SqliteStorage,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    storage.set(A, "k", b"committed")
    assert storage.get(A, "k") == b"committed" and len(storage.cache) == 1

    def broken(*_: object) -> dict[int, StorageError]:
        raise RuntimeError("the writer's own bug")  # stands in for a transaction that failed to commit

    monkeypatch.setattr(storage._writer, "_apply", broken)
    with pytest.raises(StorageError, match="io-error"):
        storage.set(A, "k", b"lost")
    assert len(storage.cache) == 0
    assert storage.get(A, "k") == b"committed"


@pytest.mark.parametrize("cache_bytes", [DEFAULT_MAX_BYTES, 3 * (ENTRY_OVERHEAD + 16)],
                         ids=["whole namespace", "key by key, evicted nonstop"])
def test_readers_racing_the_writer_never_see_a_value_older_than_the_last_acknowledged(
        tmp_path: Path, cache_bytes: int) -> None:
    """Readers race a writer on one key. With a cache of three entries, a fourth thread reads other
    keys nonstop, so the key is evicted and read from SQLite again and again: every such read races
    the commits (without the token check this fails within a few hundred commits)."""
    storage = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20, cache_bytes=cache_bytes)
    acknowledged = -1
    stale: list[tuple[int, int]] = []
    done = threading.Event()

    def write() -> None:
        nonlocal acknowledged
        try:
            for i in range(600):
                storage.set(A, "counter", str(i).encode())
                acknowledged = i
        finally:
            done.set()

    def read() -> None:
        while not done.is_set():
            floor = acknowledged
            value = storage.get(A, "counter")
            seen = -1 if value is None else int(value)
            if seen < floor:
                stale.append((seen, floor))

    other = ComponentId.parse("org/evictor/0")
    storage.set(other, "kept", b"too large a namespace to be read whole")

    def evict() -> None:
        i = 0
        while not done.is_set():
            storage.get(other, f"e{i % 50}")
            i += 1

    threads = [threading.Thread(target=write), threading.Thread(target=evict),
               *(threading.Thread(target=read) for _ in range(3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert acknowledged == 599 and stale == []
    assert storage.get(A, "counter") == b"599"
    storage.close()


def _write(store: SqliteStorage, owner: ComponentId, items: dict[str, bytes]) -> None:
    """Commit `items` for `owner` as one message's writes."""
    held = store.hold(owner)
    for key, value in items.items():
        held.set(key, value)
    held.end_message(True)
    held.commit()


def test_a_guest_reading_endless_distinct_keys_keeps_the_cache_within_its_bytes(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20, cache_bytes=64 * 1024)
    neighbour = ComponentId.parse("org/neighbour/0")
    _write(store, A, {f"k{i}": b"v" * 64 for i in range(100)})  # too large to be read whole: misses go to SQLite
    store.set(neighbour, "hot", b"mine")
    assert store.get(neighbour, "hot") == b"mine" and store.cache.lookup(str(neighbour), "hot") == b"mine"
    for i in range(20_000):
        assert store.get(A, f"probe-{i}") is None
    assert store.cache.nbytes <= 64 * 1024
    assert store.cache.lookup(str(neighbour), "hot") is None  # evicted by the flood...
    assert store.get(neighbour, "hot") == b"mine"  # ...so read from the disk again
    store.close()


def test_the_cache_bound_counts_wide_keys_and_long_component_ids_as_the_memory_they_take(tmp_path: Path) -> None:
    """A guest's keys with one character outside the BMP take 4 bytes per character in Python, and each
    read names its component afresh: the cache's real memory stays within its bytes all the same."""
    limit = 256 * 1024
    store = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 24, cache_bytes=limit)
    owner = ComponentId.parse("n" * MAX_PART_CHARS + "/" + "m" * MAX_PART_CHARS + "/0")
    store.set(owner, "big", b"x" * limit)  # too large to be read whole: every probe is a miss kept as absent
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3_000):
            assert store.get(owner, f"{i:06d}" + "a" * 500 + "\U0001F600") is None
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        store.close()
    assert len(store.cache) > 50 and store.cache.nbytes <= limit
    assert held <= 1.25 * limit, f"the cache holds {held} bytes for a bound of {limit}"


def test_a_small_namespace_is_read_whole_at_its_first_miss_then_absent_keys_cost_no_disk_read(
        tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20)
    _write(store, A, {"a": b"1", "b": b"2"})
    reopened = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20)  # a cold cache
    store.close()
    assert reopened.get(A, "absent") is None  # the first miss reads all of A
    assert reopened.cache.lookup(str(A), "a") == b"1" and reopened.cache.lookup(str(A), "other") is ABSENT
    misses = reopened.cache.misses
    assert [reopened.get(A, k) for k in ("a", "b", "c", "d")] == [b"1", b"2", None, None]
    assert not reopened.exists(A, "c") and reopened.value_size(str(A), "b") == 1
    assert reopened.cache.misses == misses  # every answer came from the cache
    _write(reopened, A, {"c": b"3", "a": b"one"})  # later commits keep the namespace whole
    assert [reopened.get(A, k) for k in ("a", "b", "c")] == [b"one", b"2", b"3"]
    reopened.delete(A, "b")
    assert reopened.get(A, "b") is None and reopened.cache.misses == misses
    reopened.close()


def test_a_namespace_read_whole_is_read_from_one_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit landing between the namespace's size check and the read of its rows does not make the
    read pull what the check did not count (a namespace grown to its quota, into memory at once)."""
    store = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 24)
    _write(store, A, {"small": b"s"})
    check = store.cache.fits_whole
    fill = store.cache.fill
    read: list[list[tuple[str, bytes]]] = []

    def check_then_grow(used: int, keys: int) -> bool:
        fits = check(used, keys)
        store.set(A, "huge", b"h" * (2 << 20))  # committed by the writer thread while the read is open
        return fits

    def kept(owner: str, rows: list[tuple[str, bytes]], token: tuple[int, int]) -> bool:
        read.append(rows)
        return fill(owner, rows, token)

    monkeypatch.setattr(store.cache, "fits_whole", check_then_grow)
    monkeypatch.setattr(store.cache, "fill", kept)
    assert store.get(A, "small") == b"s"
    assert read == [[("small", b"s")]]  # the rows the size check counted, not the 2 MiB committed since
    assert store.get(A, "huge") == b"h" * (2 << 20)  # and the cache, voided by that commit, reads it from disk
    store.close()


def test_a_namespace_holding_a_large_value_or_losing_an_entry_is_no_longer_whole(tmp_path: Path) -> None:
    store = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20)
    assert store.get(A, "x") is None  # read whole: empty
    store.set(A, "big", b"b" * (MAX_VALUE_BYTES + 1))  # not kept: the namespace is no longer whole
    assert store.get(A, "big") == b"b" * (MAX_VALUE_BYTES + 1)
    assert store.cache.lookup(str(A), "other") is None
    store.close()
    small = SqliteStorage(tmp_path / "t.sqlite3", default_quota_bytes=1 << 20, cache_bytes=16 * 1024)
    _write(small, A, {"k": b"v"})
    small.cache.clear()
    assert small.get(A, "k") == b"v"  # read whole at this miss
    flooder = ComponentId.parse("org/b/0")
    _write(small, flooder, {f"f{i}": b"v" * 64 for i in range(40)})  # too large to be read whole
    for i in range(200):  # its misses push A's entries out
        small.get(flooder, f"p{i}")
    assert small.cache.lookup(str(A), "k") is None
    assert small.get(A, "k") == b"v" and small.get(A, "nothing") is None
    small.close()


KEYS = st.sampled_from(["a", "b", "c"])
OPS = st.one_of(st.tuples(st.just("set"), KEYS, st.binary(max_size=8)), st.tuples(st.just("delete"), KEYS, st.none()),
                st.tuples(st.just("get"), KEYS, st.none()))
BATCH = st.lists(st.tuples(st.lists(OPS, max_size=4), st.booleans()), min_size=1, max_size=3)  # messages, ok?


def _applied(values: dict[str, bytes], writes: dict[str, bytes | None]) -> dict[str, bytes]:
    """`values` after `writes` (None: deleted)."""
    after = {**values, **{k: v for k, v in writes.items() if v is not None}}
    return {k: v for k, v in after.items() if writes.get(k, v) is not None}


def _handle(held: MessageWrites, ops: list[tuple[str, str, bytes | None]], before: dict[str, bytes]
            ) -> dict[str, bytes | None]:
    """One message's `ops` on `held`, each read checked against `before` (what it may see of earlier
    messages) with its own writes applied; returns its writes (None: deleted)."""
    current = dict[str, bytes | None]()
    for op, key, value in ops:
        if op == "set":
            held.set(key, value or b"")
            current[key] = value or b""
        elif op == "delete":
            held.delete(key)
            current[key] = None
        else:
            assert held.get(key) == _applied(before, current).get(key)
    return current


@settings(max_examples=40, deadline=None)
@given(st.lists(BATCH, max_size=5))
def test_reads_through_the_cache_match_a_model_of_the_committed_messages(
        batches: list[list[tuple[list[tuple[str, str, bytes | None]], bool]]]) -> None:
    """Batches of messages as an actor handles them (each message's writes kept only when it ends
    ok): every read, inside a message and after each commit, equals a plain dict's answer."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStorage(Path(tmp) / "s.sqlite3", default_quota_bytes=1 << 20)
        committed: dict[str, bytes] = {}
        try:
            for batch in batches:
                held, kept = store.hold(A), dict[str, bytes | None]()
                for ops, ok in batch:
                    current = _handle(held, ops, _applied(committed, kept))
                    held.end_message(ok)
                    if ok:
                        kept.update(current)
                held.commit()
                committed = _applied(committed, kept)
                for key in ("a", "b", "c"):
                    assert store.get(A, key) == committed.get(key)
                    assert store.exists(A, key) == (key in committed)
                usage = store.usage(A)
                assert usage.key_count == len(committed)
                assert usage.used_bytes == sum(entry_cost(str(A), k, len(v)) for k, v in committed.items())
        finally:
            store.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(BATCH, max_size=6))
def test_pipelined_batches_on_one_held_object_match_a_model_of_the_committed_messages(
        batches: list[list[tuple[list[tuple[str, str, bytes | None]], bool]]]) -> None:
    """As an actor runs: one held object across batches, each batch handed to the writer without
    waiting and the next handled meanwhile. Every read and the usage inside a message, and what is
    committed in the end, equal a plain dict's answer."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStorage(Path(tmp) / "s.sqlite3", default_quota_bytes=1 << 20)
        committed: dict[str, bytes] = {}  # through the last batch handed over
        held = store.hold(A)
        pending = None
        try:
            for batch in batches:
                kept = dict[str, bytes | None]()
                for ops, ok in batch:
                    current = _handle(held, ops, _applied(committed, kept))
                    seen = _applied(committed, {**kept, **current})
                    assert held.usage().key_count == len(seen)
                    assert held.usage().used_bytes == sum(entry_cost(str(A), k, len(v)) for k, v in seen.items())
                    held.end_message(ok)
                    if ok:
                        kept.update(current)
                committed = _applied(committed, kept)
                pending = held.start_commit() or pending  # waits for the batch before, not for this one
            if pending is not None:
                assert pending.wait() is None
            assert {k: store.get(A, k) for k in ("a", "b", "c") if store.exists(A, k)} == committed
            assert store.usage(A).key_count == len(committed)
        finally:
            store.close()
