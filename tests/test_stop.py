"""Stop always completes and answers everything: a guest mid-call (spinning, sleeping, trapping in
shutdown) is interrupted once the drain time is over, every queued message ends with an answer, and
`wasmhost stop` / SIGTERM finish within drain_timeout_s + shutdown_timeout_s plus a small margin."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import pytest
import structlog

from tests.conftest import FIXTURES, Starter, fixture_path
from tests.support import MemoryStorage, plain_supervisor
from tests.test_daemon import ROOT, Daemon, component, config_text
from tests.waits import until
from wasmhost.actors import actor as actor_module
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.restart import Backoff, RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.errors import ComponentError
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.engine import EngineSettings
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import InstanceState
from wasmhost.system import protocol
from wasmhost.system.client import request
from wasmhost.system.stores import HostStores

pytestmark = pytest.mark.anyio

LONG = ResourceLimits(max_execution_time_ms=600_000)
"""A ten-minute call deadline: nothing in these tests may wait for it."""
BOUND = 30.0
"""What any stop here may take at most (drain + shutdown are a second or two; the guests would run
for ten minutes): generous for a loaded machine, far below what waiting for the guest would take."""
QUEUED = 20


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime, threads=4) as sup:
        yield sup


async def launch(sup: Supervisor, fixture: str, name: str, **settings: object) -> ComponentActor:
    cid = ComponentId.parse(name)
    spec = replace(ActorSpec(cid, backoff=Backoff(0.01, 0.05)), **settings)  # type: ignore[arg-type]
    return await sup.start(spec, sup.stores.runtime.load(cid, fixture_path(fixture)))


def ask(sup: Supervisor, actor: ComponentActor, payload: bytes) -> asyncio.Future[bytes | None]:
    """A host request to `actor`, queued at once (its mailbox has room)."""
    return asyncio.ensure_future(sup.router.host_request(actor.component_id, payload, 600.0))


async def outcomes(pending: list[asyncio.Future[bytes | None]]) -> list[object]:
    """Every answer, within the bound: a reply, or the RequestFailed outcome."""
    with anyio.fail_after(BOUND):
        results = await asyncio.gather(*pending, return_exceptions=True)
    return [r.outcome if isinstance(r, RequestFailed) else r for r in results]


async def in_call(actor: ComponentActor, first: asyncio.Future[bytes | None]) -> None:
    """Wait until `actor` has taken its first message and is running it."""
    await until(lambda: len(actor.mailbox) == 0 and actor.manager.in_call and not first.done())


async def test_a_cancelled_call_ends_a_sleep_and_returns_only_once_its_thread_let_go(start: Starter) -> None:
    sleeper = start("services", "t/services/0", LONG)
    workers = WorkerPool(1)
    try:
        message = ComponentMessage(sleeper.component_id, b"sleep 600000", MessageMetadata(timestamp=Timestamp.now()))
        call = asyncio.ensure_future(
            workers.run_steps(sleeper.handle_message_steps(message), sleeper.lock, sleeper.host.interrupt))
        await until(lambda: sleeper.in_call and workers.asleep == 1)  # asleep in sleep-millis (set aside)
        call.cancel()
        with anyio.fail_after(BOUND), pytest.raises(asyncio.CancelledError):
            await call
        # No `until` here: when the cancelled waiter returns, no thread is in the Store any more.
        assert not sleeper.lock.locked() and not sleeper.in_call
        assert sleeper.host.interrupted
    finally:
        workers.close()


async def test_stop_interrupts_a_spinning_call_and_answers_every_queued_request(supervisor: Supervisor) -> None:
    echo = await launch(supervisor, "echo", "t/echo/0")
    spinner = await launch(supervisor, "stoptrap", "t/spinner/0", limits=LONG)
    spin = ask(supervisor, spinner, b"spin")
    await in_call(spinner, spin)
    queued = [ask(supervisor, spinner, f"m{i}".encode()) for i in range(QUEUED)]
    await until(lambda: len(spinner.mailbox) == QUEUED)
    with structlog.testing.capture_logs() as logs, anyio.fail_after(BOUND):
        await supervisor.stop(spinner.component_id, drain_timeout=0.3)
    assert spinner.state is ActorState.STOPPED
    with pytest.raises(RequestFailed) as failed:
        await spin
    assert failed.value.outcome is Outcome.FAILED and "interrupted" in failed.value.detail
    assert await outcomes(queued) == [Outcome.TARGET_STOPPED] * QUEUED
    assert spinner.stats.rejected == QUEUED
    assert [e["component"] for e in logs if e["event"] == "component_call_interrupted"] == ["t/spinner/0"]
    assert await supervisor.router.host_request(echo.component_id, b"still here", 5.0) == b"still here"


async def test_a_sleeping_guest_wakes_at_the_drain_timeout_and_a_trap_in_shutdown_loses_nothing(
    supervisor: Supervisor,
) -> None:
    sleeper = await launch(supervisor, "stoptrap", "t/sleeper/0", limits=LONG, shutdown_timeout=1.0)
    sleep = ask(supervisor, sleeper, b"sleep")
    await in_call(sleeper, sleep)
    queued = [ask(supervisor, sleeper, f"m{i}".encode()) for i in range(QUEUED)]
    await until(lambda: len(sleeper.mailbox) == QUEUED)
    with structlog.testing.capture_logs() as logs, anyio.fail_after(BOUND):
        await supervisor.stop(sleeper.component_id, drain_timeout=0.3)
    # The sleep ended early and the guest finished its call: its reply arrives, then the rest are
    # answered as stopped, and shutdown (which traps) was still called on the live instance.
    assert await sleep == b"slept"
    assert await outcomes(queued) == [Outcome.TARGET_STOPPED] * QUEUED
    failed = [e for e in logs if e["event"] == "component_shutdown_failed"]
    assert len(failed) == 1 and "unreachable" in failed[0]["error"]
    assert sleeper.state is ActorState.STOPPED


async def test_messages_queued_behind_a_trap_are_answered_when_the_component_gives_up(
    supervisor: Supervisor,
) -> None:
    trapper = await launch(supervisor, "trapper", "t/trapper/0", restart=RestartPolicy.TEMPORARY)
    pending = [ask(supervisor, trapper, f"m{i}".encode()) for i in range(QUEUED)]
    answers = await outcomes(pending)
    assert answers[0] is Outcome.FAILED  # the message that trapped
    assert answers[1:] == [Outcome.TARGET_STOPPED] * (QUEUED - 1)
    assert trapper.state is ActorState.FAILED


async def test_stop_during_a_restart_backoff_returns_at_once_and_answers_the_queue(
    supervisor: Supervisor,
) -> None:
    spinner = await launch(supervisor, "stoptrap", "t/spinner/0", backoff=Backoff(600.0, 600.0),
                           limits=ResourceLimits(max_execution_time_ms=50))
    first = ask(supervisor, spinner, b"spin")  # times out after 50 ms: restart in 600 s
    await until(lambda: spinner.state is ActorState.RESTARTING)
    queued = [ask(supervisor, spinner, f"m{i}".encode()) for i in range(QUEUED)]
    await until(lambda: len(spinner.mailbox) == QUEUED)
    with anyio.fail_after(BOUND):
        await supervisor.stop(spinner.component_id, drain_timeout=0.3)
    assert await outcomes([first]) == [Outcome.FAILED]
    assert await outcomes(queued) == [Outcome.TARGET_STOPPED] * QUEUED
    assert spinner.state is ActorState.STOPPED


async def test_stop_during_an_endless_initialize_interrupts_it(supervisor: Supervisor) -> None:
    cid = ComponentId.parse("t/initloop/0")
    starting = asyncio.ensure_future(
        supervisor.start(ActorSpec(cid, limits=LONG), supervisor.stores.runtime.load(cid, fixture_path("initloop"))))
    await until(lambda: cid in supervisor.actors and supervisor.actors[cid].manager.in_call)
    actor = supervisor.actors[cid]
    with anyio.fail_after(BOUND):
        await supervisor.stop(cid, drain_timeout=0.3)
        await starting  # the start returns too: the component stopped before it ran
    assert actor.state is ActorState.STOPPED
    assert not actor.manager.in_call


@pytest.mark.parametrize("change", ["handover", "restart"])
async def test_a_stop_with_a_new_version_or_a_restart_pending_still_drains_the_queue(
        supervisor: Supervisor, runtime: Runtime, change: str) -> None:
    busy = await launch(supervisor, "busy", "t/busy/0")
    long = ask(supervisor, busy, b"300000000")
    await in_call(busy, long)
    queued = [ask(supervisor, busy, b"3") for _ in range(QUEUED)]
    await until(lambda: len(busy.mailbox) == QUEUED)
    if change == "handover":  # a reload, taken up once the message in hand is done
        hasher = runtime.load(busy.component_id, fixture_path("hasher"))
        pending = asyncio.ensure_future(supervisor.hand_over(busy.spec, hasher))
    else:  # `wasmhost restart ID`, likewise
        pending = asyncio.ensure_future(busy.restart())
    await asyncio.sleep(0)  # one turn: both ask for it before their first wait
    with anyio.fail_after(BOUND):
        await supervisor.stop(busy.component_id, drain_timeout=BOUND)
        await pending
    assert await outcomes([long, *queued]) == [b"300000000"] + [b"3"] * QUEUED  # drained, not refused
    assert busy.state is ActorState.STOPPED


class HungStorage(MemoryStorage):
    """A storage whose writes wait until released (a hung disk, within the storage's own bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def set(self, owner: ComponentId, key: str, value: bytes) -> None:
        self.entered.set()
        self.release.wait(BOUND)
        super().set(owner, key, value)


async def test_a_guest_held_in_a_storage_write_does_not_hold_up_the_stop(runtime: Runtime) -> None:
    storage = HungStorage()
    workers = WorkerPool(4)
    router = MessageRouter(asyncio.get_running_loop())
    sup = Supervisor(HostStores(runtime, router, storage), router, workers)
    async with sup:
        try:
            writer = await launch(sup, "storage", "t/writer/0", storage=True, shutdown_timeout=0.2)
            write = ask(sup, writer, b"set k v")
            await until(storage.entered.is_set)
            queued = [ask(sup, writer, b"get k") for _ in range(QUEUED)]
            await until(lambda: len(writer.mailbox) == QUEUED)
            with structlog.testing.capture_logs() as logs, anyio.fail_after(BOUND / 2):
                await sup.stop(writer.component_id, drain_timeout=0.1)  # returns at its bound, the write still hung
            assert [e["event"] for e in logs if e["event"] == "component_stop_overran"] == ["component_stop_overran"]
            assert await outcomes(queued) == [Outcome.TARGET_STOPPED] * QUEUED
            assert not write.done()
            storage.release.set()  # the write ends: its message is answered then (the guest finished it)
            assert await outcomes([write]) == [b"ok"]
            await until(lambda: writer.state is ActorState.STOPPED)
        finally:
            storage.release.set()
            await sup.stop_all(1.0)
            workers.close()


async def test_an_actor_that_overran_its_stop_leaves_the_requests_of_its_successor_alone(runtime: Runtime) -> None:
    storage = HungStorage()
    workers = WorkerPool(4)
    router = MessageRouter(asyncio.get_running_loop())
    sup = Supervisor(HostStores(runtime, router, storage), router, workers)
    target_id = ComponentId.parse("t/target/0")
    let_compile = asyncio.Event()

    async def compile_target() -> LoadedComponent:  # the new actor's request waits in its mailbox meanwhile
        await let_compile.wait()
        return runtime.load(target_id, fixture_path("echo"))

    async with sup:
        try:
            old = await launch(sup, "storage", "t/x/0", storage=True, shutdown_timeout=0.2)
            ask(sup, old, b"set k v")
            await until(storage.entered.is_set)
            await sup.remove(old.component_id, drain_timeout=0.1)  # overruns: the old task is still in the write
            new = await launch(sup, "callback", "t/x/0")  # the same id again, as a reload re-adding it does
            target = sup.add(ActorSpec(target_id), compile_target)
            starting = asyncio.ensure_future(target.start())
            correlation = await ask(sup, new, b"t|target|0|ping")
            assert correlation is not None and router.pending_target(correlation.decode()) == target_id
            storage.release.set()  # the old actor ends now
            await until(lambda: old.state is ActorState.STOPPED)
            let_compile.set()
            await starting
            await until(lambda: router.pending_target(correlation.decode()) is None)
            assert await ask(sup, new, b"?callbacks") == b"1"  # the reply reached the new guest
            assert router.late_responses == 0
        finally:
            storage.release.set()
            await sup.stop_all(1.0)
            workers.close()


async def test_concurrent_stops_of_every_kind_of_guest_all_complete(supervisor: Supervisor) -> None:
    spinner = await launch(supervisor, "stoptrap", "t/spinner/0", limits=LONG)
    sleeper = await launch(supervisor, "stoptrap", "t/sleeper/0", limits=LONG)
    slow = await launch(supervisor, "slowstop", "t/slowstop/0", shutdown_timeout=0.5)
    calls = [ask(supervisor, spinner, b"spin"), ask(supervisor, sleeper, b"sleep")]
    await in_call(spinner, calls[0])
    await in_call(sleeper, calls[1])
    with anyio.fail_after(BOUND):
        async with anyio.create_task_group() as group:
            group.start_soon(supervisor.stop, spinner.component_id, 0.3)  # twice: both return
            group.start_soon(supervisor.stop_all, 0.3)
    assert await outcomes(calls) == [Outcome.FAILED, b"slept"]
    assert {a.state for a in (spinner, sleeper, slow)} == {ActorState.STOPPED}


async def test_a_guest_spinning_in_shutdown_gets_its_own_timeout_not_the_stops_window(
        supervisor: Supervisor) -> None:
    neighbour = await launch(supervisor, "echo", "t/neighbour/0")
    slow = await launch(supervisor, "slowstop", "t/slowstop/1", shutdown_timeout=0.2)
    with structlog.testing.capture_logs() as logs:
        stopping = asyncio.ensure_future(supervisor.stop(slow.component_id, drain_timeout=20.0))
        with anyio.fail_after(BOUND):
            assert await ask(supervisor, neighbour, b"still here") == b"still here"
        # The stop may wait for `shutdown` up to 20.7 s (drain deadline + timeout + grace); the spinning
        # guest itself gets 0.2 s from its start, so the stop is over long before that.
        with anyio.fail_after(5.0):
            await stopping
    assert slow.state is ActorState.STOPPED
    failed = [e["error"] for e in logs if e["event"] == "component_shutdown_failed"]
    assert len(failed) == 1 and "shutdown timed out" in failed[0]  # its own deadline, not the stop's window
    assert await ask(supervisor, neighbour, b"after") == b"after"


MANY = 1_000
SHORT_GRACE = 0.1
"""STOP_GRACE shortened for the test below, so that what a line of 1,000 stops costs shows: each
close waited behind every `shutdown` for more than it, and the `shutdown` calls at the back of the line
were given up at shutdown_timeout + STOP_GRACE past the drain's end (with the real 0.5 s, from about
5,000 components and from 3,000 with a 0.2 s shutdown_timeout)."""


@pytest.fixture
async def sparse_ticks() -> AsyncIterator[Supervisor]:
    """A supervisor whose engine ticks once a second: no tick cuts a trivial `shutdown` short
    (test_runtime_calls covers those), so only the line of calls decides when each one runs."""
    rt = Runtime(EngineSettings(epoch_tick_ms=1000), cache_dir=FIXTURES / "cache")
    try:
        async with plain_supervisor(rt, threads=4) as sup:
            yield sup
    finally:
        rt.close()


async def test_a_thousand_components_stopped_at_once_each_run_their_shutdown_and_close_their_store(
        sparse_ticks: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    actors = [await launch(sparse_ticks, "echo", f"t/many/{i}", shutdown_timeout=0.05) for i in range(MANY)]
    monkeypatch.setattr(actor_module, "STOP_GRACE", SHORT_GRACE)
    with structlog.testing.capture_logs() as logs, anyio.fail_after(BOUND):
        await sparse_ticks.stop_all(10.0)  # nothing is queued: the drain ends at once, its time is the stop's
    assert [e for e in logs if e["log_level"] != "info"] == []  # no shutdown given up, no close given up
    assert {a.state for a in actors} == {ActorState.STOPPED}
    assert {a.manager.state for a in actors} == {InstanceState.EMPTY}  # every Store freed by the stop


# --- the real daemon ---------------------------------------------------------------------------------

DRAIN_S = 1.0
SHUTDOWN_S = 1.0
HUNG = f"limits = {{ max_execution_time_ms = 600000 }}\nshutdown_timeout_s = {SHUTDOWN_S}"


def start_daemon(tmp_path: Path, components: str) -> Daemon:
    config = tmp_path / "wasmhost.toml"
    text = config_text(tmp_path / "state", components).replace("drain_timeout_s = 5.0", f"drain_timeout_s = {DRAIN_S}")
    config.write_text(text)
    daemon = Daemon(tmp_path, config)
    daemon.expect("READY=1")
    return daemon


def call_in_background(d: Daemon, cid: str, payload: bytes) -> tuple[threading.Thread, list[protocol.Response]]:
    answers: list[protocol.Response] = []

    def run() -> None:
        answers.append(request(d.socket, protocol.Call(cid, payload, 600.0), timeout=BOUND + 60))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, answers


def wait_for_status(d: Daemon, cid: str, condition: Callable[[dict[str, object]], bool]) -> None:
    end = time.monotonic() + BOUND
    while time.monotonic() < end:
        response = request(d.socket, protocol.Status())
        assert response.data is not None
        row = next(r for r in response.data["components"] if r["id"] == cid)
        if condition(row):
            return
        time.sleep(0.02)
    raise AssertionError(f"{cid} never reached the expected status; log:\n{d.log.read_text()}")


def begin(d: Daemon, cid: str, payload: bytes) -> None:
    """Queue `payload` for `cid` (a send: acknowledged once queued) and wait until the guest runs it."""
    assert request(d.socket, protocol.Send(cid, payload, wait=True)).ok
    wait_for_status(d, cid, lambda row: row["queued"] == 0 and row["in_hand"] == 1)


def test_wasmhost_stop_interrupts_a_ten_minute_call(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, component("t/echo/0", "echo") + component("t/spinner/0", "stoptrap", HUNG))
    try:
        begin(d, "t/spinner/0", b"spin")
        queued = [call_in_background(d, "t/spinner/0", f"m{i}".encode()) for i in range(5)]
        wait_for_status(d, "t/spinner/0", lambda row: row["queued"] == 5)
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "wasmhost.cli", "stop", "t/spinner/0", "--socket",
                                 str(d.socket)], capture_output=True, text=True, timeout=BOUND + 60, cwd=ROOT)
        elapsed = time.monotonic() - began
        assert result.returncode == 0, result.stderr
        assert elapsed < BOUND, f"stop took {elapsed:.1f} s"
        for thread, queued_answers in queued:
            thread.join(BOUND)
            assert queued_answers and "target-stopped" in (queued_answers[0].error or ""), queued_answers
        wait_for_status(d, "t/spinner/0", lambda row: row["state"] == "stopped" and row["failed"] == 1
                        and "interrupted" in str(row["last_error"]))
        assert d.call("t/echo/0", "still here") == "still here"
    finally:
        assert d.stop() == 0


