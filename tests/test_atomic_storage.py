"""A message's storage effects are atomic and durable before it is answered: guests that write and
then fail (an error, a trap, fuel, a deadline, a stop) leave nothing behind; a guest that succeeds
leaves all of it; later messages see it, and a message reads its own writes. Real wasmtime, real
components (tests/fixtures/wat/txguest.wat), real SQLite."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.conftest import fixture_path
from tests.waits import wait_for
from wasmhost.actors.actor import BATCH_SIZE, ComponentActor
from wasmhost.actors.restart import Backoff
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.errors import StorageError, WasmError
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.metadata import HealthStatus
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.host_fn import HostContext, storage_set
from wasmhost.runtime.runtime import Runtime
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.held import PendingCommit
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.system.heap import steady_collector
from wasmhost.system.stores import HostStores

pytestmark = pytest.mark.anyio

BOUND = 30.0
"""What any answer here may take at most (a loaded machine; the guests would loop forever)."""
LONG = ResourceLimits(max_execution_time_ms=600_000)


@dataclass
class Host:
    sup: Supervisor
    storage: SqliteStorage

    async def start(self, name: str, limits: ResourceLimits = LONG) -> ComponentActor:
        cid = ComponentId.parse(name)
        spec = ActorSpec(cid, limits=limits, storage=True, backoff=Backoff(0.01, 0.05))
        return await self.sup.start(spec, self.sup.stores.runtime.load(cid, fixture_path("txguest")))

    def ask(self, actor: ComponentActor, payload: bytes) -> asyncio.Future[bytes | None]:
        return asyncio.ensure_future(self.sup.router.host_request(actor.component_id, payload, 600.0))

    async def answer(self, actor: ComponentActor, payload: bytes) -> object:
        """The reply, or the outcome of a request that failed."""
        with anyio.fail_after(BOUND):
            try:
                return await self.ask(actor, payload)
            except RequestFailed as exc:
                return exc.outcome

    def stored(self, actor: ComponentActor) -> dict[str, bytes]:
        """What is committed for `actor`, read with the storage's own reads (not through any held writes)."""
        owner = actor.component_id
        return {key: self.storage.get(owner, key) or b"" for key in self.storage.list_keys(owner, None)}


@pytest.fixture
async def host(runtime: Runtime, tmp_path: Path) -> AsyncIterator[Host]:
    workers = WorkerPool(4)
    storage = SqliteStorage(tmp_path / "storage.sqlite3")
    router = MessageRouter(asyncio.get_running_loop())
    try:
        async with Supervisor(HostStores(runtime, router, storage), router, workers) as sup:
            try:
                yield Host(sup, storage)
            finally:
                await sup.stop_all(drain_timeout=1.0)
    finally:
        workers.close()
        storage.close()


async def test_a_message_that_ends_ok_commits_all_its_writes_and_later_messages_see_them(host: Host) -> None:
    actor = await host.start("t/tx/0")
    assert await host.answer(actor, b"o a") == b"v1"  # read-your-writes inside the message
    assert host.stored(actor) == {"a": b"v1", "last": b"a"}  # committed before the reply was released
    assert await host.answer(actor, b"g a") == b"v1"
    assert await host.answer(actor, b"g last") == b"a"


async def test_acknowledged_writes_waiting_for_their_commit_do_not_make_the_collector_run(host: Host) -> None:
    """A message that writes storage keeps its objects (envelope, reply, held write, write unit) until its
    batch's commit is confirmed, and at CPython's default threshold the collector then ran every ~115
    acknowledged sets, freeing nothing (5 - 7 us of CPU per set, a tenth of its cost, in the bench's set
    row). The daemon collects the youngest generation less often (system/heap.py)."""
    actors = [await host.start(f"t/tx/{i}") for i in range(2)]
    collections = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal collections
        collections += phase == "start"

    keys = iter(range(3000))

    async def client(actor: ComponentActor) -> None:
        for i in keys:
            assert await host.ask(actor, b"o k%d" % (i % 500)) == b"v1"

    with steady_collector():
        gc.collect()
        gc.callbacks.append(count)
        try:
            with anyio.fail_after(BOUND):
                async with anyio.create_task_group() as tg:
                    for actor in actors:
                        for _ in range(128):
                            tg.start_soon(client, actor)
        finally:
            gc.callbacks.remove(count)
    assert len(host.stored(actors[0])) + len(host.stored(actors[1])) > 500
    assert collections <= 10, f"{collections} collections for 3,000 acknowledged messages"


