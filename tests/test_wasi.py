"""What WASI 0.2 gives an untrusted guest, tried by a hostile one (the `wasiprobe` fixture, which imports
wasi:sockets, wasi:clocks, wasi:io/poll and wasi:random directly): what it is denied, what bounds it, and
what its neighbours see while it waits inside a WASI call."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import anyio
import pytest
import structlog.testing

from tests.conftest import Starter, fixture_path
from tests.support import MemoryStorage, plain_supervisor
from tests.test_actors import ask
from tests.test_runtime_calls import message
from tests.waits import until
from wasmhost.actors.restart import Backoff, Intensity, RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import MAX_HELD_MEMORY_BYTES, WorkerPool
from wasmhost.core import ComponentId
from wasmhost.core.errors import GuestTimeout, GuestTrap
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.runtime import Runtime
from wasmhost.system.stores import HostStores

ACCESS_DENIED = 1  # wasi:sockets/network error-code `access-denied`
PERMANENT_RESOLVER_FAILURE = 20  # the error-code of a name lookup that is not allowed
CLOSED = 1  # wasi:io/streams stream-error case `closed`
THREADS = 2


@pytest.fixture
async def small_pool(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime, THREADS) as sup:
        yield sup


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", [b"t", b"u"])
def test_a_guest_gets_no_socket_and_no_file_descriptor(start: Starter, kind: bytes) -> None:
    # wasmtime's WASI allows TCP and UDP but denies every address; wasmhost grants none. Were sockets
    # made, each would be one of the daemon's file descriptors until the guest dropped it.
    probe = start("wasiprobe", "evil/wasiprobe/0")
    probe.handle_message(message(kind + b"1"))  # the first call may start WASI's own runtime (its fds)
    before = open_fds()
    assert probe.handle_message(message(kind + b"1000")) == b"0 %d" % ACCESS_DENIED
    assert open_fds() == before


@pytest.mark.parametrize("kind", [b"c", b"b"])
def test_a_guest_cannot_reach_or_bind_a_local_port(start: Starter, kind: bytes) -> None:
    with socket.socket() as listener:  # a local service (as the metrics port or nats-server would be)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        probe = start("wasiprobe", "evil/wasiprobe/0")
        # 100 + code: refused when the socket is created, before any address is tried
        assert probe.handle_message(message(kind + b"%d" % port)) == b"%d" % (100 + ACCESS_DENIED)
        listener.settimeout(0)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_a_guest_cannot_resolve_names(start: Starter) -> None:
    # wasi:sockets/ip-name-lookup is off (wasmhost never calls wasi_config_allow_ip_name_lookup): every
    # name fails at once, before any resolver is asked.
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"n0")) == b"%d" % (100 + PERMANENT_RESOLVER_FAILURE)


@pytest.mark.parametrize("length", [b"10", b"999999999999999999"])
def test_stdin_is_closed_whatever_a_guest_asks_to_read(start: Starter, length: bytes) -> None:
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"i" + length)) == b"e%d" % (1 + CLOSED)


def test_random_bytes_are_capped_by_wasmtime(start: Starter) -> None:
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"r4096")) == b"4096"
    with pytest.raises(GuestTrap, match="requested len 67108865 exceeds limit 67108864"):
        probe.handle_message(message(b"r67108865"))  # checked before anything is allocated


def test_write_zeroes_is_bounded_before_anything_is_allocated(start: Starter) -> None:
    # Were WASI's stdout (a sink when `wasi = false`) to accept any length, write-zeroes(N) would make a
    # buffer of N zero bytes in the host (wasmtime-wasi allocates it whole): 10^18 would abort the daemon.
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"z1000")) == b"0"
    with pytest.raises(GuestTrap, match="cannot write more zeroes than `check_write` allows"):
        probe.handle_message(message(b"z999999999999999999"))


def test_pollables_a_guest_hoards_are_capped_by_wasmtime(start: Starter) -> None:
    probe = start("wasiprobe", "evil/wasiprobe/0")
    assert probe.handle_message(message(b"h1000")) == b"1000"
    with pytest.raises(GuestTrap, match="handle limit exceeded"):
        probe.handle_message(message(b"h200000"))


@pytest.mark.anyio
async def test_echo_answers_while_guests_sleep_in_wasi_poll(small_pool: Supervisor) -> None:
    """A guest blocked on a WASI pollable waits inside wasmtime, in one step no epoch tick can cut (the
    wait is not guest code). Two of them on a pool of two threads took both, and the echo waited
    until they woke, as long as they chose. A step that long counts as a thread waiting in a host call:
    it runs no guest code meanwhile, and a thread is lent for the work queued behind it."""
    sup = small_pool
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
    sleepers = [ComponentId.parse(f"evil/wasiprobe/{i}") for i in range(THREADS)]
    for sleeper in sleepers:
        spec = ActorSpec(sleeper, restart=RestartPolicy.TEMPORARY)
        await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
    naps = [asyncio.ensure_future(ask(sup, str(sleeper), b"s5000", 30.0)) for sleeper in sleepers]
    await until(lambda: all(sup.actors[sleeper].manager.in_call for sleeper in sleepers))
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i, timeout=2.0) == b"ping %d" % i
    assert not any(nap.done() for nap in naps), "the echo should answer while the sleepers still sleep"
    assert await asyncio.gather(*naps) == [b"slept"] * THREADS
    await until(lambda: sup.workers.threads == THREADS)  # lent threads end once idle


@pytest.mark.anyio
async def test_guests_in_long_wasi_calls_that_compute_are_not_lent_threads(small_pool: Supervisor) -> None:
    """A `poll` on a list of millions of pollables is also one long step, but one that computes and
    allocates host memory outside the guest's budget (8M entries: 275 MiB at its peak). Only a step whose
    thread waits is lent a thread: lending to these too let every such guest convert at once (six on two
    threads peaked at 1.4 GiB instead of 0.75)."""
    sup = small_pool
    floods = [ComponentId.parse(f"evil/wasiprobe/{i}") for i in range(3 * THREADS)]
    for flood in floods:
        spec = ActorSpec(flood, restart=RestartPolicy.TEMPORARY)
        await sup.start(spec, sup.stores.runtime.load(flood, fixture_path("wasiprobe")))
    replies = await asyncio.gather(*(ask(sup, str(flood), b"p3000000", 60.0) for flood in floods))
    assert replies == [b"3000000"] * len(floods)
    # Lending to every long step started one thread per guest. (Not `== THREADS`: a computing thread that
    # waits for the GIL or a core long enough is taken for a waiting one, on a loaded machine.)
    assert sup.workers.started < len(floods)


@pytest.mark.anyio
async def test_a_supervisor_closes_while_a_guest_sleeps_an_hour_in_wasi_poll(runtime: Runtime) -> None:
    """A WASI wait is not guest code: neither the call's deadline nor a stop ends it, and the thread
    keeps the guest's Store until the guest wakes. The stop already returned in time (logging
    `component_stop_overran`), but the actor's task went on waiting for that thread, so the supervisor,
    and with it the daemon on SIGTERM, did not exit for as long as the guest slept (measured: still
    running 20 s after SIGTERM, for a one-hour sleep). Once every stop has had its time, the pool stops
    waiting for such a thread: the Store is left to it (freed when the guest wakes), the rest is closed
    and answered as usual."""
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    with structlog.testing.capture_logs() as logs:
        async with plain_supervisor(runtime, THREADS) as sup:
            spec = ActorSpec(sleeper, limits=ResourceLimits(max_execution_time_ms=1000), shutdown_timeout=0.2)
            await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
            nap = asyncio.ensure_future(ask(sup, str(sleeper), b"s3600000", 3600.0))
            await until(lambda: sup.actors[sleeper].manager.in_call)
            queued = asyncio.ensure_future(ask(sup, str(sleeper), b"h1", 3600.0))
            await until(lambda: len(sup.actors[sleeper].mailbox) == 1)
            await sup.stop_all(drain_timeout=0.2)
            assert sup.actors[sleeper].state is ActorState.STOPPED
            with pytest.raises(RequestFailed, match="stopped before handling"):
                await queued
        nap.cancel()
    events = [entry["event"] for entry in logs if entry.get("component") == str(sleeper)]
    assert "component_stop_overran" in events
    assert "component_left_running" in events


@pytest.mark.anyio
@pytest.mark.parametrize(("policy", "payload", "state", "restarts"), [
    (RestartPolicy.PERMANENT, b"x0", ActorState.RUNNING, 1),
    (RestartPolicy.PERMANENT, b"x1", ActorState.RUNNING, 1),
    (RestartPolicy.TRANSIENT, b"x0", ActorState.STOPPED, 0),  # a normal exit: stopped, not failed
    (RestartPolicy.TRANSIENT, b"x1", ActorState.RUNNING, 1),
    (RestartPolicy.TEMPORARY, b"x0", ActorState.STOPPED, 0),
    (RestartPolicy.TEMPORARY, b"x1", ActorState.FAILED, 0),
])
async def test_a_wasi_exit_is_answered_and_handled_by_the_restart_policy(
        small_pool: Supervisor, policy: RestartPolicy, payload: bytes, state: ActorState, restarts: int) -> None:
    sup = small_pool
    probe = ComponentId.parse("evil/wasiprobe/0")
    await sup.start(ActorSpec(probe, restart=policy), sup.stores.runtime.load(probe, fixture_path("wasiprobe")))
    status = 0 if payload == b"x0" else 1  # WASI 0.2's exit takes ok or err: status 0 or 1
    with pytest.raises(RequestFailed, match=f"handle-message exited: Exited with i32 exit status {status}"):
        await ask(sup, str(probe), payload)
    actor = sup.actors[probe]
    await until(lambda: actor.state is state and actor.stats.restarts == restarts)
    if state is ActorState.RUNNING:
        assert await ask(sup, str(probe), b"h1") == b"1"  # a fresh instance answers


@pytest.mark.anyio
async def test_a_component_stopped_while_it_sleeps_in_wasi_poll_starts_again(small_pool: Supervisor) -> None:
    """The same for one component's stop (`wasmhost stop`, a reload replacing it): its actor stayed
    `stopping`, waiting for the thread, and could not start again until the guest woke. Now it ends
    when its stop overruns, and starts again with a Store of its own."""
    sup = small_pool
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    spec = ActorSpec(sleeper, limits=ResourceLimits(max_execution_time_ms=1000), shutdown_timeout=0.2)
    actor = await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
    nap = asyncio.ensure_future(ask(sup, str(sleeper), b"s3600000", 3600.0))
    await until(lambda: actor.manager.in_call)
    await sup.stop(sleeper, drain_timeout=0.2)
    assert actor.state is ActorState.STOPPED and not actor.running
    with pytest.raises(RequestFailed, match="interrupted"):
        await nap
    await actor.start()
    assert await ask(sup, str(sleeper), b"h1") == b"1"


HANG_GUARD_S = 120.0
"""Not a timing assertion: without the fix these tests would wait for the guest's hour-long sleep."""
HOUR = b"s3600000"