def test_sigterm_exits_within_drain_plus_shutdown_whatever_the_guests_do(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, component("t/spinner/0", "stoptrap", HUNG) + component("t/sleeper/0", "stoptrap", HUNG)
                     + component("t/slowstop/0", "slowstop", f"shutdown_timeout_s = {SHUTDOWN_S}")
                     + component("t/echo/0", "echo"))
    begin(d, "t/spinner/0", b"spin")
    begin(d, "t/sleeper/0", b"sleep")
    queued = [call_in_background(d, "t/sleeper/0", f"m{i}".encode()) for i in range(5)]
    wait_for_status(d, "t/sleeper/0", lambda row: row["queued"] == 5)
    began = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    code = d.proc.wait(timeout=BOUND + 60)
    elapsed = time.monotonic() - began
    assert code == 0
    assert elapsed < BOUND, f"SIGTERM took {elapsed:.1f} s to exit"
    for thread, queued_answers in queued:  # answered before the daemon exited, not cut off
        thread.join(BOUND)
        assert queued_answers and "target-stopped" in (queued_answers[0].error or ""), queued_answers
    events = d.events()
    # The spinner was interrupted; the sleeper woke up and finished its message, then its shutdown trapped.
    assert [e["component"] for e in events if e["event"] == "component_call_interrupted"] == ["t/spinner/0"]
    shutdowns = {e["component"] for e in events if e["event"] == "component_shutdown_failed"}
    assert shutdowns == {"t/sleeper/0", "t/slowstop/0"}
    assert "stopped" in {e["event"] for e in events}
    assert d.stop() == 0


