"""StoreManager: one wasmtime Store per component instance and typed calls into its lifecycle exports."""

from __future__ import annotations

import ctypes
import enum
import functools
import threading
import time
from collections.abc import Generator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import wasmtime
from wasmtime import component as wc

from wasmhost.core import blocking
from wasmhost.core.blocking import Asleep
from wasmhost.core.bounded_text import bounded
from wasmhost.core.errors import (
    CallInProgress,
    ComponentError,
    FuelExhausted,
    GuestExit,
    GuestFailure,
    GuestTimeout,
    GuestTrap,
    InstanceStateError,
    InstantiationError,
    WasmError,
)
from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.messages import ComponentMessage
from wasmhost.core.metadata import ComponentConfig, ComponentMetadata, HealthStatus
from wasmhost.runtime import capi
from wasmhost.runtime.capi import VAL_SIZE
from wasmhost.runtime.codec import Err, ResultConverter
from wasmhost.runtime.host_fn import HostContext, register_context, unregister_context
from wasmhost.runtime.limiter import FIRST_SLICE_FUEL, SLICE_FUEL, Limiter
from wasmhost.runtime.linear_memory import LinearMemories, MemoryAccount
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.lowered_configs import LOWERED_CONFIGS, config_value
from wasmhost.runtime.message_arg import message_argument

T = TypeVar("T")
Steps = Generator[float, None, T]
"""A guest call run one slice per step; each step yields the monotonic deadline of the call (as Asleep
while the call is suspended in a sleep: see blocking.Asleep)."""


def run_to_end(steps: Steps[T]) -> T:
    """Run every step of `steps` on this thread and return its result (waiting on this thread while the
    guest sleeps: see holding_the_store)."""
    held = holding_the_store(steps)
    try:
        while True:
            next(held)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def holding_the_store(steps: Steps[T]) -> Steps[T]:
    """`steps`, each sleep of its guest waited out on the stepping thread (a blocking section, ended early
    by an interrupt) instead of yielded as Asleep: for a call made outside its actor's task (a health probe),
    which must keep the Store's lock while its guest sleeps. Set aside, it let go of the lock, and the
    actor's next message began its call on a Store with a call in progress: that message failed and the
    component restarted. Closing it closes `steps` (abandoning the call in progress)."""
    try:
        while True:
            try:
                step = next(steps)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            if isinstance(step, Asleep):
                step.sleeper.wait_out(step.until)
            else:
                yield step
    finally:
        steps.close()


class InstanceState(enum.Enum):
    """Where a StoreManager is in its life."""

    EMPTY = "empty"  # no Store yet, or closed
    INSTANTIATED = "instantiated"
    INITIALIZED = "initialized"
    DEAD = "dead"  # a trap poisoned the Store: instantiate again


TRAP_CAUSES: dict[str, type[GuestFailure]] = {
    "wasm trap: interrupt": GuestTimeout,
    "wasm trap: all fuel consumed by WebAssembly": FuelExhausted,
}
"""wasmtime's own words for the traps that are not plain traps, as the last line of its error."""


def trap_cause(message: str) -> str:
    """The last line of wasmtime's error text: its cause, after the guest's backtrace (whose function
    names the guest chooses, so they are never searched)."""
    lines = message.strip().splitlines()
    return lines[-1].strip() if lines else ""


def hit_size_guard(failure: GuestFailure) -> bool:
    """Whether wasmtime trapped the guest for copying too much data through one call (its cause
    line, never the guest-named backtrace)."""
    return trap_cause(failure.detail).startswith("too much data is being copied")


def classify_error(component: str, function: str, error: int) -> GuestFailure:
    """Turn a wasmtime_error_t* from a call into an exit (WASI exit, with its status), a timeout,
    fuel exhaustion or a plain trap; frees the error.

    wasmtime's C API has no trap code for a component call's error (only for core traps), so the
    kind comes from the cause wasmtime writes last, compared whole; the exit status is structured.
    """
    status = ctypes.c_int(0)
    exited = capi.error_exit_status(error, ctypes.addressof(status))
    message = bounded(capi.take_error(error))  # the backtrace names functions as the guest chose
    if exited:
        return GuestExit(component, function, message, status.value)
    return TRAP_CAUSES.get(trap_cause(message), GuestTrap)(component, function, message)