async def test_list_keys_inside_a_message_sees_its_own_writes(host: Host) -> None:
    actor = await host.start("t/tx/0")
    assert await host.answer(actor, b"k a") == b"2"  # "a" and "last", neither committed yet when listed
    assert await host.answer(actor, b"k b") == b"3"


async def test_a_message_that_returns_an_error_writes_nothing(host: Host) -> None:
    actor = await host.start("t/tx/0")
    assert await host.answer(actor, b"o a") == b"v1"
    assert await host.answer(actor, b"e b") is Outcome.FAILED
    assert host.stored(actor) == {"a": b"v1", "last": b"a"}  # neither "b" nor last = "b"
    assert await host.answer(actor, b"g b") == b"(none)"


async def test_a_message_that_traps_writes_nothing(host: Host) -> None:
    actor = await host.start("t/tx/0")
    assert await host.answer(actor, b"o a") == b"v1"
    assert await host.answer(actor, b"t b") is Outcome.FAILED
    assert host.stored(actor) == {"a": b"v1", "last": b"a"}
    assert await host.answer(actor, b"g last") == b"a"  # the restarted instance sees what was committed


async def test_a_message_out_of_fuel_writes_nothing(host: Host) -> None:
    actor = await host.start("t/tx/0", ResourceLimits(max_fuel=2_000_000, max_execution_time_ms=600_000))
    assert await host.answer(actor, b"l b") is Outcome.FAILED
    assert host.stored(actor) == {}
    assert await host.answer(actor, b"o c") == b"v1"
    assert host.stored(actor) == {"c": b"v1", "last": b"c"}


async def test_a_message_past_its_deadline_writes_nothing(host: Host) -> None:
    actor = await host.start("t/tx/0", ResourceLimits(max_execution_time_ms=200))
    assert await host.answer(actor, b"l b") is Outcome.FAILED
    assert host.stored(actor) == {}
    assert await host.answer(actor, b"g last") == b"(none)"


async def test_in_one_batch_each_message_keeps_or_loses_its_own_writes(host: Host) -> None:
    actor = await host.start("t/tx/0")
    payloads = [b"o a", b"e b", b"o c", b"e d", b"o e"]
    with anyio.fail_after(BOUND):
        answers = await asyncio.gather(*(host.ask(actor, p) for p in payloads), return_exceptions=True)
    assert [a.outcome if isinstance(a, RequestFailed) else a for a in answers] == [
        b"v1", Outcome.FAILED, b"v1", Outcome.FAILED, b"v1"]
    assert host.stored(actor) == {"a": b"v1", "c": b"v1", "e": b"v1", "last": b"e"}


async def test_a_stop_that_cuts_a_batch_short_drops_only_the_message_it_interrupted(host: Host) -> None:
    actor = await host.start("t/tx/0")
    first, stuck = host.ask(actor, b"o a"), host.ask(actor, b"l b")  # one batch: the second never ends
    with anyio.fail_after(BOUND):
        while not actor.manager.in_call or len(actor.mailbox):
            await anyio.sleep(0.005)
        await host.sup.stop(actor.component_id, drain_timeout=0.3)
        answers = await asyncio.gather(first, stuck, return_exceptions=True)
    assert [a.outcome if isinstance(a, RequestFailed) else a for a in answers] == [b"v1", Outcome.FAILED]
    assert host.stored(actor) == {"a": b"v1", "last": b"a"}  # the first message's, committed before its answer


# --- the held writes on their own (real SQLite) -----------------------------------------------------


OWNER = ComponentId("t", "held", "0")


