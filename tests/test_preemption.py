"""Preemption: guest calls are time-sliced over a bounded set of worker threads, so busy guests
beyond the thread count never stall an idle neighbour, and runaways still end at their deadline."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import math
import os
import socket
import struct
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import TypeVar

import pytest
import structlog.testing

from tests.conftest import Starter, fixture_path
from tests.support import plain_supervisor
from tests.test_actors import ask
from tests.waits import until
from wasmhost.actors import workers as workers_module
from wasmhost.actors.restart import RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId, ComponentMessage, MessageMetadata, Timestamp, affinity, blocking
from wasmhost.core.errors import GuestTimeout
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import InstanceState, run_to_end
from wasmhost.system.log_writer import LogSink

pytestmark = pytest.mark.anyio

THREADS = 2
SPINNERS = 5  # more busy guests than threads
T = TypeVar("T")


@pytest.fixture
async def small_pool(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime, THREADS) as sup:
        yield sup


def message(payload: bytes) -> ComponentMessage:
    return ComponentMessage(ComponentId("test-org", "sender", "0"), payload, MessageMetadata(timestamp=Timestamp.now()))


def fnv_loop(n: int) -> int:
    """What the hasher guest computes, in Python."""
    acc = 1469598103934665603
    for i in range(n):
        acc = ((acc ^ i) * 1099511628211) & 0xFFFF_FFFF_FFFF_FFFF
    return acc


@pytest.mark.parametrize(
    ("fixture", "work"),
    [("spinner", b"spin"), ("logflood", b"1000000000")],  # a loop of wasm; a loop of (rate-limited) host calls
    ids=["spinning", "calling-host-functions"],
)
async def test_echo_answers_while_more_busy_guests_than_threads_run(
    small_pool: Supervisor, fixture: str, work: bytes
) -> None:
    """Guests are sliced by fuel and by epoch ticks (time spent in host functions burns no fuel), so
    busy guests beyond the thread count never keep a neighbour waiting for a deadline."""
    sup = small_pool
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
    spinners = []
    for i in range(SPINNERS):
        cid = ComponentId("test-org", "spinner", str(i))
        spec = ActorSpec(cid, limits=ResourceLimits(max_execution_time_ms=3000), restart=RestartPolicy.TEMPORARY)
        spinners.append(await sup.start(spec, sup.stores.runtime.load(cid, fixture_path(fixture))))

    async def spin(cid: ComponentId) -> str:
        try:
            await sup.router.host_request(cid, work, 30.0)
        except RequestFailed as exc:
            return str(exc)
        return "answered"

    calls = [asyncio.ensure_future(spin(actor.component_id)) for actor in spinners]
    await until(lambda: all(actor.manager.in_call for actor in spinners))
    # Every spinner is inside its call; with one thread each, the echo would wait for a deadline.
    for i in range(20):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i) == b"ping %d" % i
    assert not any(call.done() for call in calls), "the echo should answer while every spinner still runs"
    assert all(actor.manager.in_call for actor in spinners)
    assert sup.workers.threads == THREADS
    outcomes = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert all("timed out" in outcome for outcome in outcomes), outcomes
    for actor in spinners:
        await until(lambda a=actor: a.state is ActorState.STOPPED or a.state is ActorState.FAILED)  # type: ignore[misc]
        assert "timed out" in (actor.stats.last_error or "")
    assert await ask(sup, "test-org/echo/0", b"after") == b"after"
    assert sup.workers.threads == THREADS


async def test_a_long_computation_gives_the_same_result_sliced(runtime: Runtime, start: Starter) -> None:
    n = 2_000_000
    expected = str(fnv_loop(n)).encode()
    hasher = start("hasher", "test-org/hasher/a", ResourceLimits(max_execution_time_ms=60_000))
    steps = hasher.handle_message_steps(message(b"%d" % n))
    slices = 0
    with contextlib.suppress(StopIteration):
        while True:
            next(steps)
            slices += 1
    assert slices > 5, "the computation should have been cut into slices"
    assert hasher.handle_message(message(b"%d" % n)) == expected
    # Interleaved with another hasher on one thread, slice by slice: still the same answer each.
    other = start("hasher", "test-org/hasher/b", ResourceLimits(max_execution_time_ms=60_000))
    workers = WorkerPool(1)
    try:
        results = await asyncio.gather(
            workers.run_steps(hasher.handle_message_steps(message(b"%d" % n)), hasher.lock),
            workers.run_steps(other.handle_message_steps(message(b"%d" % n)), other.lock),
        )
    finally:
        workers.close()
    assert results == [expected, expected]
    assert run_to_end(hasher.handle_message_steps(message(b"7"))) == str(fnv_loop(7)).encode()


async def test_a_cancelled_waiter_leaves_no_call_in_the_store(start: Starter) -> None:
    spinner = start("spinner", "test-org/spinner/0", ResourceLimits(max_execution_time_ms=30_000))
    echo = start("echo", "test-org/echo/0")
    workers = WorkerPool(1)
    try:
        call = asyncio.ensure_future(workers.run_steps(spinner.handle_message_steps(message(b"spin")), spinner.lock))
        await until(lambda: spinner.in_call)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: not spinner.in_call)  # abandoned at once, not at its 30 s deadline
        assert spinner.state is InstanceState.DEAD
        # The one thread is free again for others.
        assert await workers.run_steps(echo.handle_message_steps(message(b"hi")), echo.lock) == b"hi"
    finally:
        workers.close()


async def test_a_deadline_that_passes_while_waiting_for_a_thread_is_a_timeout(start: Starter) -> None:
    spinners = [start("spinner", f"test-org/spinner/{i}", ResourceLimits(max_execution_time_ms=300))
                for i in range(3)]
    workers = WorkerPool(1)
    try:
        results = await asyncio.gather(
            *(workers.run_steps(s.handle_message_steps(message(b"spin")), s.lock) for s in spinners),
            return_exceptions=True,
        )
    finally:
        workers.close()
    assert all(isinstance(result, GuestTimeout) for result in results), results
    assert all(s.state is InstanceState.DEAD and not s.in_call for s in spinners)


async def test_echo_answers_while_more_guests_than_threads_sleep_in_a_host_call(small_pool: Supervisor) -> None:
    """A guest waiting in sleep-millis holds no thread (its call is suspended and set aside until it wakes),
    so sleepers beyond the thread count do not stall a neighbour, and no thread is lent for them."""
    sup = small_pool
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
    sleepers = []
    for i in range(SPINNERS):
        cid = ComponentId("test-org", "sleeper", str(i))
        spec = ActorSpec(cid, limits=ResourceLimits(max_execution_time_ms=20_000))
        sleepers.append(await sup.start(spec, sup.stores.runtime.load(cid, fixture_path("services"))))
    naps = [asyncio.ensure_future(ask(sup, str(actor.component_id), b"sleep 4000", 30.0)) for actor in sleepers]
    await until(lambda: all(actor.manager.in_call for actor in sleepers))
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i) == b"ping %d" % i
    assert not any(nap.done() for nap in naps), "the echo answered while every sleeper still slept"
    assert sup.workers.asleep == SPINNERS and sup.workers.threads == THREADS
    assert await asyncio.gather(*naps) == [b"slept"] * SPINNERS
    assert sup.workers.asleep == 0 and sup.workers.threads == THREADS


async def test_echo_answers_while_a_guest_instantiates_forever(small_pool: Supervisor) -> None:
    """A core module's start function runs inside instantiate, one step that cannot be sliced; before,
    it kept every other guest waiting until its deadline (30 s by default, again at every restart).
    A step that runs LONG_STEP_S counts as computing, so the echo gets a thread of its own."""
    sup = small_pool
    echo = ComponentId.parse("test-org/echo/0")
    await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
    hog = ComponentId.parse("test-org/startloop/0")
    spec = ActorSpec(hog, limits=ResourceLimits(max_execution_time_ms=3000), restart=RestartPolicy.TEMPORARY)
    starting = asyncio.ensure_future(sup.start(spec, sup.stores.runtime.load(hog, fixture_path("startloop"))))
    await until(lambda: hog in sup.actors and sup.actors[hog].phase == "instantiating" and sup.workers.busy > 0)
    for i in range(5):
        assert await ask(sup, "test-org/echo/0", b"ping %d" % i, timeout=2.0) == b"ping %d" % i
    assert not starting.done(), "the echo should answer while the start function still loops"
    await asyncio.wait_for(starting, 30)
    assert "instantiation failed" in (sup.actors[hog].stats.last_error or "")  # ended by its deadline
    assert sup.actors[hog].stats.last_error.endswith("wasm trap: interrupt")  # type: ignore[union-attr]


def queued_bytes(read_end: int) -> int:
    return struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0]  # type: ignore[no-any-return]


async def test_echo_answers_while_a_guests_stdout_write_blocks(small_pool: Supervisor) -> None:
    """A `wasi = true` guest writes its stdout from inside wasmtime: when nobody reads the daemon's stdout
    (a stalled journald), the write blocks in one step. It keeps its thread, but no longer the others'."""
    sup = small_pool
    read_end, write_end = os.pipe()
    saved = os.dup(1)
    os.dup2(write_end, 1)
    try:
        echo = ComponentId.parse("test-org/echo/0")
        await sup.start(ActorSpec(echo), sup.stores.runtime.load(echo, fixture_path("echo")))
        flood = ComponentId.parse("test-org/stdoutflood/0")
        spec = ActorSpec(flood, wasi=True, restart=RestartPolicy.TEMPORARY)
        await sup.start(spec, sup.stores.runtime.load(flood, fixture_path("stdoutflood")))
        call = asyncio.ensure_future(ask(sup, str(flood), b"1000", timeout=60.0))
        capacity = fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ)
        await until(lambda: queued_bytes(read_end) >= capacity)  # full: the guest's next write blocks
        for i in range(5):
            assert await ask(sup, "test-org/echo/0", b"ping %d" % i, timeout=2.0) == b"ping %d" % i
        assert not call.done(), "the echo should answer while the flood's write is blocked"
        os.set_blocking(read_end, False)
        while not call.done():  # read what it writes until its call ends
            with contextlib.suppress(BlockingIOError):
                os.read(read_end, 1 << 20)
            await asyncio.sleep(0.005)
        assert await call == b"1000"
    finally:
        os.dup2(saved, 1)
        for fd in (saved, read_end, write_end):
            os.close(fd)