E = TypeVar("E", WasmError, ComponentError)


def guest_error(kind: type[E], value: tuple[str, Any]) -> E:
    """The error value a guest returned, its text bounded like a trap's (bounded_text): the guest chooses
    it, and it becomes the outcome a requester is handed. A 20 MB runtime-error went whole into the
    requester's outcome callback, past its max_message_bytes, and took the daemon to 2.7 GB converting
    it; a 50 MB one made `wasmhost call` fail on the size of the frame instead of showing the error."""
    case, payload = value
    return kind(case, bounded(payload) if isinstance(payload, str) else payload)


TEXT_BYTES_PER_LIST_BYTE = 40
"""A guest's error text costs the host about 4 bytes of memory a character to convert (wasmtime's string, the
C API's copy, the Python str: a 20 MB runtime-error, 76 MiB), a `list<u8>` about 160 a byte: what a text
counts for in HostContext.produced, in list bytes."""


FUNC_SIZE = ctypes.sizeof(capi.FUNC)


@functools.cache
def _func_slot_type(count: int) -> type[ctypes.Array[Any]]:
    return capi.FUNC * count  # type: ignore[no-any-return]


def _func_slots(count: int) -> ctypes.Array[Any]:
    """Room for `count` wasmtime_component_func_t (the array type is made once per count)."""
    return _func_slot_type(count)()


def wasi_config(stdio: bool) -> wasmtime.WasiConfig:
    """WASI for one Store: no files, environment, arguments or network; with `stdio`, the guest's
    stdout and stderr go to the daemon's (a fresh config each time: a Store consumes it)."""
    config = wasmtime.WasiConfig()
    if stdio:
        config.inherit_stdout()
        config.inherit_stderr()
    return config


