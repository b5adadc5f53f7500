"""host-services.list-components at scale: the answer is kept lowered while the directory stays the same (see
runtime/lowered_listing.py), follows every component that comes, goes, starts or stops, on this host and
across the lattice, and a guest calling it in a loop leaves its neighbours answering."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import structlog

from tests.conftest import fixture_path
from tests.support import plain_supervisor
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.restart import RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.lattice.directory import Directory, LatticeDirectory
from wasmhost.lattice.wire import Heartbeat, Inventory, InventoryEntry
from wasmhost.runtime.runtime import Runtime
from wasmhost.system.stores import HostStores

pytestmark = pytest.mark.anyio

LISTER = ComponentId.parse("t/lister/0")
SERVICES = ComponentId.parse("t/services/0")


@pytest.fixture
async def sup(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as supervisor:
        yield supervisor


async def launch(sup: Supervisor, fixture: str, cid: ComponentId) -> ComponentActor:
    spec = ActorSpec(cid, health_interval=3600.0)
    return await sup.start(spec, sup.stores.runtime.load(cid, fixture_path(fixture)))


async def ask(sup: Supervisor, target: ComponentId, payload: bytes) -> bytes:
    return await sup.router.host_request(target, payload, 30.0) or b""


async def listed(sup: Supervisor) -> list[str]:
    """What the services guest's list-components answers, one id a line."""
    return (await ask(sup, SERVICES, b"list")).decode().splitlines()


def count_listings(sup: Supervisor) -> Callable[[], int]:
    """Counts from now on how often the guests' directory (the supervisor) is walked."""
    walks = [0]
    walk = sup.list_components

    def counted() -> list[ComponentId]:
        walks[0] += 1
        return walk()

    sup.list_components = counted  # type: ignore[method-assign]
    return lambda: walks[0]


async def test_a_guest_calling_list_components_in_a_loop_walks_the_directory_once_per_change(sup: Supervisor) -> None:
    """Each call lowered every id again in Python (about 11 us an id: 116 ms a call at 10,000 components, under
    the GIL, in a host call no time slice cuts). Now the lowered answer is kept until the directory changes:
    300 calls in a row walk it once, and the next change is in the very next answer."""
    await launch(sup, "lister", LISTER)
    await launch(sup, "echo", ComponentId.parse("t/echo/0"))
    walks = count_listings(sup)
    assert await ask(sup, LISTER, b"300") == b"2"
    assert walks() == 1
    assert await ask(sup, LISTER, b"300") == b"2"
    assert walks() == 1
    await launch(sup, "echo", ComponentId.parse("t/echo/1"))
    assert await ask(sup, LISTER, b"300") == b"3"
    assert walks() == 2


async def test_list_components_follows_components_that_come_go_start_and_stop(sup: Supervisor) -> None:
    """The kept answer is never served after a change: each answer is the directory as it is when asked."""
    first, second = ComponentId.parse("t/echo/1"), ComponentId.parse("t/echo/2")
    await launch(sup, "services", SERVICES)
    assert await listed(sup) == [str(SERVICES)]
    await launch(sup, "echo", first)
    await launch(sup, "echo", second)
    assert await listed(sup) == [str(SERVICES), str(first), str(second)]
    assert await listed(sup) == [str(SERVICES), str(first), str(second)]
    await sup.stop(first)  # stays loaded, stopped: not listed
    assert await listed(sup) == [str(SERVICES), str(second)]
    await sup.actors[first].start()
    assert await listed(sup) == [str(SERVICES), str(first), str(second)]
    await sup.remove(second)
    assert await listed(sup) == [str(SERVICES), str(first)]
    failing = ComponentId.parse("t/inittrap/0")
    await sup.start(ActorSpec(failing, health_interval=3600.0, restart=RestartPolicy.TEMPORARY),
                    sup.stores.runtime.load(failing, fixture_path("inittrap")))  # its initialize traps: failed
    assert await listed(sup) == [str(SERVICES), str(first)]
    await launch(sup, "echo", second)
    assert await listed(sup) == [str(SERVICES), str(first), str(second)]