def sleeper_spec(component: ComponentId, **extra: object) -> ActorSpec:
    return ActorSpec(component, limits=ResourceLimits(max_execution_time_ms=1000), shutdown_timeout=0.2,
                     backoff=Backoff(base=0.01), **extra)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_a_guest_asleep_in_wasi_past_its_deadline_is_timed_out_and_restarted(small_pool: Supervisor) -> None:
    """A WASI wait is not guest code: the deadline (max_execution_time_ms, 1 s) did not end it, and a
    1-hour sleep held its message, thread and Store for the hour (a 5 s sleep answered after 5 s), its
    queue waited behind it and `status` showed it running. Now the call is given up on STOP_GRACE past
    its deadline: the message is answered as timed out, recorded as a timeout, and the component
    restarts on a fresh Store and answers the next message; only the thread and the old Store stay with
    the sleeper."""
    sup = small_pool
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    actor = await sup.start(sleeper_spec(sleeper), sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
    with anyio.fail_after(HANG_GUARD_S):
        nap = asyncio.ensure_future(ask(sup, str(sleeper), HOUR, 3600.0))
        queued = asyncio.ensure_future(ask(sup, str(sleeper), b"h1", 3600.0))
        await until(lambda: actor.manager.in_call)
        assert await ask(sup, str(echo), b"ping") == b"ping"
        with pytest.raises(RequestFailed, match="handle-message timed out: blocked in a WASI wait") as failed:
            await nap
        assert failed.value.outcome.value == "failed"  # as any call that ran out its deadline
        assert await queued == b"1"  # handled by the fresh instance
    assert actor.state is ActorState.RUNNING and actor.stats.restarts == 1
    assert "timed out" in (actor.stats.last_error or "")
    record = actor.forensics.report(str(sleeper)).failures[0]
    assert (record.kind, record.call) == ("timeout", "handle-message")
    assert actor.held_threads == 1  # the sleeper still has its thread
    assert await ask(sup, str(sleeper), b"h2") == b"2"
    assert await ask(sup, str(echo), b"pong") == b"pong"


@pytest.mark.anyio
@pytest.mark.parametrize("window", [60.0, 0.001])
async def test_a_guest_that_keeps_sleeping_in_wasi_fails_holding_a_bounded_number_of_threads(
        small_pool: Supervisor, window: float) -> None:
    """Each call given up on keeps its thread until the guest wakes. A guest sleeping again after every
    restart fails once its restarts run out (max_restarts in the window); and, however slowly it does
    so (a window too short to count two restarts), once it holds max_restarts + 1 threads."""
    sup = small_pool
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    spec = sleeper_spec(sleeper, intensity=Intensity(max_restarts=2, window=window))
    actor = await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
    with anyio.fail_after(HANG_GUARD_S):
        naps = [asyncio.ensure_future(ask(sup, str(sleeper), HOUR, 3600.0)) for _ in range(5)]
        results = await asyncio.gather(*naps, return_exceptions=True)
    assert all(isinstance(result, RequestFailed) for result in results), results
    timed_out = [result for result in results if "timed out" in str(result)]
    assert len(timed_out) == 3 and "failed before handling" in str(results[3])
    assert actor.state is ActorState.FAILED and actor.stats.restarts == 2
    assert actor.held_threads == 3
    assert sup.workers.threads <= THREADS + 3  # a thread lent beside each held one, at most


@pytest.mark.anyio
async def test_a_reload_of_a_component_asleep_in_wasi_completes(small_pool: Supervisor) -> None:
    """A handover (a reload) waits for the message in hand: for a guest asleep in WASI, until it woke,
    holding the reload lock. Now the call is given up on, and the new version takes over."""
    sup = small_pool
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    spec = sleeper_spec(sleeper)
    loaded = sup.stores.runtime.load(sleeper, fixture_path("wasiprobe"))
    actor = await sup.start(spec, loaded)
    with anyio.fail_after(HANG_GUARD_S):
        nap = asyncio.ensure_future(ask(sup, str(sleeper), HOUR, 3600.0))
        await until(lambda: actor.manager.in_call)
        handover = await sup.hand_over(spec, loaded)
        assert handover.boot_error is None
        with pytest.raises(RequestFailed, match="timed out"):
            await nap
    assert await ask(sup, str(sleeper), b"h1") == b"1"


@pytest.mark.anyio
@pytest.mark.parametrize("command", [b"w", b"m"])
@pytest.mark.parametrize("ending", ["given up", "stopped"])
async def test_a_thread_left_in_a_wasi_wait_has_no_effect_when_its_guest_wakes(
        runtime: Runtime, command: bytes, ending: str) -> None:
    """The thread of a call given up on (past its deadline) or left running by a stop that overran (before
    it) runs the guest again when its wait ends, with its old host context: a storage.set (w) or send
    (m) then landed after the message was answered and the component had moved on (measured for a
    stop: the write was committed, the send delivered). Its host calls are refused (a trap) and its
    writes never committed. (A call past its deadline is also ended by wasmtime's epoch check when it
    wakes, before the import runs: the `given up` cases pass without the refusal too.)"""
    workers = WorkerPool(THREADS)
    router = MessageRouter(asyncio.get_running_loop())
    storage = MemoryStorage()
    try:
        async with Supervisor(HostStores(runtime, router, storage), router, workers) as sup:
            try:
                echo = ComponentId.parse("test-org/echo/0")
                echo_actor = await sup.start(ActorSpec(echo), runtime.load(echo, fixture_path("echo")))
                sleeper = ComponentId.parse("evil/wasiprobe/0")
                spec = sleeper_spec(sleeper, storage=True)
                if ending == "stopped":
                    spec = ActorSpec(sleeper, limits=ResourceLimits(max_execution_time_ms=60000),
                                     shutdown_timeout=0.2, storage=True)
                actor = await sup.start(spec, runtime.load(sleeper, fixture_path("wasiprobe")))
                with anyio.fail_after(HANG_GUARD_S):
                    # 4 s: well after the call is given up on (1 s deadline + STOP_GRACE) or the stop overran
                    nap = asyncio.ensure_future(ask(sup, str(sleeper), command + b"4000", 3600.0))
                    if ending == "stopped":
                        await until(lambda: actor.manager.in_call)
                        await sup.stop(sleeper, drain_timeout=0.2)
                    with pytest.raises(RequestFailed, match="blocked in a WASI wait" if ending == "given up"
                                       else "interrupted"):
                        await nap
                    assert actor.held_threads == 1
                    await until(lambda: actor.held_threads == 0, HANG_GUARD_S)  # the guest woke, its call ended
                assert storage.data.get(sleeper, {}) == {}
                assert await ask(sup, str(echo), b"ping") == b"ping"  # after anything the sleeper sent it
                assert echo_actor.stats.handled == 1
                if ending == "stopped":
                    await actor.start()
                assert await ask(sup, str(sleeper), b"h1") == b"1"
            finally:
                await sup.stop_all(drain_timeout=1.0)
    finally:
        workers.close()


@pytest.mark.anyio
async def test_a_handed_over_component_stopped_in_a_wasi_wait_starts_again_as_its_new_version(
        small_pool: Supervisor) -> None:
    """A stop that overran on a guest asleep in WASI dropped the actor's StoreManager, and a later start
    built one with the actor's first `prepare`: after a handover (a reload), the version it was added
    with (measured: the echo it replaced answered `h1` with `h1`). It now goes on with the same version."""
    sup = small_pool
    cid = ComponentId.parse("evil/wasiprobe/0")
    spec = ActorSpec(cid, limits=ResourceLimits(max_execution_time_ms=60000), shutdown_timeout=0.2)
    actor = await sup.start(spec, sup.stores.runtime.load(cid, fixture_path("echo")))
    handover = await sup.hand_over(spec, sup.stores.runtime.load(cid, fixture_path("wasiprobe")))
    assert handover.boot_error is None
    with anyio.fail_after(HANG_GUARD_S):
        nap = asyncio.ensure_future(ask(sup, str(cid), HOUR, 3600.0))
        await until(lambda: actor.manager.in_call)
        await sup.stop(cid, drain_timeout=0.2)
        with pytest.raises(RequestFailed, match="interrupted"):
            await nap
    await actor.start()
    assert await ask(sup, str(cid), b"h1") == b"1"


def test_an_abandoned_host_context_refuses_host_calls_and_commits_nothing(start: Starter) -> None:
    """What the thread of a call given up on (or left running by a stop) meets should its guest get past
    wasmtime's epoch check when it wakes (a woken guest yields there first, past its tick: measured
    above): its host context is abandoned, so its host calls trap and its held writes are never committed."""
    storage = MemoryStorage()
    cid = ComponentId.parse("test-org/storage/0")
    host = HostContext(cid, storage=storage)
    guest = start("storage", str(cid), host=host)
    host.hold_writes()
    assert guest.handle_message(message(b"set a 1")) == b"ok"
    host.end_message(True)
    host.abandon()
    assert host.start_commit() is None
    with pytest.raises(GuestTrap, match="set refused: the call was given up on"):
        guest.handle_message(message(b"set b 2"))
    assert storage.data.get(cid, {}) == {}


@pytest.mark.anyio
@pytest.mark.parametrize("busy", [False, True])
async def test_a_health_probe_of_a_guest_asleep_in_wasi_ends_and_the_component_restarts(
        small_pool: Supervisor, busy: bool) -> None:
    """A reload's rollout probes a new version's health (ComponentActor.probe_health) outside the actor's
    task: a `health` asleep in WASI held that probe, and the reload with it, until the guest woke (not even
    cancelling the probe ended it). The probe's call is given up on like any other past its deadline: the
    probe fails (a timeout, so the rollout rolls back), and the component restarts on a fresh Store and
    answers its next message, also one that arrived meanwhile (`busy`: its batch waited for the Store)."""
    sup = small_pool
    sleeper = ComponentId.parse("evil/wasiprobe/0")
    actor = await sup.start(sleeper_spec(sleeper), sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
    assert await ask(sup, str(sleeper), b"g3600000") == b"slept"  # health() sleeps an hour from now on
    with anyio.fail_after(HANG_GUARD_S):
        probe = asyncio.ensure_future(actor.probe_health())
        await until(lambda: actor.manager.in_call)
        meanwhile = asyncio.ensure_future(ask(sup, str(sleeper), b"h1", 3600.0)) if busy else None
        error = await probe
        assert isinstance(error, GuestTimeout) and "health timed out: blocked in a WASI wait" in str(error)
        if meanwhile is not None:
            assert await meanwhile == b"1"
        assert await ask(sup, str(sleeper), b"h2", 3600.0) == b"2"
    assert actor.stats.restarts == 1 and actor.state is ActorState.RUNNING


LENT = 4
"""The lending ceiling of the pools below (MAX_LENT_THREADS is 256): 2 + 4 threads, 2 held at most before
components are failed (WorkerPool.max_held, half the lent threads)."""


@pytest.mark.anyio
async def test_components_that_keep_sleeping_in_wasi_cannot_hold_every_thread_of_the_host(runtime: Runtime) -> None:
    """Each component is failed once it holds max_restarts + 1 threads given up on in WASI, but nothing
    bounded them across components: with a generous max_restarts, three sleepers restarted and slept again
    until they held every thread of the pool (6 of 6 on 2 threads lending at most 4, lowered from 256 here
    through WorkerPool's max_lent), all stuck `restarting`, and the echo beside them got no answer (a 10 s
    request timed out) for as long as they slept. Once `max_held` threads are held host-wide, a component
    whose call is given up on is failed instead of restarted, saying why; the echo is still served."""
    with structlog.testing.capture_logs() as logs:
        async with plain_supervisor(runtime, THREADS, max_lent=LENT) as sup:
            workers = sup.workers
            echo = ComponentId.parse("test-org/echo/0")
            await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
            sleepers = [ComponentId.parse(f"evil/wasiprobe/{i}") for i in range(3)]
            for sleeper in sleepers:
                spec = sleeper_spec(sleeper, intensity=Intensity(max_restarts=20, window=60.0))
                await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
            naps = [asyncio.ensure_future(ask(sup, str(sleeper), HOUR, 3600.0))
                    for sleeper in sleepers for _ in range(6)]
            actors = [sup.actors[sleeper] for sleeper in sleepers]
            await until(lambda: all(actor.state is ActorState.FAILED for actor in actors), 30.0)  # a guard
            assert await ask(sup, str(echo), b"ping", 10.0) == b"ping"
            # Past the bound, each component holds one thread more at most: the one it is failed for.
            # (fewer than the pool's 6: threads are left for others; the pool's own count may reach 6 for a
            # moment, lending threads while the sleepers' calls are given up on, but those are not held)
            assert workers.held_threads == sum(actor.held_threads for actor in actors) <= workers.max_held - 1 + 3
            results = await asyncio.gather(*naps, return_exceptions=True)
            assert all(isinstance(result, RequestFailed) for result in results), results
            refused = [actor for actor in actors if (actor.stats.last_error or "").startswith("not restarted")]
            assert refused, [actor.stats.last_error for actor in actors]
            assert "held by guests asleep in WASI (host-wide bound 2)" in (refused[0].stats.last_error or "")
            assert f"wasmhost restart {refused[0].name}" in (refused[0].stats.last_error or "")
    bounded = [entry for entry in logs if entry["event"] == "host_waits_held"]
    assert bounded and all(entry["max_held"] == 2 and entry["held_threads"] >= 2 for entry in bounded)


@pytest.mark.anyio
async def test_stores_held_by_guests_asleep_in_wasi_are_bounded_in_memory_host_wide(runtime: Runtime) -> None:
    """Each Store left to a guest asleep in WASI keeps up to its component's max_memory_bytes mapped, outside
    that component's budget, and a component sleeping after every restart left max_restarts + 1 of them (with
    128 threads held host-wide at 64 MiB each: 8 GiB, twice the unit's MemoryMax). Once the Stores held
    host-wide may hold MAX_HELD_MEMORY_BYTES (1 GiB), a component whose call is given up on is failed rather
    than restarted: here a sleeper allowed 600 MiB is restarted once (600 MiB held) and failed the second time
    (1,200 MiB), long before its restarts or the threads run out; an echo beside it keeps answering."""
    assert MAX_HELD_MEMORY_BYTES == 1 << 30
    async with plain_supervisor(runtime, THREADS) as sup:
        echo = ComponentId.parse("test-org/echo/0")
        await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
        sleeper = ComponentId.parse("evil/wasiprobe/0")
        spec = ActorSpec(sleeper, limits=ResourceLimits(max_execution_time_ms=1000, max_memory_bytes=600 << 20),
                         shutdown_timeout=0.2, backoff=Backoff(base=0.01),
                         intensity=Intensity(max_restarts=20, window=60.0))
        await sup.start(spec, sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
        actor = sup.actors[sleeper]
        with anyio.fail_after(HANG_GUARD_S):
            naps = await asyncio.gather(*(ask(sup, str(sleeper), HOUR, 3600.0) for _ in range(2)),
                                        return_exceptions=True)
            assert all("blocked in a WASI wait" in str(nap) for nap in naps), naps
            await until(lambda: actor.state is ActorState.FAILED)
        assert actor.stats.restarts == 1 and actor.held_threads == 2
        assert sup.workers.held_memory == 1200 << 20 and sup.workers.held_threads == 2 < sup.workers.max_held
        assert (actor.stats.last_error or "").startswith("not restarted: 1200 MiB of Store memory is held by "
                                                         "guests asleep in WASI (host-wide bound 1024 MiB)")
        assert await ask(sup, str(echo), b"ping", 10.0) == b"ping"


@pytest.mark.anyio
async def test_once_threads_held_in_wasi_are_let_go_components_restart_again(runtime: Runtime) -> None:
    """The host-wide bound on threads held by calls given up on in WASI counts only threads still held: once
    the sleepers wake, a component whose call is given up on is restarted again (the pool lends at most
    4 threads here, lowered from 256: 2 held at most, see the test above)."""
    async with plain_supervisor(runtime, THREADS, max_lent=LENT) as sup:
        workers = sup.workers
        sleepers = [ComponentId.parse(f"evil/wasiprobe/{i}") for i in range(2)]
        for sleeper in sleepers:
            await sup.start(sleeper_spec(sleeper), sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
        actors = [sup.actors[sleeper] for sleeper in sleepers]
        with anyio.fail_after(HANG_GUARD_S):
            # 4 s: well after they are given up on (1 s deadline + STOP_GRACE)
            naps = await asyncio.gather(*(ask(sup, str(sleeper), b"s4000", 3600.0) for sleeper in sleepers),
                                        return_exceptions=True)
            assert all("blocked in a WASI wait" in str(nap) for nap in naps), naps
            # The first given up on made 1 held thread and restarted, the second made 2 (the bound) and failed.
            await until(lambda: sorted((actor.state.value, actor.stats.restarts) for actor in actors)
                        == [("failed", 0), ("running", 1)])
            failed = next(actor for actor in actors if actor.state is ActorState.FAILED)
            await until(lambda: workers.held_threads == 0, HANG_GUARD_S)  # both guests woke
            await failed.restart()  # as `wasmhost restart ID`
            assert failed.state is ActorState.RUNNING and failed.stats.restarts == 1
            with pytest.raises(RequestFailed, match="blocked in a WASI wait"):
                await ask(sup, failed.name, HOUR, 3600.0)
            await until(lambda: failed.state is ActorState.RUNNING and failed.stats.restarts == 2)
        assert workers.held_threads == failed.held_threads == 1
        assert await ask(sup, failed.name, b"h1") == b"1"


@pytest.mark.anyio
async def test_with_every_thread_held_in_wasi_failed_components_answer_and_stop(runtime: Runtime) -> None:
    """Past the host-wide bound each component still takes one thread, the one it is failed for: enough of
    them hold every thread (5 here, on a pool of 2 threads lending at most 4, lowered from 256 through
    WorkerPool's max_lent: 1 + 5 held = 6). Then the messages queued to them were never answered, and
    neither their stop nor the supervisor's exit (the daemon's, on SIGTERM) ended: a cancelled call or chore
    that no thread had begun (the Store's close) waited for a thread to discard it (measured: 6 of 10
    messages answered after 20 s, the exit still waiting after 25 s). Its waiter drops it now."""
    async with plain_supervisor(runtime, THREADS, max_lent=LENT) as sup:
        sleepers = [ComponentId.parse(f"evil/wasiprobe/{i}") for i in range(5)]
        for sleeper in sleepers:
            await sup.start(sleeper_spec(sleeper), sup.stores.runtime.load(sleeper, fixture_path("wasiprobe")))
        actors = [sup.actors[sleeper] for sleeper in sleepers]
        naps = [asyncio.ensure_future(ask(sup, str(sleeper), HOUR, 3600.0)) for sleeper in sleepers for _ in range(2)]
        with anyio.fail_after(30.0):  # a guard: without the fix the queued messages are never answered
            results = await asyncio.gather(*naps, return_exceptions=True)
        # The first given up on restarted (1 held) and slept again; every other was failed, its second unhandled.
        assert sum("blocked in a WASI wait" in str(result) for result in results) == 6, results
        assert sum("failed before handling" in str(result) for result in results) == 4, results
        assert all(actor.state is ActorState.FAILED for actor in actors)
        assert sup.workers.held_threads == sup.workers.threads == sup.workers.max_threads  # every thread held
        await sup.stop_all(drain_timeout=0.2)
        await until(lambda: not any(actor.running for actor in sup.actors.values()), 30.0)  # a guard