class ComputingHook:
    """Records what a guest call's steps tell their scheduler (stands in for WorkerPool's hook)."""

    def __init__(self) -> None:
        self.computing_slices = 0

    def enter_blocking(self) -> None:
        """Not recorded."""

    def leave_blocking(self) -> None:
        """Not recorded."""

    def computing(self) -> None:
        """Count a slice that was spent in guest code."""
        self.computing_slices += 1


@pytest.mark.parametrize(
    ("fixture", "work", "computes"),
    [("hasher", b"3000000", True), ("logflood", b"1000000000", False), ("echo", b"hi", False)],
    ids=["wasm-loop", "host-call-loop", "short-call"],
)
def test_only_slices_spent_in_guest_code_count_as_computing(
    start: Starter, fixture: str, work: bytes, computes: bool
) -> None:
    """A loop of wasm says it computes (other threads may then run beside it); a guest looping
    over host functions, which yields at epoch ticks after little guest code, and a short call do not."""
    guest = start(fixture, f"test-org/{fixture}/0", ResourceLimits(max_execution_time_ms=400))
    hook = ComputingHook()
    blocking.install(hook)
    slices = 0
    try:
        steps = guest.handle_message_steps(message(work))
        with contextlib.suppress(StopIteration, GuestTimeout):
            while True:
                next(steps)
                slices += 1
    finally:
        blocking.install(None)
    if computes:
        assert slices > 5 and hook.computing_slices > slices // 2  # those ended by an epoch tick may not
    else:
        assert hook.computing_slices == 0
        assert slices > 5 or fixture == "echo", "the host-call loop should have been cut at epoch ticks"