class StoreManager:
    """Owns one Store and instance of a component; used by one thread at a time."""

    def __init__(
        self,
        loaded: LoadedComponent,
        component_id: ComponentId,
        limits: ResourceLimits,
        linker: wc.Linker,
        engine: wasmtime.Engine,
        tick_ms: int,
        host: HostContext | None = None,
        wasi_stdio: bool = False,
        memories: LinearMemories | None = None,
    ) -> None:
        self.loaded = loaded
        self.component_id = component_id
        self.name = str(component_id)
        self.limits = limits
        self.tick_ms = tick_ms
        self.limiter = Limiter(limits, tick_ms, loaded.footprint, self.name)
        self.linker = linker
        self.engine = engine
        self.host = host or HostContext(component_id)
        self.wasi_stdio = wasi_stdio
        self._memories = memories
        self.memory = MemoryAccount() if memories is not None else None
        """The linear-memory bytes of this component's instances, now and at their highest (None
        unless the engine accounts memory: `[host] memory_accounting`)."""
        self.state = InstanceState.EMPTY
        self.store: wasmtime.Store | None = None
        self.context = 0
        self._poisoned: wasmtime.Store | None = None  # a Store a failed call left, until free_poisoned
        self._freeing = threading.Lock()
        # One slot per lifecycle export, filled by each instantiation (through the C API: see capi.FUNC).
        specs = list(loaded.exports.values())
        self._func_slots = _func_slots(len(specs))
        base = ctypes.addressof(self._func_slots)
        self._export_slots = [(spec.index_address, base + i * FUNC_SIZE) for i, spec in enumerate(specs)]
        self._slot_addresses = {spec.name: base + i * FUNC_SIZE for i, spec in enumerate(specs)}
        self._func_addresses: dict[str, int] = {}  # the slots while an instance exists
        self._result = (ctypes.c_uint8 * VAL_SIZE)()
        self._result_address = ctypes.addressof(self._result)
        self._error = (ctypes.c_void_p * 1)()  # the error_ret slot of async calls
        self._error_address = ctypes.addressof(self._error)
        self._future = 0  # the call future in progress, if any
        self.calling = ""
        """The export the last call started (the one in progress, while `in_call`)."""
        self._poll_began = 0.0  # perf_counter when the last poll of that call began
        self.failed_at = 0.0
        """time.monotonic() when the last call that failed (trap, timeout, ...) ended."""
        self.lock = threading.Lock()
        """Held by whoever touches the Store (a scheduler slice, instantiate, close)."""
        self._message_results: dict[str, ResultConverter] = {}
        for name in ("handle-message", "handle-callback"):
            result = loaded.exports[name].result
            assert isinstance(result, ResultConverter), "the loader checked these signatures"
            self._message_results[name] = result

    # --- lifecycle of the Store ---

    def instantiate(self) -> None:
        """Create a fresh Store and instance (dropping any previous one), waiting out on this thread any sleep
        of a start function."""
        run_to_end(self.instantiate_steps())

    def instantiate_steps(self) -> Steps[None]:
        """Create a fresh Store and instance (dropping any previous one), in one step unless a core start
        function sleeps in sleep-millis: that step yields Asleep (the deadline of the instantiation), so its
        scheduler sets it aside as it does a call's sleep. Before, the thread waited out the sleep: start
        functions sleeping beyond the lent threads stalled every other guest until their deadline. A sleep
        that reaches the deadline ends the instantiation (a timeout, as for a call). Closed mid-sleep (its
        waiter went away), the instantiation is dropped."""
        self.close()
        store = wasmtime.Store(self.engine)
        self.limiter.apply(store)
        if self.loaded.uses_wasi:
            store.set_wasi(wasi_config(self.wasi_stdio))
            if self.loaded.uses_http:
                # wasi:http's host functions take the Store's HTTP context as given: without one, wasmtime's
                # C API panics at the guest's first wasi:http call (an unwrap of None), aborting the daemon.
                store.set_wasi_http()
        context = capi.addr_of(store._context())
        register_context(context, self.host)
        registered = True
        try:
            self.host.deadline = self.limiter.arm(context)
            instance = capi.INSTANCE()
            problem = yield from self._instantiate(context, ctypes.addressof(instance))
            if problem is not None:
                raise InstantiationError(self.name, f"instantiation failed: {problem.strip()}")
            instance_address = ctypes.addressof(instance)
            for (index, slot), name in zip(self._export_slots, self.loaded.exports, strict=True):
                if not capi.instance_get_func(instance_address, context, index, slot):
                    raise InstantiationError(self.name, f"export {name} vanished after instantiation")
            # Only now: once guests yield on fuel, every call on the Store must be async (instantiation too).
            error = capi.context_fuel_async_yield_interval(context, FIRST_SLICE_FUEL)
            if error:
                raise InstantiationError(self.name,
                                         f"cannot set the fuel yield interval: {capi.take_error(error)}")
            registered = False  # the Store's now: _release unregisters it
        finally:
            if registered:
                unregister_context(context)
        self.host.fresh_slice = self.limiter.start_epoch_yields(context)
        self.store, self.context = store, context
        self._func_addresses = self._slot_addresses
        self.state = InstanceState.INSTANTIATED

    def _instantiate(self, context: int, instance: int) -> Generator[float, None, str | None]:
        """Instantiate the component into the Store of `context`, writing the instance at the address
        `instance`; wasmtime's error text if that failed. Asynchronously (a call future polled to its end): a
        Store whose component imports a suspending host function must be (the synchronous instantiate
        refuses it). While a start function sleeps, yields Asleep (see instantiate_steps)."""
        host = self.host
        error = (ctypes.c_void_p * 1)()
        future = capi.linker_instantiate_async(
            capi.addr_of(self.linker.ptr()), context, capi.addr_of(self.loaded.component.ptr()), instance,
            ctypes.addressof(error),
        )
        done = False
        try:
            while True:
                with self._charged():  # each poll: the thread runs other guests while this one sleeps
                    done = capi.call_future_poll(future)
                if done:
                    break
                until = host.asleep_until  # else it cannot be pending: the Store yields nowhere yet
                if until is not None:
                    yield Asleep(host.deadline, until, host)
                    if time.monotonic() >= host.deadline:
                        return "wasm trap: interrupt (its start function slept until the deadline)"
        finally:
            capi.call_future_delete(future)  # mid-sleep too: the guest never goes on
            if error[0] and not done:
                capi.take_error(error[0])
                error[0] = None
        return capi.take_error(error[0]) if error[0] else None

    def _charged(self) -> AbstractContextManager[None]:
        """Charge the memories made meanwhile to this component (when the engine accounts memory)."""
        if self._memories is None or self.memory is None:
            return nullcontext()
        return self._memories.charged_to(self.memory)

    def close(self) -> None:
        """Drop the Store and everything in it (a call in progress first)."""
        self._abandon()
        self._release()
        self._free_poisoned()
        self.state = InstanceState.EMPTY

    def successor(self) -> StoreManager:
        """A StoreManager for the same component and limits, with no Store yet and a HostContext of its
        own (see HostContext.successor), for when a thread keeps this one's Store: a call given up on
        while its guest waits in WASI (ComponentActor._gave_up). Nothing may touch this one after that."""
        return StoreManager(self.loaded, self.component_id, self.limits, self.linker, self.engine, self.tick_ms,
                            self.host.successor(), self.wasi_stdio, self._memories)

    def _release(self) -> None:
        """Free the Store (no call may be in progress)."""
        self.host.fresh_slice = None
        if self.context:
            unregister_context(self.context)
        self.store, self.context, self._func_addresses = None, 0, {}

    @property
    def in_call(self) -> bool:
        """Whether a call has started and not yet ended (it may be suspended between slices)."""
        return self._future != 0

    def _require(self, *states: InstanceState) -> None:
        if self.state not in states:
            if self.state is InstanceState.DEAD:
                detail = "its Store was poisoned by an earlier trap; instantiate it again"
            elif self.state is InstanceState.EMPTY:
                detail = "it has not been instantiated"
            else:
                detail = "initialize() has not succeeded yet"
            raise InstanceStateError(f"{self.name}: cannot call now: {detail}")

    # --- calls ---
    #
    # Every call is an async call future, run one slice (SLICE_FUEL units of fuel) per poll: the
    # `*_steps` generators poll once per step and yield the call's monotonic deadline between
    # slices, so a scheduler can time-slice many guests over few threads; the plain methods run
    # the steps to the end on the calling thread.

    def _fail(self, function: str, error: int) -> GuestFailure:
        """The call failed and the Store is poisoned (its call future is already gone): it is set
        aside for `free_poisoned`, and no call can reach it any more."""
        failure = classify_error(self.name, function, error)
        self._poisoned = self.store  # freed by free_poisoned, or at the latest by the next instantiate
        self._release()
        self.state = InstanceState.DEAD
        self.failed_at = time.monotonic()
        return failure

    def free_poisoned(self) -> None:
        """Free the Store a failed call poisoned, if it is still held. Any thread, without the Store's
        lock: the worker that ran the call does it once the failure is on its way to the event loop,
        so that the answer, the log lines and the restart's start need not wait for it (the Store's
        memories are unmapped here, 80 - 140 us)."""
        if self._poisoned is not None:
            self._free_poisoned()

    def _free_poisoned(self) -> None:
        # Under the lock, the Store is freed while the attribute already reads None: `close` takes it
        # whatever it reads, so a new Store never starts while another thread still frees the old one.
        with self._freeing:
            self._poisoned = None

    def _start(self, function: str, args: int, nargs: int, nresults: int) -> tuple[int, bool]:
        """Create the call future and poll it once (the first poll reads the arguments, so they
        may be reused afterwards); return it and whether it has finished."""
        if self._future:
            raise InstanceStateError(f"{self.name}: cannot call {function}: a call is already in progress")
        self.calling = function
        # The error slot is empty here: whoever finds an error in it takes it out.
        future = capi.func_call_async(
            self._func_addresses[function], self.context, args, nargs, self._result_address, nresults,
            self._error_address,
        )
        if not future:
            error = self._error[0]
            self._error[0] = None
            raise self._fail(function, error) if error else InstanceStateError(f"{self.name}: cannot call {function}")
        self._future = future
        self._poll_began = time.perf_counter()
        try:
            return future, capi.call_future_poll(future)
        except BaseException:
            self._abandon()
            raise

    def _wait(self, function: str, future: int, done: bool) -> Generator[float, None, None]:
        """Poll `future` one slice per step until it finishes or its deadline passes."""
        host = self.host
        deadline = host.deadline
        interval = FIRST_SLICE_FUEL  # the Store's yield interval, in force for the slice that just ended
        kept_turn = False  # this step went on past a tick that cut its slice short (at most once a step)
        try:
            while not done:
                # The slice's time: its poll returned a moment ago (a sleep's time is never in a poll)
                seconds = time.perf_counter() - self._poll_began
                ran_out, computed = self.limiter.end_slice(self.context, interval, seconds)
                if computed:
                    blocking.computing()  # its scheduler may let other threads run guest code beside it
                if ran_out and interval != SLICE_FUEL:
                    # Past the short first slice: full slices until the end of the call (from the next
                    # poll). Only after a slice that ran out of fuel: a guest suspended at an epoch
                    # tick gets back the fuel counter it left with, undoing the reset a new interval
                    # makes (measured: 1.8M fuel lost from its budget and added to its count).
                    self._yield_interval(SLICE_FUEL)
                    interval = SLICE_FUEL
                until = host.asleep_until
                if until is not None:
                    # The guest sleeps in sleep-millis, its call suspended: it needs no thread until it wakes
                    # (at `until`, never past the deadline, or when interrupted), and its scheduler sets it
                    # aside until then. It wakes with a whole epoch slice (see host_fn._still_asleep).
                    kept_turn = False
                    yield Asleep(deadline, until, host)
                    if self._future != future:
                        raise InstanceStateError(f"{self.name}: {function} was abandoned (the Store was closed)")
                elif interval == FIRST_SLICE_FUEL and not kept_turn and seconds < self.limiter.short_slice_s:
                    # Still the first interval, so no slice has run out of fuel: an epoch tick cut the call
                    # just after it began. It has not had its turn, so it goes on (to its fuel or the next
                    # tick) instead of joining the back of the queue, where among a thousand queued calls a
                    # short call cut so (1 in 400 at 25 us) waited its deadline out. Once a step.
                    kept_turn = True
                else:
                    kept_turn = False
                    yield deadline
                    if self._future != future:
                        raise InstanceStateError(f"{self.name}: {function} was abandoned (the Store was closed)")
                if time.monotonic() >= deadline:
                    # Waited past the deadline for a slice: end it here rather than poll it again.
                    self._abandon()
                    raise GuestTimeout(self.name, function, "wasm trap: interrupt (deadline passed between slices)")
                self._poll_began = time.perf_counter()
                done = capi.call_future_poll(future)
        finally:
            if self._future == future:
                if done:
                    self._future = 0
                    capi.call_future_delete(future)
                    self.limiter.count_fuel(self.context)
                    if interval != FIRST_SLICE_FUEL:
                        self._yield_interval(FIRST_SLICE_FUEL)
                else:
                    self._abandon()  # closed before the end (its waiter went away)
        error = self._error[0]
        if error:
            self._error[0] = None
            raise self._fail(function, error)

    def _yield_interval(self, fuel: int) -> None:
        error = capi.context_fuel_async_yield_interval(self.context, fuel)
        if error:
            raise RuntimeError(f"{self.name}: cannot set the fuel yield interval: {capi.take_error(error)}")

    def _abandon(self) -> None:
        """Drop the call in progress, if any, mid-flight; the instance cannot be used after that."""
        future, self._future = self._future, 0
        if future:
            # Suspended between slices, the guest is not running: from here on it never runs again
            # (deleting the future only frees it, without letting go of the GIL: see capi).
            self.failed_at = time.monotonic()
            capi.call_future_abandon(future)
            self.state = InstanceState.DEAD
            error = self._error[0]
            if error:
                self._error[0] = None
                capi.take_error(error)

    def _take_result(self, function: str) -> Any:
        address = self._result_address
        try:
            result = self.loaded.exports[function].result
            return result.lift(address) if result is not None else None
        finally:
            capi.val_delete(address)
            self._result[0] = capi.BOOL  # the next call overwrites (drops) this slot: leave nothing to free

    def _call_steps(self, function: str, args: list[Any], deadline_ms: int | None = None) -> Steps[Any]:
        """Call an export through the owned-value converters (for the rarely called exports)."""
        spec = self.loaded.exports[function]
        buffer = (ctypes.c_uint8 * (VAL_SIZE * max(len(args), 1)))()
        base = ctypes.addressof(buffer)
        lowered = 0
        try:
            for conv, value in zip(spec.params, args, strict=True):
                conv.lower(value, base + lowered * VAL_SIZE)
                lowered += 1
            future, done = self._begin(function, base, lowered, deadline_ms)
        finally:
            for i in range(lowered):
                capi.val_delete(base + i * VAL_SIZE)
        yield from self._wait(function, future, done)
        return self._take_result(function)

    def _shared_call_steps(self, function: str, args: int, nargs: int) -> Steps[Any]:
        """Call an export with arguments lowered already and owned by someone else (only read)."""
        future, done = self._begin(function, args, nargs, None)
        yield from self._wait(function, future, done)
        return self._take_result(function)

    def _begin(self, function: str, args: int, nargs: int, deadline_ms: int | None) -> tuple[int, bool]:
        self.host.deadline = self.limiter.arm(self.context, deadline_ms)
        return self._start(function, args, nargs, 1 if self.loaded.exports[function].result is not None else 0)

    def _message_start(self, function: str, message: ComponentMessage) -> tuple[int, bool]:
        """Start handle-message / handle-callback with this thread's reusable message argument;
        if the first slice finished the call, end it here (the common case: no generator needed)."""
        if self.state is not InstanceState.INITIALIZED:
            self._require(InstanceState.INITIALIZED)
        argument = message_argument()
        address = argument.fill(message)
        host = self.host
        host.correlation_id = message.metadata.correlation_id
        host.deadline = self.limiter.arm(self.context)
        host.host_busy = 0.0  # the host-call budget is per call: back-to-back messages that each make a
        # host call or two are not a loop of host calls (measured: they paused every ~40 storage messages)
        try:
            future, done = self._start(function, address, 1, 1)
        finally:
            argument.clear()  # this thread's argument: free for other calls once the first poll read it
        if done:
            self._future = 0
            capi.call_future_delete(future)
            self.limiter.count_fuel(self.context)
            error = self._error[0]
            if error:
                self._error[0] = None
                raise self._fail(function, error)
        return future, done

    def _message_result(self, function: str) -> tuple[bool, Any]:
        """(is_ok, payload) of the guest's result of a message call that has ended."""
        result = self._result_address
        try:
            return self._message_results[function].lift_parts(result)
        finally:
            capi.val_delete(result)
            self._result[0] = capi.BOOL

    def _message_steps(self, function: str, message: ComponentMessage) -> Steps[tuple[bool, Any]]:
        """Call handle-message / handle-callback; returns (is_ok, payload) of the guest's result."""
        future, done = self._message_start(function, message)
        if not done:
            yield from self._wait(function, future, done)
        return self._message_result(function)

    def _message_now(self, function: str, message: ComponentMessage) -> tuple[bool, Any]:
        """`_message_steps` run to the end on this thread, without generators when one slice will do."""
        future, done = self._message_start(function, message)
        if not done:
            run_to_end(self._wait(function, future, done))
        return self._message_result(function)

    def initialize_steps(self, config: ComponentConfig) -> Steps[None]:
        """Call `initialize`; a guest error raises ComponentError."""
        self._require(InstanceState.INSTANTIATED, InstanceState.INITIALIZED)
        shared = LOWERED_CONFIGS.address(self.loaded.exports["initialize"].params[0], config)
        if shared is None:
            outcome = yield from self._call_steps("initialize", [config_value(config)])
        else:
            outcome = yield from self._shared_call_steps("initialize", shared, 1)
        if isinstance(outcome, Err):
            raise guest_error(ComponentError, outcome.value)
        self.state = InstanceState.INITIALIZED

    def _message_error(self, value: tuple[str, Any]) -> WasmError:
        """The WasmError a message call's guest returned (guest_error), its text's conversion told to
        host.produced first: the owner budgets the guest's next call and trims the copies, as for a large reply.
        Four guests returning 20 MB errors in a loop left the host at 281 MiB once they went quiet (80 MiB of
        it their linear memory), never trimmed."""
        payload = value[1]
        if isinstance(payload, str) and self.host.produced is not None:
            self.host.produced(len(payload) // TEXT_BYTES_PER_LIST_BYTE)
        return guest_error(WasmError, value)

    def handle_message_steps(self, message: ComponentMessage) -> Steps[bytes | None]:
        """Call `handle-message`; returns the optional reply, a guest error raises WasmError."""
        is_ok, value = yield from self._message_steps("handle-message", message)
        if is_ok:
            return value  # type: ignore[no-any-return]
        raise self._message_error(value)

    def handle_callback_steps(self, message: ComponentMessage) -> Steps[None]:
        """Call `handle-callback`; a guest error raises WasmError."""
        is_ok, value = yield from self._message_steps("handle-callback", message)
        if not is_ok:
            raise self._message_error(value)

    def metadata_steps(self) -> Steps[ComponentMetadata]:
        """Call `metadata`; ComponentError when the host refuses what it returns (see ComponentMetadata.problem)."""
        self._require(InstanceState.INSTANTIATED, InstanceState.INITIALIZED)
        value = yield from self._call_steps("metadata", [])
        metadata = ComponentMetadata(
            name=value["name"], version=value["version"], description=value["description"],
            author=value["author"], license=value["license"],
            supported_operations=tuple(value["supported-operations"]), stateful=value["stateful"],
        )
        problem = metadata.problem()
        if problem is not None:
            raise ComponentError("invalid-state", f"{self.name}: metadata refused: {problem}")
        return metadata

    def health_steps(self) -> Steps[HealthStatus]:
        """Call `health`. Between two messages of a batch (a probe), what it writes is a unit of its
        own: kept when it returns, dropped when it fails, committed with the batch either way, never
        joined to the next message's writes."""
        self._require(InstanceState.INITIALIZED)
        if self._future:  # a message's call is suspended between slices: its writes are not ours to end
            raise CallInProgress(f"{self.name}: cannot call health: a call is already in progress")
        try:
            status = HealthStatus((yield from self._call_steps("health", [])))
        except BaseException:
            self.host.end_message(False)
            raise
        self.host.end_message(True)
        return status

    def shutdown_steps(self, deadline_ms: int | None = None) -> Steps[None]:
        """Call `shutdown`, interrupted after `deadline_ms` when given (else the usual limit);
        a guest error raises ComponentError."""
        self._require(InstanceState.INITIALIZED)
        outcome = yield from self._call_steps("shutdown", [], deadline_ms)
        if isinstance(outcome, Err):
            raise guest_error(ComponentError, outcome.value)

    def initialize(self, config: ComponentConfig) -> None:
        """`initialize_steps` run to the end on this thread."""
        run_to_end(self.initialize_steps(config))

    def handle_message(self, message: ComponentMessage) -> bytes | None:
        """`handle_message_steps` run to the end on this thread."""
        is_ok, value = self._message_now("handle-message", message)
        if is_ok:
            return value  # type: ignore[no-any-return]
        raise self._message_error(value)

    def handle_callback(self, message: ComponentMessage) -> None:
        """`handle_callback_steps` run to the end on this thread."""
        is_ok, value = self._message_now("handle-callback", message)
        if not is_ok:
            raise self._message_error(value)

    def metadata(self) -> ComponentMetadata:
        """`metadata_steps` run to the end on this thread."""
        return run_to_end(self.metadata_steps())

    def health(self) -> HealthStatus:
        """`health_steps` run to the end on this thread."""
        return run_to_end(self.health_steps())

    def shutdown(self, deadline_ms: int | None = None) -> None:
        """`shutdown_steps` run to the end on this thread."""
        run_to_end(self.shutdown_steps(deadline_ms))
