"""host-services.sleep-millis suspends the guest's call instead of holding a worker thread: any number of
sleepers leave every thread to their neighbours, wake with the right result, end at once when stopped, and
still end at their call's deadline."""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Generator

import anyio
import pytest

from tests.conftest import Starter, fixture_path
from tests.support import plain_supervisor
from tests.test_actors import ask
from tests.waits import until
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.restart import RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import LEVELS, STALE_ALARMS, WAKES_PER_SLICE, WorkerPool
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp, blocking
from wasmhost.core.blocking import Asleep
from wasmhost.core.errors import GuestTimeout
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime import host_fn
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import InstanceState

THREADS = 2
LENT = 2
"""The pool lends at most this many threads: before, each sleeper held a thread, so the fifth one on (and
every other guest) waited for a sleeper to wake."""
SLEEPERS = 300


def message(payload: bytes) -> ComponentMessage:
    return ComponentMessage(ComponentId("test-org", "sender", "0"), payload, MessageMetadata(timestamp=Timestamp.now()))


@pytest.fixture
async def small_pool(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime, THREADS, max_lent=LENT) as sup:
        yield sup


async def start_sleepers(sup: Supervisor, count: int, limits: ResourceLimits,
                         restart: RestartPolicy = RestartPolicy.TEMPORARY) -> list[ComponentActor]:
    actors = []
    for i in range(count):
        cid = ComponentId("test-org", "sleeper", str(i))
        loaded = sup.stores.runtime.load(cid, fixture_path("services"))
        actors.append(await sup.start(ActorSpec(cid, limits=limits, restart=restart), loaded))
    return actors


async def start_echo(sup: Supervisor) -> None:
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))


@pytest.mark.anyio
async def test_an_echo_answers_while_more_guests_sleep_than_threads_could_hold(small_pool: Supervisor) -> None:
    sup = small_pool
    await start_echo(sup)
    sleepers = await start_sleepers(sup, SLEEPERS, ResourceLimits(max_execution_time_ms=60_000))
    naps = [asyncio.ensure_future(ask(sup, str(actor.component_id), b"sleep 2000", 60.0)) for actor in sleepers]
    # Every sleeper is in its call at once: none holds a thread (before, at most THREADS + LENT were).
    await until(lambda: all(actor.manager.in_call for actor in sleepers), timeout=20.0)
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i) == b"ping %d" % i
    assert not any(nap.done() for nap in naps), "the echo answered while every sleeper still slept"
    assert sup.workers.asleep == SLEEPERS and sup.workers.threads == THREADS  # no thread lent for them
    assert await asyncio.gather(*naps) == [b"slept"] * SLEEPERS
    assert sup.workers.asleep == 0 and not host_fn._sleeps


@pytest.mark.anyio
async def test_an_echo_answers_beside_guests_looping_over_short_sleeps(runtime: Runtime) -> None:
    # Before, each napper kept its thread through its sleeps (threads enough were lent) and woke every
    # millisecond to run a little guest code, so among 100 of them one was nearly always running guest code
    # and the echo was not admitted to a thread until their deadline ended them (measured: 3.0 s beside 100
    # nappers with a 3 s deadline, 4 worker threads).
    async with plain_supervisor(runtime, 4) as sup:
        await nappers_beside_an_echo(sup)


async def nappers_beside_an_echo(sup: Supervisor) -> None:
    await start_echo(sup)
    nappers = []
    for i in range(100):
        cid = ComponentId("test-org", "napper", str(i))
        spec = ActorSpec(cid, limits=ResourceLimits(max_execution_time_ms=2000), restart=RestartPolicy.TEMPORARY)
        nappers.append(await sup.start(spec, sup.stores.runtime.load(cid, fixture_path("napper"))))
    naps = [asyncio.ensure_future(ask(sup, str(actor.component_id), b"nap", 30.0)) for actor in nappers]
    await until(lambda: all(actor.manager.in_call for actor in nappers), timeout=20.0)
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i) == b"ping %d" % i
    assert not any(nap.done() for nap in naps), "the echo answered while every napper still napped"
    outcomes = await asyncio.gather(*naps, return_exceptions=True)
    assert all(isinstance(outcome, RequestFailed) and "timed out" in outcome.detail for outcome in outcomes)
    assert sup.workers.asleep == 0 and not host_fn._sleeps


