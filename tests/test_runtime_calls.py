"""Calling real guest components through the runtime: echo, per-instance state, guest errors and
traps, limits, host functions and logs."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest
import structlog

from tests.conftest import Starter, fixture_path
from tests.support import MemoryStorage, RecordingMessaging
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.errors import (
    CallInProgress,
    FuelExhausted,
    GuestExit,
    GuestFailure,
    GuestTimeout,
    GuestTrap,
    InstanceStateError,
    StorageError,
    WasmError,
)
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.metadata import HealthStatus
from wasmhost.runtime import capi
from wasmhost.runtime.host_fn import MAX_BROADCAST_TARGETS, HostContext
from wasmhost.runtime.id_converter import ComponentIdConverter
from wasmhost.runtime.runtime import Runtime

SENDER = ComponentId("test-org", "sender", "0")


def message(payload: bytes, sender: ComponentId = SENDER) -> ComponentMessage:
    return ComponentMessage(sender, payload, MessageMetadata(timestamp=Timestamp.now()))


def test_echo_returns_payloads_byte_exact(start: Starter) -> None:
    echo = start("echo", "test-org/echo/0.1.0")
    assert echo.handle_message(message(bytes([1, 2, 3]))) == bytes([1, 2, 3])
    assert echo.handle_message(message(b"")) == b""  # Some([]), not None
    big = os.urandom(1 << 20)
    assert echo.handle_message(message(big)) == big


def test_echo_metadata_and_health(start: Starter) -> None:
    echo = start("echo")
    meta = echo.metadata()
    assert meta.name == "echo"
    assert meta.version == "0.1.0"
    assert meta.supported_operations
    assert echo.health() is HealthStatus.HEALTHY
    echo.shutdown()


def test_a_stores_whole_life_leaves_nothing_for_the_cyclic_collector(start: Starter, runtime: Runtime) -> None:
    """A Store is freed as soon as it is closed: the daemon freezes its heap (system/heap.py), so a
    cycle among what a restart dropped would stay until the next reload."""
    start("echo", "test-org/echo/kept")  # one Store alive throughout, as in a daemon
    cid = ComponentId("test-org", "echo", "closed")
    loaded = runtime.load(cid, fixture_path("echo"))
    gc.collect()
    gc.disable()
    try:
        echo = runtime.store(loaded, cid, None, HostContext(cid))
        echo.instantiate()
        echo.initialize(ComponentConfig())
        assert echo.handle_message(message(b"x")) == b"x"
        echo.close()
        del echo
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_counter_state_is_per_instance_and_reset_by_initialize(start: Starter) -> None:
    first = start("counter", "test-org/counter/a")
    second = start("counter", "test-org/counter/b")  # same bytes, independent instance
    assert [first.handle_message(message(b"")) for _ in range(3)] == [b"1", b"2", b"3"]
    assert second.handle_message(message(b"")) == b"1"
    for _ in range(8):
        first.handle_message(message(b""))
    assert first.handle_message(message(b"")) == b"12"
    first.initialize(ComponentConfig())
    assert first.handle_message(message(b"")) == b"1"


def test_guest_error_maps_to_wasm_error(start: Starter) -> None:
    callback = start("callback", "test-org/callback/0", host=HostContext(SENDER, messaging=RecordingMessaging()))
    with pytest.raises(WasmError) as info:
        callback.handle_message(message(b"no separators here"))
    assert info.value == WasmError("runtime-error", "invalid payload format: expected namespace|name|instance|data")


def test_calls_before_instantiate_or_initialize_are_refused(runtime: Runtime, start: Starter) -> None:
    echo = start("echo", initialize=False)
    with pytest.raises(InstanceStateError, match="initialize"):
        echo.handle_message(message(b"x"))
    echo.close()
    with pytest.raises(InstanceStateError, match="not been instantiated"):
        echo.handle_message(message(b"x"))


def test_a_trap_kills_the_instance_until_it_is_instantiated_again(start: Starter) -> None:
    trapper = start("trapper", "test-org/trapper/0")
    with pytest.raises(GuestTrap) as info:
        trapper.handle_message(message(b"boom"))
    assert "unreachable" in str(info.value)
    assert "test-org/trapper/0" in str(info.value)
    with pytest.raises(InstanceStateError, match="poisoned"):
        trapper.handle_message(message(b"again"))
    trapper.instantiate()
    trapper.initialize(ComponentConfig())
    assert trapper.metadata().name == "trapper"


def test_a_trap_is_classified_by_wasmtimes_cause_not_by_the_names_in_its_backtrace(start: Starter) -> None:
    impostor = start("impostor")
    with pytest.raises(GuestFailure) as info:
        impostor.handle_message(message(b"x"))
    assert "wasm trap: interrupt" in str(info.value)  # its function name is in the backtrace ...
    assert type(info.value) is GuestTrap  # ... but it trapped on `unreachable`, which is what counts


@pytest.mark.parametrize(("status", "clean"), [(0, True), (3, False)])
def test_a_wasi_exit_carries_its_status(start: Starter, status: int, clean: bool) -> None:
    prober = start("prober")
    with pytest.raises(GuestExit) as info:
        prober.handle_message(message(b"exit %d" % status))
    assert info.value.clean is clean
    assert (info.value.status == 0) is clean  # WASI 0.2 reports a failing exit as status 1


def test_spinner_is_stopped_by_its_deadline_and_a_fresh_instance_works(runtime: Runtime, start: Starter) -> None:
    limit_ms = 100
    spinner = start("spinner", "test-org/spinner/0", limits=ResourceLimits(max_execution_time_ms=limit_ms))
    began = time.monotonic()
    with pytest.raises(GuestTimeout):
        spinner.handle_message(message(b"spin"))
    elapsed_ms = (time.monotonic() - began) * 1000
    tick = runtime.engine.tick_ms
    assert limit_ms <= elapsed_ms <= limit_ms + tick + 40, f"stopped after {elapsed_ms:.0f} ms"
    spinner.instantiate()
    spinner.initialize(ComponentConfig())
    assert spinner.metadata().name == "spinner"


def test_fuel_exhaustion_is_reported_as_such(start: Starter) -> None:
    spinner = start("spinner", "test-org/spinner/fuel", limits=ResourceLimits(max_fuel=2_000_000))
    with pytest.raises(FuelExhausted, match="ran out of fuel"):
        spinner.handle_message(message(b"spin"))


def test_fuel_is_refilled_before_every_call(start: Starter) -> None:
    busy = start("busy", "test-org/busy/0", limits=ResourceLimits(max_fuel=5_000_000))
    for _ in range(5):  # each call fits the budget; five in a row would not if fuel were per lifetime
        assert busy.handle_message(message(b"100000")) == b"100000"


@contextlib.contextmanager
def epoch_ticking_nonstop(runtime: Runtime) -> Iterator[None]:
    """Advance the engine's epoch from another thread as fast as it goes: what a loaded machine does
    to a guest now and then (a tick lands mid-call), done to nearly every call."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            runtime.engine.engine.increment_epoch()

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(timeout=10)