def test_held_writes_are_invisible_to_others_until_committed(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    try:
        storage.set(OWNER, "old", b"x")
        held = storage.hold(OWNER)
        held.set("new", b"1")
        held.delete("old")
        assert (held.get("new"), held.exists("old"), held.list_keys(None)) == (b"1", False, ["new"])
        assert storage.list_keys(OWNER, None) == ["old"]
        held.end_message(True)
        held.set("dropped", b"2")
        held.end_message(False)
        assert held.list_keys(None) == ["new"]
        held.commit()
        assert storage.list_keys(OWNER, None) == ["new"]
        assert storage.usage(OWNER).key_count == 1
    finally:
        storage.close()


def test_quota_counts_the_held_writes(tmp_path: Path) -> None:
    quota = 2 * entry_cost(str(OWNER), "a", 400) + 10  # room for two entries of 400 bytes
    storage = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=quota)
    try:
        held = storage.hold(OWNER)
        held.set("a", b"x" * 400)
        held.end_message(True)
        held.set("b", b"x" * 400)  # fits only if nothing else is held
        with pytest.raises(StorageError) as caught:
            held.set("c", b"x" * 400)
        assert caught.value.case == "quota-exceeded"
        held.end_message(False)  # "b" dropped: its room is free again
        held.set("c", b"x" * 400)
        held.end_message(True)
        assert held.usage().key_count == 2
        held.commit()
        assert storage.list_keys(OWNER, None) == ["a", "c"]
        assert storage.usage(OWNER).used_bytes <= quota
    finally:
        storage.close()


def test_overwriting_committed_keys_at_a_full_quota_is_allowed_and_counted_exactly(tmp_path: Path) -> None:
    # Writes do not look up each key's committed size (counted as new keys until needed): at a full
    # quota, overwrites must still fit, and the usage seen must be exact.
    quota = 2 * entry_cost(str(OWNER), "a", 400) + 10
    storage = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=quota)
    try:
        storage.set(OWNER, "a", b"x" * 400)
        storage.set(OWNER, "b", b"x" * 400)
        held = storage.hold(OWNER)
        held.set("a", b"y" * 400)
        held.end_message(True)
        held.set("b", b"y" * 400)
        held.end_message(True)
        assert (held.usage().key_count, held.usage().used_bytes) == (2, storage.usage(OWNER).used_bytes)
        with pytest.raises(StorageError) as caught:
            held.set("c", b"x" * 400)
        assert caught.value.case == "quota-exceeded"
        held.end_message(False)
        held.delete("a")
        held.set("c", b"x" * 400)  # fits once "a" is gone
        held.end_message(True)
        held.commit()
        assert storage.list_keys(OWNER, None) == ["b", "c"] and storage.get(OWNER, "b") == b"y" * 400
        assert storage.usage(OWNER).key_count == 2
    finally:
        storage.close()


