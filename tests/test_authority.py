"""Authority between components: a hostile component (the `intruder`, `callback` and `services` fixtures)
next to victims, with capability checks as the daemon wires them. What it may not do to others' requests,
callbacks, targets and storage, and how much host work and log one of its calls can cause."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import structlog

from tests.conftest import fixture_path
from tests.support import guarded_supervisor, plain_supervisor
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.core.log_budget import LINES_PER_INTERVAL, LogBudget
from wasmhost.runtime.host_fn import MAX_BROADCAST_TARGETS
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import Capabilities, CapabilityChecker

pytestmark = pytest.mark.anyio

INTRUDER = ComponentId.parse("evil/intruder/0")
ECHO = ComponentId.parse("good/echo/0")


@pytest.fixture
async def host(runtime: Runtime, tmp_path: Path) -> AsyncIterator[Supervisor]:
    async with guarded_supervisor(runtime, tmp_path / "storage.sqlite3", 1 << 20) as sup:
        assert isinstance(sup, Supervisor)
        yield sup


def permissions(sup: Supervisor) -> CapabilityChecker:
    checker = sup.stores.permissions
    assert checker is not None
    return checker


async def launch(sup: Supervisor, fixture: str, cid: ComponentId, grants: Capabilities | None = None,
                 mailbox_capacity: int = 1024) -> ComponentActor:
    if grants is not None:
        permissions(sup).grant(cid, grants)
    spec = ActorSpec(cid, mailbox_capacity=mailbox_capacity, health_interval=3600.0)
    return await sup.start(spec, sup.stores.runtime.load(cid, fixture_path(fixture)))


async def ask(sup: Supervisor, target: ComponentId, payload: bytes) -> bytes:
    return await sup.router.host_request(target, payload, 30.0) or b""


async def settle(condition: object) -> None:
    """Wait, bounded, until `condition()` holds."""
    with anyio.fail_after(30):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.005)


# --- how much host work and log one call of a hostile guest can cause ---


async def test_answers_to_requests_a_guest_cancels_at_once_do_not_flood_the_host_log(host: Supervisor) -> None:
    """Each cancelled request's answer is dropped and was logged, one `late_response_dropped` line per
    answer and nothing to bound them: 3,492 lines in 1.3 s from 20 messages of the intruder (its own log is
    held to log_rate). Now its answers write LINES_PER_INTERVAL lines per interval and every one is counted."""
    await launch(host, "echo", ECHO, mailbox_capacity=4000)
    intruder = await launch(host, "intruder", INTRUDER, Capabilities.from_config(request=["good/*"]))
    with structlog.testing.capture_logs() as logs:
        assert await ask(host, INTRUDER, b"c3000|good|echo|0") == b"ok"  # request + cancel, 3,000 times
        # an answer that came before its cancel is a callback skipped (handled by the intruder), not dropped
        await settle(lambda: host.router.late_responses + intruder.stats.handled - 1 == 3000)
    assert host.router.late_responses > 2 * LINES_PER_INTERVAL
    lines = [e for e in logs if e["event"] == "late_response_dropped"]
    assert len(lines) == LINES_PER_INTERVAL
    assert lines[0]["requester"] == str(INTRUDER) and lines[0]["component"] == str(ECHO)
    assert host.router.pending_by_requester() == {}


def test_a_log_budget_writes_a_few_lines_per_key_and_interval_and_counts_the_rest() -> None:
    now = [100.0]
    budget = LogBudget(lines=2, interval=10.0, clock=lambda: now[0])
    assert [budget.admit("a") for _ in range(5)] == [0, 0, None, None, None]
    assert budget.admit("b") == 0  # a key of its own
    now[0] += 10
    assert budget.admit("a") == 3  # the next line says how many were left out
    assert budget.admit("a") == 0


async def test_a_broadcast_naming_more_targets_than_the_host_lifts_is_refused_before_lifting(
        host: Supervisor) -> None:
    """A list of 500,000 copies of one target cost the guest 12 MB and a few ms to build and the host 1.7 s
    of lifting in one host call (the event loop stalled up to 62 ms at a time, a neighbour's p99 went from
    0.3 to 7 ms). Past MAX_BROADCAST_TARGETS the list is refused whole, and the guest is told why."""
    echo = await launch(host, "echo", ECHO)
    await launch(host, "intruder", INTRUDER, Capabilities.from_config(broadcast=["good/*"]))
    too_many = MAX_BROADCAST_TARGETS + 1
    assert await ask(host, INTRUDER, b"b%d|good|echo|0" % too_many) == (
        b"err 2 broadcast to %d targets: at most %d in one call" % (too_many, MAX_BROADCAST_TARGETS))
    assert await ask(host, INTRUDER, b"b%d|good|echo|0" % MAX_BROADCAST_TARGETS) == b"ok"
    await settle(lambda: echo.stats.handled == 1)  # each target once, however often it was named


# --- what a component learns of the others ---


async def test_list_components_answers_while_components_come_and_go(runtime: Runtime) -> None:
    """list-components runs on the guest's thread and walked the supervisor's actors while the event loop
    may add or remove one (a reload, a `wasmhost start`): the walk then raised `dictionary changed size
    during iteration`, logged as host_function_failed, and the guest was told there are no components at
    all. The change is placed by hand here: reading one actor's state starts another one."""
    async with plain_supervisor(runtime) as sup:
        services = await launch(sup, "services", ComponentId.parse("good/services/0"))
        echo = await launch(sup, "echo", ECHO)

        class Arriving:
            """An actor whose state, when read, is the moment another component is added."""

            @property
            def state(self) -> ActorState:
                sup.actors[ComponentId.parse("good/late/0")] = echo
                return ActorState.RUNNING

        sup.actors[ComponentId.parse("good/arriving/0")] = Arriving()  # type: ignore[assignment]
        try:
            with structlog.testing.capture_logs() as logs:
                listed = (await ask(sup, services.component_id, b"list")).decode().splitlines()
        finally:
            for name in ("arriving", "late"):
                sup.actors.pop(ComponentId("good", name, "0"), None)
        assert listed[:3] == ["good/services/0", "good/echo/0", "good/arriving/0"]
        assert not [e for e in logs if e["event"] == "host_function_failed"]