@pytest.mark.anyio
async def test_a_stop_during_the_sleeps_ends_them_at_once(small_pool: Supervisor) -> None:
    sup = small_pool
    sleepers = await start_sleepers(sup, SLEEPERS, ResourceLimits(max_execution_time_ms=120_000))
    naps = [asyncio.ensure_future(ask(sup, str(actor.component_id), b"sleep 100000", 150.0)) for actor in sleepers]
    await until(lambda: sup.workers.asleep == SLEEPERS, timeout=20.0)
    with anyio.fail_after(30):  # a hang guard: the sleeps had 100 s left
        await sup.stop_all(drain_timeout=0.1)
        outcomes = await asyncio.gather(*naps, return_exceptions=True)
    # Each sleep ended when its stop interrupted it (its drain time out), and the guest went on from it: it
    # answered, unless an epoch tick cut it first (as it could a guest woken on its thread before; seen once
    # in a few runs, the ticker catching up under load), when its message is answered as interrupted.
    assert b"slept" in outcomes
    assert all(outcome == b"slept" or (isinstance(outcome, RequestFailed) and "interrupted" in outcome.detail)
               for outcome in outcomes), {repr(outcome) for outcome in outcomes}
    assert sup.workers.asleep == 0 and not host_fn._sleeps
    assert all(not actor.manager.in_call for actor in sleepers)


@pytest.mark.anyio
async def test_the_calls_deadline_ends_a_long_sleep(small_pool: Supervisor) -> None:
    sup = small_pool
    [sleeper] = await start_sleepers(sup, 1, ResourceLimits(max_execution_time_ms=300), RestartPolicy.PERMANENT)
    with pytest.raises(RequestFailed, match="timed out"):
        await ask(sup, str(sleeper.component_id), b"sleep 100000", 30.0)  # its 100 s would outlast the ask
    assert sup.workers.asleep == 0 and not host_fn._sleeps
    await until(lambda: sleeper.manager.state is InstanceState.INITIALIZED)  # it was restarted
    assert await ask(sup, str(sleeper.component_id), b"sleep 10") == b"slept"


class RecordingHook:
    """What a guest call's steps tell their scheduler (stands in for WorkerPool's hook)."""

    def __init__(self) -> None:
        self.blocked = 0
        self.computing_slices = 0

    def enter_blocking(self) -> None:
        """A thread waits."""
        self.blocked += 1

    def leave_blocking(self) -> None:
        """Not recorded."""

    def computing(self) -> None:
        """A slice was spent in guest code."""
        self.computing_slices += 1


def test_a_sleeping_call_yields_asleep_and_neither_waits_nor_computes_on_its_thread(start: Starter) -> None:
    guest = start("services", "test-org/services/0")
    hook = RecordingHook()
    blocking.install(hook)
    try:
        steps = guest.handle_message_steps(message(b"sleep 100000"))
        step = next(steps)
        assert isinstance(step, Asleep) and step == guest.host.deadline
        assert step.until <= guest.host.deadline and guest.in_call
        assert hook.blocked == 0 and hook.computing_slices == 0  # this thread did not wait, nor compute
        assert isinstance(next(steps), Asleep)  # stepped again early: still asleep, nothing else happens
        guest.host.interrupt()  # a stop: the sleep is over
        with pytest.raises(StopIteration) as stop:
            next(steps)
        assert stop.value.value == b"slept" and not host_fn._sleeps
    finally:
        blocking.install(None)
        guest.host.interrupted = False


def test_a_call_abandoned_mid_sleep_leaves_nothing_behind(start: Starter) -> None:
    guest = start("services", "test-org/services/0")
    for _ in range(200):
        if guest.state is not InstanceState.INITIALIZED:
            guest.instantiate()
            guest.initialize(ComponentConfig())
        steps = guest.handle_message_steps(message(b"sleep 100000"))
        assert isinstance(next(steps), Asleep)
        steps.close()  # its waiter went away: the call future is deleted mid-sleep
        assert not guest.in_call and guest.state is InstanceState.DEAD
        assert guest.host.asleep_until is None and not host_fn._sleeps