async def test_a_start_or_restart_during_a_stop_is_refused_not_lost(supervisor: Supervisor) -> None:
    """Before: `wasmhost start ID` (and `restart ID`) while ID was stopping answered ok and did nothing, and
    the component then stopped: the operator's start was lost behind an ok (found by test_lifecycle_chaos)."""
    actor = await launch(supervisor, "slowstop", "t/slowstop/0", shutdown_timeout=1.0)  # its shutdown never ends
    stopping = asyncio.ensure_future(supervisor.stop(actor.component_id, 0.0))
    await until(lambda: actor.state is ActorState.STOPPING)
    with pytest.raises(ComponentError, match="t/slowstop/0 is stopping"):
        await actor.start()
    with pytest.raises(ComponentError, match="t/slowstop/0 is stopping"):
        await actor.restart()
    await asyncio.wait_for(stopping, BOUND)
    assert actor.state is ActorState.STOPPED and not actor.running
    await asyncio.wait_for(actor.start(), BOUND)  # once stopped, it starts as usual
    assert actor.state is ActorState.RUNNING


async def test_a_restart_waiting_behind_another_does_not_undo_a_later_stop(supervisor: Supervisor) -> None:
    """Before: two restarts back to back, then a stop: the second restart, let through once the first ended,
    found the component stopped and started it again, so the stop answered ok and the component ran on
    (found by test_lifecycle_chaos)."""
    actor = await launch(supervisor, "slowstop", "t/slowstop/0", shutdown_timeout=1.0)  # each shutdown takes 1 s
    first = asyncio.ensure_future(actor.restart())
    second = asyncio.ensure_future(actor.restart())  # waits for the first
    await until(lambda: actor.state is not ActorState.RUNNING)  # the first is terminating the instance
    await asyncio.wait_for(supervisor.stop(actor.component_id, 0.0), BOUND)
    await asyncio.wait_for(first, BOUND)
    with pytest.raises(ComponentError, match="t/slowstop/0 was stopped while this restart waited"):
        await asyncio.wait_for(second, BOUND)
    assert actor.state is ActorState.STOPPED and not actor.running  # the last word was the stop's