def test_a_call_suspended_at_epoch_ticks_keeps_its_whole_fuel_budget_and_exact_count(
    runtime: Runtime, start: Starter
) -> None:
    budget = 1_600_000  # busy's 100,000 iterations burn about 1.5M fuel
    busy = start("busy", "test-org/busy/ticked", limits=ResourceLimits(max_fuel=budget))
    counted = []
    with epoch_ticking_nonstop(runtime):
        for _ in range(40):
            before = busy.limiter.fuel_used
            assert busy.handle_message(message(b"100000")) == b"100000"  # no FuelExhausted
            counted.append(busy.limiter.fuel_used - before)
    assert len(set(counted)) == 1, counted  # the same work counts the same fuel, ticks or not
    assert counted[0] <= budget
    # nor do ticks give fuel: the same work with a little less than it needs runs out every time
    short = start("busy", "test-org/busy/short", limits=ResourceLimits(max_fuel=counted[0] - 1000))
    with epoch_ticking_nonstop(runtime):
        for _ in range(10):
            with pytest.raises(FuelExhausted):
                short.handle_message(message(b"100000"))
            short.instantiate()  # the trap poisoned the Store
            short.initialize(ComponentConfig())


def test_a_call_an_epoch_tick_cuts_as_it_begins_goes_on_in_the_same_turn(
    runtime: Runtime, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our slicing logic, with the tick placed by hand (between arming the call and its first poll)."""
    echo = start("echo", "test-org/echo/ticked")
    arm = echo.limiter.arm

    def arm_then_tick(*args: object) -> float:
        deadline = arm(*args)  # type: ignore[arg-type]
        runtime.engine.engine.increment_epoch()  # the guest yields at its first instruction
        return deadline

    monkeypatch.setattr(echo.limiter, "arm", arm_then_tick)
    steps = echo.handle_message_steps(message(b"cut short"))
    with pytest.raises(StopIteration) as ended:
        next(steps)  # ends in this turn: it does not go back to the queue behind every other call
    assert ended.value.value == b"cut short"


def test_a_guest_cut_by_ticks_nonstop_gives_its_thread_back_at_least_every_second_slice(
    runtime: Runtime, start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our slicing logic: polls are counted between the steps that hand the thread back."""
    busy = start("busy", "test-org/busy/cut")
    polls = [0]
    poll = capi.call_future_poll

    def counted(future: int) -> bool:
        polls[0] += 1
        return poll(future)

    monkeypatch.setattr(capi, "call_future_poll", counted)
    every_turn: list[int] = []
    with epoch_ticking_nonstop(runtime):
        for _ in range(200):  # until the ticks cut calls often enough to judge: a loaded machine may not run the ticker
            polls[0] = 0  # the polls after the last call's last turn are no turn of this one
            steps = busy.handle_message_steps(message(b"100000"))
            with pytest.raises(StopIteration) as ended:
                while True:
                    next(steps)
                    every_turn.append(polls[0])
                    polls[0] = 0
            assert ended.value.value == b"100000"
            if len(every_turn) > 20:
                break
    assert len(every_turn) > 20 and max(every_turn) <= 2  # a cut slice goes on once, never more


def test_health_is_refused_while_a_message_call_waits_between_its_slices(start: Starter) -> None:
    """A probe must not start a second call on the Store, nor end the suspended message's writes."""
    busy = start("busy", "test-org/busy/probed")
    steps = busy.handle_message_steps(message(b"300000000"))
    next(steps)  # one slice of it: suspended, not ended
    assert busy.in_call
    with pytest.raises(CallInProgress):
        next(busy.health_steps())
    with pytest.raises(StopIteration) as ended:
        while True:
            next(steps)
    assert ended.value.value == b"300000000" and busy.health() is HealthStatus.HEALTHY


def test_memory_hog_cannot_pass_its_cap(start: Starter) -> None:
    cap = 4 * 1024 * 1024
    hog = start("memhog", "test-org/memhog/0", limits=ResourceLimits(max_memory_bytes=cap))
    pages = int(hog.handle_message(message(b"grow")) or b"0")
    assert 1 <= pages <= cap // 65536


def test_guest_logs_arrive_in_structlog_with_the_component_id(start: Starter) -> None:
    logger = start("logger", "test-org/logger/0")
    with structlog.testing.capture_logs() as logs:
        assert logger.handle_message(message(b"hello from the guest")) is None
    guest = [entry for entry in logs if entry.get("guest")]
    assert guest == [
        {
            "event": "hello from the guest",
            "component": "test-org/logger/0",
            "guest": True,
            "guest_level": "info",
            "source": "logger",
            "size": "20",
            "log_level": "info",
        }
    ]


def test_storage_imports_reach_the_storage_port(start: Starter) -> None:
    storage = MemoryStorage(quota_bytes=64)
    guest = start("storage", "test-org/storage/0", host=HostContext(SENDER, storage=storage))
    owner = ComponentId.parse("test-org/storage/0")
    assert guest.handle_message(message(b"get missing")) is None
    assert guest.handle_message(message(b"set colour deep blue")) == b"ok"
    assert storage.data[owner] == {"colour": b"deep blue"}
    assert guest.handle_message(message(b"get colour")) == b"deep blue"
    assert guest.handle_message(message(b"has colour")) == b"true"
    assert guest.handle_message(message(b"set size 10")) == b"ok"
    assert guest.handle_message(message(b"keys")) == b"colour\nsize"
    assert guest.handle_message(message(b"keys co")) == b"colour"
    assert guest.handle_message(message(b"usage")) == b"21 64 2"
    assert guest.handle_message(message(b"del colour")) == b"ok"
    assert guest.handle_message(message(b"has colour")) == b"false"
    with pytest.raises(WasmError, match="storage error: quota-exceeded"):
        guest.handle_message(message(b"set big " + b"x" * 100))


def test_storage_errors_reach_the_guest_as_wit_errors(start: Starter) -> None:
    # get() returns result<option<list<u8>>, storage-error>: the err case wasmtime-py cannot lower.
    storage = MemoryStorage(fail_with=StorageError("io-error", "disk unplugged"))
    guest = start("storage", "test-org/storage/1", host=HostContext(SENDER, storage=storage))
    with pytest.raises(WasmError, match="storage error: io-error: disk unplugged"):
        guest.handle_message(message(b"get anything"))
    assert guest.metadata().name == "storage"  # a host-side failure does not poison the Store


def test_a_host_bug_becomes_an_error_value_not_a_trap(start: Starter) -> None:
    class Broken(MemoryStorage):
        def get(self, owner: ComponentId, key: str) -> bytes | None:
            raise RuntimeError("bug in the host")

    guest = start("storage", "test-org/storage/2", host=HostContext(SENDER, storage=Broken()))
    with pytest.raises(WasmError, match="storage error: io-error: host error: RuntimeError: bug in the host"):
        guest.handle_message(message(b"get k"))
    assert guest.handle_message(message(b"set k v")) == b"ok"


def test_request_import_returns_the_correlation_id(start: Starter) -> None:
    messaging = RecordingMessaging(known={ComponentId.parse("test-org/echo/0.1.0")})
    callback = start("callback", "test-org/callback/1", host=HostContext(SENDER, messaging=messaging))
    reply = callback.handle_message(message(b"test-org|echo|0.1.0|ping|pong"))
    assert reply == b"corr-1"
    assert messaging.requests == [
        (ComponentId.parse("test-org/callback/1"), ComponentId.parse("test-org/echo/0.1.0"), b"ping|pong", 5000)
    ]
    with pytest.raises(WasmError, match="request failed: target-not-found"):
        callback.handle_message(message(b"test-org|nobody|0|data"))


def test_callback_receives_handle_callback_messages(start: Starter) -> None:
    callback = start("callback", "test-org/callback/2", host=HostContext(SENDER, messaging=RecordingMessaging()))
    responder = ComponentId.parse("test-org/echo/0.1.0")
    reply = ComponentMessage(
        responder, b"the answer",
        MessageMetadata(timestamp=Timestamp.now(), correlation_id="corr-9", content_type="text/plain"),
    )
    callback.handle_callback(reply)
    assert callback.handle_message(message(b"?last-payload")) == b"the answer"
    assert callback.handle_message(message(b"?last-correlation")) == b"corr-9"
    assert callback.handle_message(message(b"?last-content-type")) == b"text/plain"
    assert callback.handle_message(message(b"?last-sender")) == b"test-org/echo/0.1.0"
    assert callback.handle_message(message(b"?callbacks")) == b"1"


def test_services_answer_the_guest(start: Starter) -> None:
    guest = start("services", "test-org/services/0")
    assert guest.handle_message(message(b"self")) == b"test-org/services/0"
    before = time.time_ns() // 1_000_000
    millis = int(guest.handle_message(message(b"time")) or b"0")
    assert before <= millis <= time.time_ns() // 1_000_000
    seconds, nanos = (guest.handle_message(message(b"clock")) or b"").split(b".")
    assert abs(int(seconds) - time.time()) < 5 and 0 <= int(nanos) < 10**9
    assert guest.handle_message(message(b"list")) == b"test-org/services/0"  # no directory: just itself


def test_sleep_is_bounded_by_the_calls_deadline(runtime: Runtime, start: Starter) -> None:
    guest = start("services", "test-org/services/1", limits=ResourceLimits(max_execution_time_ms=150))
    began = time.monotonic()
    assert guest.handle_message(message(b"sleep 30")) == b"slept"
    assert time.monotonic() - began >= 0.03
    began = time.monotonic()
    # A sleep past the deadline ends at the deadline; a guest that keeps computing then is interrupted.
    with contextlib.suppress(GuestTimeout):
        guest.handle_message(message(b"sleep 60000"))
    assert time.monotonic() - began <= 0.15 + runtime.engine.tick_ms / 1000 + 0.05


def test_guest_logs_carry_the_correlation_id_of_the_message(start: Starter) -> None:
    logger = start("logger", "test-org/logger/1")
    request = ComponentMessage(SENDER, b"traced", MessageMetadata(timestamp=Timestamp.now(), correlation_id="c-7"))
    with structlog.testing.capture_logs() as logs:
        logger.handle_message(request)
    assert [e.get("correlation_id") for e in logs if e.get("guest")] == ["c-7"]


def test_a_broadcast_naming_too_many_targets_is_refused_before_its_list_is_converted(
        start: Starter, monkeypatch: pytest.MonkeyPatch) -> None:
    # 24 bytes of linear memory per target: 600,000 of them took the host 0.9 s of Python to convert
    # (4.7 s when the ids were invalid), all before the host function could look at the list.
    target = ComponentId("t", "t", "t")
    messaging = RecordingMessaging(known={target})
    guest = start("fanout", "test-org/fanout/0", host=HostContext(SENDER, messaging=messaging))
    assert guest.handle_message(message(b"b3")) is None
    assert [sent[1] for sent in messaging.sent] == [target] * 3
    lifted: list[int] = []
    real_lift = ComponentIdConverter.lift
    monkeypatch.setattr(ComponentIdConverter, "lift", lambda self, addr: lifted.append(addr) or real_lift(self, addr))
    too_many = MAX_BROADCAST_TARGETS + 1
    with pytest.raises(WasmError, match=f"runtime-error: broadcast to {too_many} targets: "
                                        f"at most {MAX_BROADCAST_TARGETS} in one call"):
        guest.handle_message(message(f"b{too_many}".encode()))
    assert lifted == [] and len(messaging.sent) == 3
    assert guest.handle_message(message(f"b{MAX_BROADCAST_TARGETS}".encode())) is None  # the limit itself is fine
    assert len(messaging.sent) == 3 + MAX_BROADCAST_TARGETS


def test_a_guests_error_text_is_bounded_where_it_enters_the_host(start: Starter) -> None:
    # Its own words, as a trap's backtrace is: 20 MB of them went whole into a requester's outcome callback.
    guest = start("fanout", "test-org/fanout/2")
    with pytest.raises(WasmError) as info:
        guest.handle_message(message(b"e2000000"))
    assert info.value.case == "runtime-error"
    assert info.value.payload == "e" * 512 + f"... ({2_000_000 - 512} characters cut)"
    with pytest.raises(WasmError) as short:
        guest.handle_message(message(b"e12"))
    assert short.value.payload == "e" * 12