@pytest.mark.anyio
async def test_a_cancelled_waiter_of_a_sleeping_call_gets_its_store_back_at_once(start: Starter) -> None:
    guest = start("services", "test-org/services/0", ResourceLimits(max_execution_time_ms=120_000))
    workers = WorkerPool(1)
    try:
        call = asyncio.ensure_future(workers.run_steps(guest.handle_message_steps(message(b"sleep 100000")),
                                                       guest.lock))
        await until(lambda: workers.asleep == 1)
        call.cancel()  # without calling interrupt: the pool itself takes the call out of its sleep
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not guest.in_call and guest.state is InstanceState.DEAD and workers.asleep == 0
        assert not host_fn._sleeps
    finally:
        workers.close()


def test_run_to_end_waits_out_a_sleep_on_its_thread_and_the_deadline_still_applies(start: Starter) -> None:
    guest = start("services", "test-org/services/1", limits=ResourceLimits(max_execution_time_ms=200))
    assert guest.handle_message(message(b"sleep 20")) == b"slept"
    with pytest.raises(GuestTimeout, match="deadline passed"):
        guest.handle_message(message(b"sleep 100000"))  # ends at the deadline, not in 100 s
    assert not host_fn._sleeps


@pytest.mark.anyio
async def test_a_message_that_arrives_while_a_probes_health_sleeps_waits_for_it(small_pool: Supervisor) -> None:
    """A reload's rollout probes a component's health outside its actor's task (probe_health). A `health`
    asleep in sleep-millis was set aside like a message's call, letting go of the Store's lock, so a message
    arriving meanwhile began its call on a Store with a call in progress: it failed ("a call is already in
    progress"), the component restarted and the probe failed with it (a rollout rolled back). The probe's
    sleep holds the Store, as every sleep did before, so the message waits for it and is answered."""
    sup = small_pool
    cid = ComponentId.parse("test-org/sleepyhealth/0")
    actor = await sup.start(ActorSpec(cid), sup.stores.runtime.load(cid, fixture_path("sleepyhealth")))
    probe = asyncio.ensure_future(actor.probe_health())
    await until(lambda: actor.manager.host.asleep_until is not None)  # health sleeps 1 s
    assert await ask(sup, str(cid), b"hello") == b"hello"
    assert await probe is None
    assert actor.stats.restarts == 0 and actor.state is ActorState.RUNNING


@pytest.mark.anyio
async def test_start_functions_asleep_hold_no_thread_and_end_at_their_deadline(small_pool: Supervisor) -> None:
    """A core start function sleeping in sleep-millis is set aside like a call's sleep. Before, its thread
    waited the sleep out: beyond the lent threads, start functions asleep stalled every other guest until
    their deadline (measured: an echo beside 300 of them, 2 threads and 8 lent, got no answer in 60 s)."""
    sup = small_pool
    await start_echo(sup)

    async def start_sleeper(i: int, deadline_ms: int) -> ComponentActor:
        cid = ComponentId("test-org", "startsleep", str(i))
        spec = ActorSpec(cid, limits=ResourceLimits(max_execution_time_ms=deadline_ms),
                         restart=RestartPolicy.TEMPORARY)
        return await sup.start(spec, sup.stores.runtime.load(cid, fixture_path("startsleep")))

    # A sleep that reaches the deadline ends the instantiation as a timeout.
    short = await start_sleeper(0, 300)
    assert "instantiation failed" in (short.stats.last_error or "") and "deadline" in (short.stats.last_error or "")
    count = THREADS + LENT + 6
    starting = [asyncio.ensure_future(start_sleeper(i, 120_000)) for i in range(1, count + 1)]
    await until(lambda: sup.workers.asleep == count, timeout=20.0)  # every start function asleep, set aside
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i) == b"ping %d" % i
    assert not any(start.done() for start in starting) and sup.workers.threads == THREADS
    with anyio.fail_after(30):  # a hang guard: the sleeps had 120 s left; a stop ends them at once
        await sup.stop_all(drain_timeout=0.1)
        await asyncio.gather(*starting, return_exceptions=True)
    assert sup.workers.asleep == 0 and not host_fn._sleeps


