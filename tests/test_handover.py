"""ComponentActor.hand_over with real wasmtime and real components: the queue and counters stay with the
actor, and a stop during a handover still answers every message and the waiter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import fixture_path
from tests.support import plain_supervisor
from tests.waits import until
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.runtime import Runtime

pytestmark = pytest.mark.anyio

CID = ComponentId("t", "svc", "0")


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as sup:
        yield sup


async def test_a_handover_keeps_the_queue_and_counters(supervisor: Supervisor, runtime: Runtime) -> None:
    spec = ActorSpec(CID)
    actor = await supervisor.start(spec, runtime.load(CID, fixture_path("busy")))
    long = asyncio.ensure_future(supervisor.router.host_request(CID, b"300000000", 30.0))
    await until(lambda: actor.manager.in_call)  # the old version is in the middle of it
    queued = [asyncio.ensure_future(supervisor.router.host_request(CID, b"3", 30.0)) for _ in range(20)]
    await until(lambda: len(actor.mailbox) == 20)
    handover = await supervisor.hand_over(ActorSpec(CID, mailbox_capacity=7), runtime.load(CID, fixture_path("hasher")))
    assert handover.boot_error is None and actor.spec.mailbox_capacity == 7
    assert await long == b"300000000"  # the message in hand was finished by the old version
    replies = await asyncio.gather(*queued)
    assert set(replies) == {await supervisor.router.host_request(CID, b"3", 30.0)} and b"3" not in replies
    assert actor.stats.handled == 22 and actor.stats.failed == actor.stats.rejected == actor.stats.restarts == 0
    assert supervisor.actors[CID] is actor and actor.state is ActorState.RUNNING


async def test_a_stop_during_a_handover_answers_the_waiter_and_the_queue(supervisor: Supervisor,
                                                                         runtime: Runtime) -> None:
    actor = await supervisor.start(ActorSpec(CID), runtime.load(CID, fixture_path("echo")))
    # A new version whose initialize never returns (its deadline is 10 minutes): only the stop ends it.
    slow = ActorSpec(CID, limits=ResourceLimits(max_execution_time_ms=600_000))
    waiter = asyncio.ensure_future(supervisor.hand_over(slow, runtime.load(CID, fixture_path("initloop")),
                                                        (ActorSpec(CID), runtime.load(CID, fixture_path("echo")))))
    await until(lambda: actor.state is not ActorState.RUNNING)  # the actor took the handover up
    queued = [asyncio.ensure_future(supervisor.router.host_request(CID, b"x", 30.0)) for _ in range(5)]
    await until(lambda: len(actor.mailbox) == 5)
    await asyncio.wait_for(supervisor.stop(CID, drain_timeout=0.2), 10)
    handover = await asyncio.wait_for(waiter, 5)
    assert "stopped during the handover" in str(handover.boot_error)
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, RequestFailed) for r in results), results  # answered, not left waiting
    assert actor.state is ActorState.STOPPED


async def test_a_stop_during_the_fallbacks_boot_answers_the_waiter(supervisor: Supervisor, runtime: Runtime) -> None:
    actor = await supervisor.start(ActorSpec(CID), runtime.load(CID, fixture_path("echo")))
    # The new version traps in initialize; the version it falls back to then never ends its own.
    endless = ActorSpec(CID, limits=ResourceLimits(max_execution_time_ms=600_000))
    waiter = asyncio.ensure_future(supervisor.hand_over(ActorSpec(CID), runtime.load(CID, fixture_path("inittrap")),
                                                        (endless, runtime.load(CID, fixture_path("initloop")))))
    await until(lambda: actor.spec is endless and actor.manager.in_call)  # the fallback is initializing
    await asyncio.wait_for(supervisor.stop(CID, drain_timeout=0.2), 10)
    handover = await asyncio.wait_for(waiter, 5)  # a reload waits for it, holding the reload lock
    assert "unreachable" in str(handover.boot_error)  # why the new version did not start
    assert actor.state is ActorState.STOPPED


async def test_a_start_after_a_stop_during_a_handover_runs_the_version_fallen_back_to(supervisor: Supervisor,
                                                                                      runtime: Runtime) -> None:
    previous = ActorSpec(CID)
    actor = await supervisor.start(previous, runtime.load(CID, fixture_path("echo")))
    endless = ActorSpec(CID, limits=ResourceLimits(max_execution_time_ms=600_000))
    waiter = asyncio.ensure_future(supervisor.hand_over(endless, runtime.load(CID, fixture_path("initloop")),
                                                        (previous, runtime.load(CID, fixture_path("echo")))))
    await until(lambda: actor.spec is endless and actor.manager.in_call)  # the new version is initializing
    await asyncio.wait_for(supervisor.stop(CID, drain_timeout=0.2), 10)
    handover = await asyncio.wait_for(waiter, 5)
    assert handover.boot_error is not None  # a reload reports it rolled back to the previous version...
    await asyncio.wait_for(actor.start(), 10)  # ...so `wasmhost start ID` runs that one
    assert await supervisor.router.host_request(CID, b"hello", 10.0) == b"hello"