async def test_a_failed_commit_fails_every_message_of_the_batch_that_touched_storage(host: Host) -> None:
    # The database refuses one key (an SQLite trigger, as a failing disk would refuse the transaction).
    with sqlite3.connect(host.storage.path) as db:
        db.execute("CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'poison' "
                   "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    actor = await host.start("t/tx/0", ResourceLimits(max_execution_time_ms=500))
    busy = host.ask(actor, b"l x")  # keeps the actor busy until its deadline: the next three queue up
    with anyio.fail_after(BOUND):
        while not actor.manager.in_call:
            await anyio.sleep(0.005)
    batch = [host.ask(actor, p) for p in (b"o a", b"o poison", b"o c")]
    with anyio.fail_after(BOUND):
        answers = await asyncio.gather(busy, *batch, return_exceptions=True)
    assert [a.outcome if isinstance(a, RequestFailed) else a for a in answers] == [Outcome.FAILED] * 4
    assert host.stored(actor) == {}  # one transaction: none of the three is written
    assert await host.answer(actor, b"o d") == b"v1"  # the next batch commits again
    assert host.stored(actor) == {"d": b"v1", "last": b"d"}


# --- a batch's commit overlaps the next batch ---------------------------------------------------------


def test_the_next_batch_reads_writes_whose_commit_is_in_flight(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    blocker = sqlite3.connect(storage.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer waits for the lock: the commit stays in flight
        held = storage.hold(OWNER)
        held.set("a", b"1")
        held.end_message(True)
        commit = held.start_commit()
        assert commit is not None and not commit.done()
        assert storage.get(OWNER, "a") is None  # not committed...
        assert (held.get("a"), held.list_keys(None), held.usage().key_count) == (b"1", ["a"], 1)  # ...but seen
        held.set("b", b"2")  # the next batch
        held.end_message(True)
        blocker.execute("ROLLBACK")
        second = held.start_commit()  # handed over once the first is confirmed
        assert commit.done() and commit.wait() is None
        assert second is not None and second.wait() is None
        assert storage.list_keys(OWNER, None) == ["a", "b"]
    finally:
        blocker.close()
        storage.close()


def test_when_a_commit_in_flight_fails_the_next_batch_fails_with_it(tmp_path: Path) -> None:
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    blocker = sqlite3.connect(storage.path, isolation_level=None)
    try:
        blocker.execute("CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'poison' "
                        "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        blocker.execute("BEGIN IMMEDIATE")
        held = storage.hold(OWNER)
        held.set("poison", b"1")
        held.end_message(True)
        commit = held.start_commit()
        assert commit is not None
        assert held.get("poison") == b"1"  # the next batch reads it while it is in flight
        held.set("c", b"2")
        held.end_message(True)
        blocker.execute("ROLLBACK")
        with pytest.raises(StorageError) as caught:
            held.start_commit()  # the first commit failed: this batch's writes are dropped with it
        assert caught.value.case == "io-error"
        assert isinstance(commit.wait(), StorageError)
        assert storage.list_keys(OWNER, None) == []
        assert held.get("poison") is None and held.start_commit() is None  # nothing held any more
    finally:
        blocker.close()
        storage.close()


def test_later_batches_delete_and_count_keys_an_earlier_batch_committed(tmp_path: Path) -> None:
    """One held object across batches, as an actor keeps it while each commit is in flight: a key the
    first batch wrote, committed while the second ran, is what the third deletes and rewrites."""
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    try:
        held = storage.hold(OWNER)
        held.set("k", b"v" * 100)  # batch 1: a new key
        held.end_message(True)
        first = held.start_commit()
        held.set("j", b"j")  # batch 2
        held.end_message(True)
        second = held.start_commit()  # batch 1 is committed now; batch 2 takes its place in flight
        assert first is not None and first.wait() is None and second is not None
        held.delete("k")  # batch 3
        held.end_message(True)
        assert held.get("k") is None and held.usage().key_count == 1
        third = held.start_commit()
        assert third is not None and third.wait() is None
        assert storage.get(OWNER, "k") is None and storage.list_keys(OWNER, None) == ["j"]
        held.set("k", b"w" * 1000)  # batch 4: back again, counted once
        held.end_message(True)
        expected = held.usage()
        fourth = held.start_commit()
        assert fourth is not None and fourth.wait() is None
        assert storage.usage(OWNER) == expected and expected.key_count == 2
    finally:
        storage.close()


def test_deleting_endless_absent_keys_in_one_message_holds_no_memory_for_them(tmp_path: Path) -> None:
    """Deleting an absent key holds nothing; before, each was remembered until the batch ended: one
    message deleting 300,000 distinct 1,000-byte keys took 313 MiB of host memory, no quota spent."""
    storage = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=64 * 1024)
    try:
        held = storage.hold(OWNER)
        held.set("kept", b"v")
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(20_000):
                held.delete(f"{i:01000d}")
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 1 << 20, f"{grown} bytes held for 20,000 deletes of absent keys"
        held.delete("kept")  # a delete that does hold something still works
        held.end_message(True)
        assert held.get("kept") is None and held.usage().key_count == 0
    finally:
        storage.close()


def test_an_actor_always_busy_keeps_no_memory_for_keys_it_wrote_and_deleted(tmp_path: Path) -> None:
    """While commits overlap (the mailbox never runs dry) an actor keeps one held object; each confirmed
    batch's keys were added to what it remembered of the committed state and never dropped: a guest
    setting and deleting fresh keys grew host memory without bound, nothing left on disk."""
    storage = SqliteStorage(tmp_path / "s.sqlite3", cache_bytes=0)  # the read cache has a bound of its own
    try:
        held = storage.hold(OWNER)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for batch in range(200):
                for i in range(50):
                    key = f"{batch:04d}-{i:02d}-" + "k" * 500
                    held.set(key, b"x")
                    held.end_message(True)
                    held.delete(key)
                    held.end_message(True)
                held.start_commit()  # the next batch starts while this one's commit is in flight
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        held.commit()
        assert storage.usage(OWNER).key_count == 0
        assert grown < 1 << 20, f"{grown} bytes kept after 10,000 keys written and deleted"
    finally:
        storage.close()


def test_committed_batches_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    """Each unit's on_done (a method of its batch's PendingCommit, which lists the units) made a
    reference cycle per acknowledged message: its unit, ops and callback outlived the commit until the
    cyclic collector found them (103,000 objects per 25,000 guest sets in `python -m bench storage`'s
    set row, traced by every collection until then). Freed by reference counting now."""
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    try:
        held = storage.hold(OWNER)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds stays in gc.garbage, for the message
        try:
            for batch in range(3):
                for i in range(10):
                    held.set(f"k{batch}-{i}", b"v")
                    held.end_message(True)
                held.start_commit()  # the next batch starts while this one's commit is in flight
            held.commit()
            gc.collect()
            cyclic = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("wasmhost")})
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert storage.usage(OWNER).key_count == 30
        assert cyclic == []
    finally:
        storage.close()


def test_a_health_check_between_two_messages_of_a_batch_writes_as_a_unit_of_its_own(
        tmp_path: Path, runtime: Runtime) -> None:
    """A probe of the rollout check can run between two messages of a batch: its write must neither
    join the next message's (dropped when that one fails) nor wait for that message to end."""
    storage = SqliteStorage(tmp_path / "s.sqlite3")
    cid = ComponentId("t", "healthwriter", "0")
    host = HostContext(cid, storage=storage)
    guest = runtime.store(runtime.load(cid, fixture_path("healthwriter")), cid, None, host)
    try:
        guest.instantiate()
        guest.initialize(ComponentConfig())
        host.hold_writes()  # a batch begins
        assert guest.handle_message(_message(b"s a")) == b"v1"
        host.end_message(True)
        assert guest.health() is HealthStatus.HEALTHY  # the probe, between two messages: writes "h"
        with pytest.raises(WasmError, match="failed on purpose"):
            guest.handle_message(_message(b"e b"))  # writes "b", then fails
        host.end_message(False)
        commit = host.start_commit()
        assert isinstance(commit, PendingCommit) and commit.wait() is None
        assert {key: storage.get(cid, key) for key in ("a", "h", "b")} == {"a": b"v1", "h": b"1", "b": None}
    finally:
        guest.close()
        storage.close()


def test_writes_of_a_batch_given_up_at_a_stop_never_land_after_later_ones(tmp_path: Path) -> None:
    """A stop gives a cut-short batch's commit STOP_GRACE, then answers its messages failed and lets the
    guest's `shutdown` write at once; the commit, abandoned on its thread, still waited for the previous
    batch's and then handed its writes over: with a slow disk they landed after `shutdown`'s, older
    values over newer ones, from messages answered failed."""
    storage = SqliteStorage(tmp_path / "s.sqlite3", write_timeout_s=30.0)
    host = HostContext(OWNER, storage=storage)
    blocker = sqlite3.connect(tmp_path / "s.sqlite3", isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # a slow disk: the first batch's commit waits
        host.hold_writes()
        storage_set(host, "a", b"1")
        host.end_message(True)
        first = host.start_commit()
        assert isinstance(first, PendingCommit)
        host.hold_writes()  # the next batch, while the first's commit is in flight
        storage_set(host, "b", b"old")
        host.end_message(True)
        outcome: list[StorageError | None] = []
        abandoned = threading.Thread(target=lambda: outcome.append(host.commit_writes()))
        abandoned.start()  # as _commit_cut_short does; it waits for the first batch's commit
        host.drop_writes()  # STOP_GRACE is over: given up
        shutdown = threading.Thread(target=storage_set, args=(host, "b", b"new"))
        shutdown.start()  # the guest's shutdown writes at once
        wait_for(lambda: storage._writer.queued() >= 1, "queued behind the first batch", 10, every=0.002)
        blocker.execute("ROLLBACK")
        abandoned.join(30)
        shutdown.join(30)
        assert first.wait() is None
        assert storage.get(OWNER, "b") == b"new"
        assert outcome and outcome[0] is not None and outcome[0].case == "io-error"
    finally:
        blocker.close()
        storage.close()


def _message(payload: bytes) -> ComponentMessage:
    return ComponentMessage(ComponentId("t", "host", "0"), payload, MessageMetadata(timestamp=Timestamp.now()))


def test_a_quota_lowered_while_a_batch_is_on_its_way_applies_to_later_writes_not_to_part_of_it(
        tmp_path: Path) -> None:
    """The writer used to refuse the one unit the lowered quota no longer fit and commit the rest,
    while the actor answered the whole batch failed: writes of messages answered failed on disk."""
    storage = SqliteStorage(tmp_path / "s.sqlite3", default_quota_bytes=1 << 20)
    try:
        held = storage.hold(OWNER)
        held.set("counter", b"1" * 2000)  # message 1: fits the quota when it is made
        held.end_message(True)
        held.set("derived", b"len=%d" % len(held.get("counter") or b""))  # message 2 reads message 1's write
        small = entry_cost(str(OWNER), "derived", 10) + 10
        storage.set_quota(str(OWNER), small)  # a reload lowers the quota meanwhile, before message 2 ends
        held.end_message(True)
        commit = held.start_commit()
        assert commit is not None and commit.wait() is None  # the batch commits whole, as it was checked
        assert set(storage.list_keys(OWNER, None)) == {"counter", "derived"}
        with pytest.raises(StorageError, match="quota-exceeded"):
            storage.set(OWNER, "more", b"x")  # the lowered quota applies from now on
    finally:
        storage.close()


FILLERS = [b"g z"] * (BATCH_SIZE - 1)
"""Queued behind a batch's first message, they fill its batch: what comes next is the next batch."""


async def _two_batches(host: Host, first: bytes, second: list[bytes]) -> tuple[
        ComponentActor, list[asyncio.Future[bytes | None]], list[asyncio.Future[bytes | None]]]:
    """Queue `first` (+ fillers) and `second` as two batches behind a busy call while the database
    is locked; return once the second batch's last message ("l x", looping) runs."""
    actor = await host.start("t/tx/0", ResourceLimits(max_execution_time_ms=1000))
    busy = host.ask(actor, b"l w")  # ends at its deadline; everything below queues behind it
    with anyio.fail_after(BOUND):
        while not actor.manager.in_call:
            await anyio.sleep(0.005)
    batch_n = [host.ask(actor, first), *(host.ask(actor, p) for p in FILLERS)]
    batch_next = [host.ask(actor, p) for p in second]
    with anyio.fail_after(BOUND):
        assert await asyncio.gather(busy, return_exceptions=True)  # failed at its deadline
        while len(actor.mailbox) or not actor.manager.in_call:  # the next batch is taken and loops
            await anyio.sleep(0.005)
    return actor, batch_n, batch_next


def _answers(futures: list[asyncio.Future[bytes | None]]) -> list[object]:
    return [f.exception().outcome if isinstance(f.exception(), RequestFailed) else f.result()  # type: ignore[union-attr]
            for f in futures]


async def test_an_actor_handles_its_next_batch_while_the_commit_is_in_flight(host: Host) -> None:
    blocker = sqlite3.connect(host.storage.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer waits for the lock: batch N's commit stays in flight
    try:
        actor, batch_n, batch_next = await _two_batches(host, b"o a", [b"g a", b"l x"])
        # The next batch is being handled (its read of "a" is done) while N is neither committed nor answered.
        assert not any(f.done() for f in batch_n)
        assert host.stored(actor) == {}
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with anyio.fail_after(BOUND):
        await asyncio.gather(*batch_n, *batch_next, return_exceptions=True)
    assert _answers(batch_n) == [b"v1"] + [b"(none)"] * len(FILLERS)
    assert _answers(batch_next) == [b"v1", Outcome.FAILED]  # "g a" read N's write before it was committed
    assert host.stored(actor) == {"a": b"v1", "last": b"a"}


async def test_a_commit_that_fails_in_flight_fails_its_batch_and_the_next_one_that_read_it(host: Host) -> None:
    blocker = sqlite3.connect(host.storage.path, isolation_level=None)
    blocker.execute("CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'refused'); END")
    blocker.execute("BEGIN IMMEDIATE")
    try:
        actor, batch_n, batch_next = await _two_batches(host, b"o poison", [b"g poison", b"l x"])
        assert not any(f.done() for f in batch_n)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with anyio.fail_after(BOUND):
        await asyncio.gather(*batch_n, *batch_next, return_exceptions=True)
    assert _answers(batch_n) == [Outcome.FAILED] * BATCH_SIZE  # none acknowledged: every one touched storage
    assert _answers(batch_next) == [Outcome.FAILED, Outcome.FAILED]  # "g poison" read what was never written
    assert host.stored(actor) == {}
    assert await host.answer(actor, b"o d") == b"v1"  # the next batch commits again
    assert host.stored(actor) == {"d": b"v1", "last": b"d"}