class NeverInterrupted:
    """A Sleeper whose sleeps nothing interrupts."""

    def wake_me(self, wake: Callable[[], None] | None) -> bool:
        """Nothing to tell."""
        return True

    def wait_out(self, until: float) -> None:
        """Over already."""


@pytest.mark.anyio
async def test_a_call_that_keeps_waking_sinks_below_a_fresh_call() -> None:
    """Steps that left the guest asleep did not count in the feedback queue, so a guest looping over
    sleep-millis(1) stayed at the top level however long its call ran, and every fresh call queued behind
    the wakes of all of them (measured: an echo beside 1,000 nappers, p50 38.6 ms; beside 1,000 spinners,
    which sink, 0.09 ms). Wakes now count (WAKES_PER_SLICE to a slice): a fresh call goes before them."""
    nappers = 20
    steps_taken = 0
    sleeper = NeverInterrupted()
    gate = threading.Event()  # cleared: the napper step in progress waits, so the count stops with it
    gate.set()
    at_gate = threading.Event()

    def napper() -> Generator[float, None, None]:
        nonlocal steps_taken
        while True:
            if not gate.is_set():
                at_gate.set()
                gate.wait(10)
            steps_taken += 1
            yield Asleep(math.inf, 0.0, sleeper)  # a sleep over at once: straight back to the queue

    def fresh() -> Generator[float, None, int]:
        return steps_taken
        yield  # a generator: one step, that returns at once

    workers = WorkerPool(1)
    try:
        naps = [asyncio.ensure_future(workers.run_steps(napper())) for _ in range(nappers)]
        await until(lambda: steps_taken >= nappers * WAKES_PER_SLICE * 2 ** (LEVELS - 1))  # each at the bottom
        gate.clear()
        await until(at_gate.is_set)  # the one thread is held inside a napper's step: nothing else moves
        queued = asyncio.ensure_future(workers.run_steps(fresh()))
        await asyncio.sleep(0)  # its job is queued behind the 19 nappers queued
        before = steps_taken
        gate.set()
        ran_at = await queued
        # The fresh call ran next, after the napper step in progress (before: after every queued one)
        assert ran_at - before <= 1, (before, ran_at)
        for nap in naps:
            nap.cancel()
        await asyncio.gather(*naps, return_exceptions=True)
    finally:
        workers.close()


class Interruptible:
    """A Sleeper whose interrupt the test calls (`interrupt`), as a stop does."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] | None = None

    def wake_me(self, wake: Callable[[], None] | None) -> bool:
        """Keep what to call."""
        self.wake = wake
        return True

    def wait_out(self, until: float) -> None:
        """Not used: the pool sets the call aside."""

    def interrupt(self) -> None:
        """The sleep is over now."""
        wake, self.wake = self.wake, None
        if wake is not None:
            wake()


class Held:
    """What a call holds until it ends (a StoreManager, in the daemon)."""


@pytest.mark.anyio
async def test_calls_whose_sleeps_were_interrupted_are_let_go_of() -> None:
    """A sleep interrupted before its time (a stop) left its entry in the pool's alarms until that time (up
    to the call's deadline), keeping the ended call and what it held (the StoreManager of a component removed
    meanwhile): 500 sleepers (10-minute deadline) stopped and removed per cycle left 2,000 entries after 4
    cycles, growing with the stops for as long as the deadline."""
    count = 300
    sleepers = [Interruptible() for _ in range(count)]
    held = [Held() for _ in range(count)]
    refs = [weakref.ref(h) for h in held]

    def sleeps(sleeper: Interruptible) -> Generator[float, None, None]:
        yield Asleep(math.inf, time.monotonic() + 600, sleeper)

    workers = WorkerPool(1)
    try:
        calls = [asyncio.ensure_future(workers.run_steps(sleeps(sleeper), afterwards=functools.partial(id, h)))
                 for sleeper, h in zip(sleepers, held, strict=True)]
        await until(lambda: workers.asleep == count)
        for sleeper in sleepers:
            sleeper.interrupt()
        await asyncio.gather(*calls)
        del calls, held
        gc.collect()
        kept = sum(ref() is not None for ref in refs)
        assert kept <= STALE_ALARMS, f"{kept} of {count} ended calls are still kept"
    finally:
        workers.close()