async def test_workers_and_the_event_loop_stay_home_unless_a_guest_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our placement logic, with plain functions standing in for guest steps (threads and cores real)."""
    monkeypatch.setattr(workers_module, "CALM_S", 0.0)  # home again at the first job after a computing one
    loop_thread = threading.get_native_id()
    affinity.anchor()
    workers = WorkerPool(1, concurrency=2)
    home = set(affinity.home() or affinity.ALL_CORES)  # one core: nothing to choose, every thread stays put
    everywhere = set(affinity.ALL_CORES)

    def cores(computes: bool) -> tuple[set[int], set[int]]:
        if computes:
            blocking.computing()
        return os.sched_getaffinity(0), os.sched_getaffinity(loop_thread)

    try:
        assert await workers.run(functools.partial(cores, False)) == (home, home)
        assert await workers.run(functools.partial(cores, True)) == (everywhere, everywhere)
        assert await workers.run(functools.partial(cores, False)) == (home, home)  # the same threads, back home
    finally:
        workers.close()
        affinity.leave_home()
    assert os.sched_getaffinity(0) == everywhere


async def test_a_log_writer_goes_where_the_event_loop_goes() -> None:
    """Our placement logic: each logged line wakes the writer, so it stays on the home core with the
    event loop, spreads out with it while a guest computes, and is forgotten when it ends."""
    home = set(affinity.home() or affinity.ALL_CORES)
    everywhere = set(affinity.ALL_CORES)
    sink = LogSink("test", os.open(os.devnull, os.O_WRONLY))
    writer = sink._thread.native_id
    assert writer is not None
    try:
        sink.put(b"a line\n")
        await until(lambda: writer in affinity._anchored)
        assert os.sched_getaffinity(writer) == home
        affinity.spread(True)
        assert os.sched_getaffinity(writer) == everywhere
        affinity.spread(False)
        assert os.sched_getaffinity(writer) == home
    finally:
        assert sink.close(time.monotonic() + 5)
        os.close(sink.fd)
        affinity.leave_home()
    assert writer not in affinity._anchored


async def test_a_system_that_refuses_placement_leaves_threads_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our fallback logic: the refusal is simulated (a stand-in for sched_setaffinity), the pool is real."""
    calls: list[frozenset[int]] = []

    def refuse(pid: int, cores: frozenset[int]) -> None:
        calls.append(cores)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(affinity, "_home", frozenset({0}))
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    affinity.stay_home()
    assert affinity.home() == frozenset() and len(calls) == 1  # given up after the first refusal
    workers = WorkerPool(1)
    try:
        assert await workers.run(lambda: "ran") == "ran"
        affinity.roam()
    finally:
        workers.close()
    assert len(calls) == 1


