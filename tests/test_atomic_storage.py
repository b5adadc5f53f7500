"""A message's storage effects are atomic and durable before it is answered: guests that write and
then fail (an error, a trap, fuel, a deadline, a stop) leave nothing behind; a guest that succeeds
leaves all of it; later messages see it, and a message reads its own writes. Real wasmtime, real
components (tests/fixtures/wat/txguest.wat), real SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from tests.conftest import fixture_path
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.restart import Backoff
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId
from wasmhost.core.errors import StorageError
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.runtime import Runtime
from wasmhost.storage.accounting import entry_cost
from wasmhost.storage.sqlite_store import SqliteStorage
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