async def test_a_directory_that_fails_once_is_asked_again_at_the_next_call(sup: Supervisor) -> None:
    """A host bug while listing gives the guest an empty list and a logged error, as before; nothing is kept
    from it, so the next call lists again although the directory has not changed."""
    await launch(sup, "services", SERVICES)
    walk = sup.list_components

    def broken() -> list[ComponentId]:
        sup.list_components = walk  # type: ignore[method-assign]
        raise RuntimeError("host bug")

    sup.list_components = broken  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        assert await listed(sup) == []
    failures = [e for e in logs if e["event"] in ("host_function_failed", "host_result_unconvertible")]
    assert [(e["function"], e["error"]) for e in failures] == [
        ("airssys:core/host-services@1.0.0#list-components", "RuntimeError('host bug')")]
    assert await listed(sup) == [str(SERVICES)]


async def test_guests_looping_on_list_components_leave_an_echo_answering_while_components_come_and_go(
        sup: Supervisor) -> None:
    """Two hostile guests call list-components in a loop, on two worker threads, while components are added and
    removed on the event loop (the kept answer is replaced, and the old one freed, while the other guest may be
    copying it) and a neighbour echo answers requests. Every answer of every guest is whole, the echo answers
    each request, and once the changes stop both guests list exactly what is there."""
    echo = ComponentId.parse("t/echo/0")
    await launch(sup, "echo", echo)
    second = ComponentId.parse("t/lister/1")
    await launch(sup, "lister", LISTER)
    await launch(sup, "lister", second)
    for i in range(50):
        await launch(sup, "echo", ComponentId("t", "many", str(i)))
    stop = asyncio.Event()
    answers: list[int] = []

    async def hog(lister: ComponentId) -> None:
        while not stop.is_set():
            answers.append(int(await ask(sup, lister, b"2000")))

    hogs = [asyncio.ensure_future(hog(lister)) for lister in (LISTER, second)]
    coming = [ComponentId("t", "coming", str(i)) for i in range(20)]
    for i, cid in enumerate(coming):
        await launch(sup, "echo", cid)
        assert await ask(sup, echo, b"ping %d" % i) == b"ping %d" % i
        if i % 2:
            await sup.remove(coming[i - 1])
    stop.set()
    await asyncio.gather(*hogs)
    assert answers and all(53 <= n <= 53 + 20 for n in answers), answers  # each list whole, at no time torn
    assert await ask(sup, LISTER, b"1") == await ask(sup, second, b"1") == b"%d" % (53 + 10)


def _inventory(host: str, version: int, *ids: str, health: str = "healthy") -> Inventory:
    return Inventory(host, version, [InventoryEntry(i, "running", health, False) for i in ids])


async def test_a_guest_in_a_lattice_lists_what_other_hosts_run_as_their_inventories_change(runtime: Runtime) -> None:
    """Remote components are listed after the local ones; the kept answer follows every inventory fetched that
    names other components and every host that leaves (an inventory that changes only a health keeps it)."""
    remote = Directory("host-a")
    async with plain_supervisor(runtime) as supervisor:
        stores = supervisor.stores
        assert isinstance(stores, HostStores)
        stores.directory = LatticeDirectory(supervisor, remote)
        await launch(supervisor, "services", SERVICES)
        assert await listed(supervisor) == [str(SERVICES)]
        remote.heard(Heartbeat("host-b", 1, 1.0, 1.0, 1), now=0.0)
        remote.update(_inventory("host-b", 1, "b/echo/0", str(SERVICES)))
        assert await listed(supervisor) == [str(SERVICES), "b/echo/0"]  # a replica of a local one: listed once
        remote.update(_inventory("host-b", 2, "b/echo/0", "b/echo/1"))
        assert await listed(supervisor) == [str(SERVICES), "b/echo/0", "b/echo/1"]
        walks = count_listings(supervisor)
        remote.update(_inventory("host-b", 3, "b/echo/0", "b/echo/1", health="degraded"))
        assert await listed(supervisor) == [str(SERVICES), "b/echo/0", "b/echo/1"]
        assert walks() == 0  # the same components: the kept answer
        local_echo = ComponentId.parse("t/echo/0")
        await launch(supervisor, "echo", local_echo)
        assert await listed(supervisor) == [str(SERVICES), str(local_echo), "b/echo/0", "b/echo/1"]
        assert remote.expire(now=100.0) == ["host-b"]
        assert await listed(supervisor) == [str(SERVICES), str(local_echo)]