@pytest.fixture
def own_claim_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims under names of this test alone: daemons and test workers running beside it on this
    machine hold the real names, and would change which rank is free."""
    monkeypatch.setattr(affinity, "CLAIM_NAMES", f"wasmhost-test-{os.getpid()}/home-core")


def _hold_home_names(ranks: int) -> list[socket.socket]:
    """Stand-ins for other processes: sockets bound to the first `ranks` home-core names of every core."""
    holders = []
    for core in sorted(affinity.ALL_CORES):
        for rank in range(ranks):
            holder = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            holder.bind(f"\0{affinity.CLAIM_NAMES}/{core}/{rank}")
            holders.append(holder)
    return holders


@pytest.mark.skipif(len(affinity.ALL_CORES) < 2, reason="one core: there is no home to choose")
@pytest.mark.usefixtures("own_claim_names")
def test_when_every_core_is_held_the_least_held_one_is_taken() -> None:
    """Every core held once (here by stand-ins bound by the test, real abstract socket names): the
    next process to choose holds a core as its second holder."""
    affinity.leave_home()
    stand_ins = _hold_home_names(ranks=1)
    try:
        (core,) = affinity.home()
        assert affinity._claimed is not None
        assert affinity._claimed.getsockname() == f"\0{affinity.CLAIM_NAMES}/{core}/1".encode()
    finally:
        affinity.leave_home()
        for holder in stand_ins:
            holder.close()
    assert affinity._claimed is None


def _home_claims_held_here() -> int:
    """How many home-core names sockets of this process hold (Linux: /proc/net/unix and our fds)."""
    ours = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}
    return sum(1 for line in Path("/proc/net/unix").read_text().splitlines()[1:]
               if f"@{affinity.CLAIM_NAMES}/" in line and f"socket:[{line.split()[6]}]" in ours)


def test_threads_asking_at_once_get_one_home_and_hold_one_claim() -> None:
    """The first threads of a daemon (workers, the log writer, the event loop) may ask at the same
    moment: they must agree on one core, and the process must hold one name, given up on leaving."""
    affinity.leave_home()
    start = threading.Barrier(8)
    chosen: list[frozenset[int]] = []

    def ask() -> None:
        start.wait(5)
        chosen.append(affinity.home())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    try:
        assert len(chosen) == 8 and len(set(chosen)) == 1, chosen
        assert _home_claims_held_here() == (1 if len(affinity.ALL_CORES) > 1 else 0)
    finally:
        affinity.leave_home()
    assert _home_claims_held_here() == 0


@pytest.mark.skipif(len(affinity.ALL_CORES) < 2, reason="one core: there is no home to choose")
@pytest.mark.usefixtures("own_claim_names")
def test_a_process_squatting_every_name_cannot_keep_a_daemon_from_choosing_a_home() -> None:
    """A hostile local process holding every home-core name up to the bound (MAX_CLAIMS_PER_CORE per
    core, here the test's own stand-ins): the choice stays bounded and falls back to the caller's core."""
    affinity.leave_home()
    squatters = _hold_home_names(ranks=affinity.MAX_CLAIMS_PER_CORE)
    try:
        (core,) = affinity.home()
        assert core in affinity.ALL_CORES and affinity._claimed is None
    finally:
        affinity.leave_home()
        for squatter in squatters:
            squatter.close()


@pytest.mark.skipif(len(affinity.ALL_CORES) < 2, reason="one core: there is no home to choose")
def test_a_refused_placement_gives_the_claimed_core_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our fallback logic (the refusal is a stand-in for sched_setaffinity): a process that cannot keep
    to its home core no longer holds it, so other daemons may take it."""
    def refuse(pid: int, cores: frozenset[int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    affinity.leave_home()
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    try:
        affinity.stay_home()  # chooses and claims a home, then is refused
        assert affinity.home() == frozenset() and _home_claims_held_here() == 0
    finally:
        affinity.leave_home()


@pytest.mark.parametrize("move", [affinity.leave_home, affinity.roam], ids=["leave home", "roam"])
def test_leaving_or_roaming_without_a_home_claims_nothing(monkeypatch: pytest.MonkeyPatch,
                                                         move: Callable[[], None]) -> None:
    """Our logic (the claim is a stand-in that records): leaving home, or roaming (a log writer ending
    after its process left home), chooses no home on its way."""
    claims: list[tuple[int, int]] = []
    affinity.leave_home()
    monkeypatch.setattr(affinity, "_claim", lambda core, rank: bool(claims.append((core, rank))) or True)
    move()
    assert claims == [] and affinity._home is None


def test_without_abstract_socket_names_a_process_chooses_its_home_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our fallback logic: the missing names are simulated (a stand-in for the claim)."""
    def unavailable(core: int, rank: int) -> bool:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(affinity, "_home", None)
    monkeypatch.setattr(affinity, "_claim", unavailable)
    with structlog.testing.capture_logs() as logs:
        chosen = affinity.home()
    if len(affinity.ALL_CORES) > 1:
        assert len(chosen) == 1 and chosen <= affinity.ALL_CORES
        assert [entry["event"] for entry in logs] == ["home_core_claim_unavailable"]
    else:
        assert chosen == frozenset() and not logs


def one_step(fn: Callable[[], T]) -> Generator[float, None, T]:
    """A guest call of one step, `fn` standing in for its guest code (`WorkerPool.run` is for chores,
    which run no guest code and are not held to the one-thread rule)."""
    return fn()
    yield math.inf  # never reached: it only makes this a generator, as a call's steps are


async def test_one_thread_runs_guest_code_unless_a_guest_computes_and_waits_in_host_calls_do_not_count() -> None:
    """Our scheduling logic, with plain functions standing in for guest steps (threads and waits real)."""
    workers = WorkerPool(4, concurrency=2)
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    go = {name: threading.Event() for name in "abcde"}
    said_computing = threading.Event()

    def job(name: str, waits_for: str | None = None, computes: bool = False, bound: float = 0.5) -> str:
        started[name] = time.monotonic()
        go[name].set()
        if computes:
            blocking.computing()
            said_computing.set()
        if waits_for is not None:  # a bounded wait that ends at once if `waits_for` starts beside it
            go[waits_for].wait(bound)
        ended[name] = time.monotonic()
        return name

    def run(*args: object, **kwargs: object) -> asyncio.Future[str]:
        return asyncio.ensure_future(workers.run_steps(one_step(functools.partial(job, *args, **kwargs))))  # type: ignore[arg-type]

    try:
        # Neither computes: b waits for a place though threads are idle, so a waits out its bound (one
        # shorter than a long step, which counts as computing: see the test of a guest that instantiates forever).
        short = workers_module.LONG_STEP_S / 2
        assert await asyncio.gather(run("a", waits_for="b", bound=short), run("b")) == ["a", "b"]
        assert started["b"] >= ended["a"]
        # c computes: d joins it (c's wait for d ends at once), and e waits (2 places: one per core).
        c = run("c", waits_for="d", computes=True, bound=10)
        await until(said_computing.is_set)
        assert await asyncio.gather(c, run("d", waits_for="e"), run("e")) == ["c", "d", "e"]
        assert started["d"] < ended["c"] and ended["c"] - started["c"] < 5
        assert started["e"] >= min(ended["c"], ended["d"])

        # A thread waiting in a host call (a blocking section) leaves its place to another job.
        waiting, done = threading.Event(), threading.Event()

        def sleeper() -> None:
            with blocking.blocking():
                waiting.set()
                assert done.wait(10), "never woken"

        one = WorkerPool(2, concurrency=1)
        try:
            asleep = asyncio.ensure_future(one.run_steps(one_step(sleeper)))
            await until(waiting.is_set)
            beside = one.run_steps(one_step(lambda: "ran beside the sleeper"))
            assert await asyncio.wait_for(beside, 10) == "ran beside the sleeper"
            done.set()
            await asleep
        finally:
            one.close()
    finally:
        workers.close()