async def test_a_stop_during_a_health_probe_ends_the_probe_and_closes_the_store(supervisor: Supervisor) -> None:
    """Before: a stop while a rollout's health probe was in the guest took the probe's call for one stuck in
    WASI: it logged component_left_running, skipped the guest's shutdown and left the Store unclosed to the
    probe's thread (found by test_lifecycle_chaos)."""
    actor = await launch(supervisor, "sleepyhealth", "t/sleepy/0", limits=LONG)  # health sleeps a second
    manager = actor.manager
    probe = asyncio.ensure_future(actor.probe_health())
    await until(lambda: manager.in_call)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(supervisor.stop(actor.component_id, 0.0), BOUND)
    assert await asyncio.wait_for(probe, BOUND) is None  # ended by the stop, not an error of the guest's
    assert not [e for e in logs if e["event"] == "component_left_running"], logs
    assert actor.manager is manager and manager.store is None  # closed here, not left to a thread
    assert actor.state is ActorState.STOPPED


@pytest.mark.parametrize("ask", ["start", "restart"])
async def test_a_removed_component_is_not_started_again_unlisted(supervisor: Supervisor, ask: str) -> None:
    """A start or restart reaching an actor once it was removed (a control request in the loop turn between
    its task's end and its removal by a reload or `remove`) ran it again outside the supervisor's listing:
    nobody could see, stop or reload it. It is refused now."""
    actor = await launch(supervisor, "echo", "t/removed/0")
    await asyncio.wait_for(supervisor.remove(actor.component_id, 0.0), BOUND)
    with pytest.raises(ComponentError, match="t/removed/0 was removed"):
        await asyncio.wait_for(getattr(actor, ask)(), BOUND)
    assert not actor.running and actor.component_id not in supervisor.actors
