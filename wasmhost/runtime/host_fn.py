"""The host functions guests import (`host-messaging`, `host-services`, `storage`) on one Linker.

Host functions never raise into wasmtime: wasmtime-py re-raises a Python exception through a
module global on whatever thread comes next and the trap poisons the Store. Every failure here
becomes the function's WIT error value instead; functions without an error channel fall back to
a harmless value and log the host-side problem.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
import wasmtime
from wasmtime import component as wc

from wasmhost.core.blocking import blocking
from wasmhost.core.errors import ComponentError, HostError, MessagingError, StorageError
from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.core.messages import Timestamp
from wasmhost.core.protocols import CommitInFlight, DirectoryPort, HeldWrites, MessagingPort, StoragePort
from wasmhost.core.rate_limit import RateLimit
from wasmhost.runtime import capi, contract
from wasmhost.runtime.capi import VAL_PAYLOAD, VAL_SIZE
from wasmhost.runtime.codec import (
    Converter,
    Err,
    ListConverter,
    Ok,
    OptionConverter,
    clear_val,
    converter_for,
    read_word,
)
from wasmhost.runtime.guest_log import MAX_LINE_CHARS, LogGate, guest_line
from wasmhost.runtime.id_converter import with_component_ids
from wasmhost.runtime.lowered_listing import Listing, ListingConverter

guest_log = structlog.get_logger("wasmhost.guest")
host_log = structlog.get_logger("wasmhost.host_fn")

_LOG_METHODS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning", "error": "error"}
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@dataclass
class HostContext:
    """What the host functions of one Store see: whose Store it is and the ports to the host."""

    component_id: ComponentId
    messaging: MessagingPort | None = None
    storage: StoragePort | None = None
    directory: DirectoryPort | None = None
    deadline: float = field(default=float("inf"))  # time.monotonic() at which the current call times out
    correlation_id: str | None = None  # of the message being handled, for the guest's log lines
    log_limit: RateLimit = field(default_factory=RateLimit)  # guest log lines per second and burst
    log_gate: LogGate | None = field(default=None, init=False, repr=False)  # made at the first log line; kept
    # across restarts of the instance, so that trapping does not refill the bucket
    interrupted: bool = field(default=False, init=False, compare=False)  # set by interrupt(), cleared by its owner
    dead: bool = field(default=False, init=False, compare=False)
    """Set by `abandon`: every host function fails (a trap), and no held write is ever committed."""
    host_busy: float = field(default=0.0, init=False, repr=False, compare=False)  # see _share_the_gil
    host_window: float = field(default=0.0, init=False, repr=False, compare=False)
    fresh_slice: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)
    """Set by the Store's owner while its guest yields at epoch ticks: gives the guest a whole epoch
    slice again (called after a wait in a host call, which used no CPU)."""
    _wake: threading.Condition = field(default_factory=threading.Condition, init=False, repr=False, compare=False)
    _waker: Callable[[], None] | None = field(default=None, init=False, repr=False, compare=False)  # see wake_me
    asleep_until: float | None = field(default=None, init=False, compare=False)
    """While the guest's call is suspended in sleep-millis: when it goes on (time.monotonic()). Set when the
    sleep begins, cleared as it ends (or is abandoned): a poll of the call that returns unfinished with this
    set is a sleep, not a slice that ran out (see StoreManager._wait)."""
    holding: bool = field(default=False, init=False, compare=False)
    """Messages are being handled: storage writes are held (see hold_writes), not written at once."""
    held: HeldWrites | None = field(default=None, init=False, repr=False, compare=False)
    """The held writes of the batch, made at its first storage call; kept after the batch while its
    commit is in flight (see start_commit)."""
    in_flight: CommitInFlight | None = field(default=None, init=False, repr=False, compare=False)
    """The last batch's commit, handed over by start_commit."""
    touched: bool = field(default=False, init=False, compare=False)
    """A storage call was made since hold_writes."""
    produced: Callable[[int], None] | None = field(default=None, init=False, repr=False, compare=False)
    """Told the length of a byte list the guest hands storage.set (and what a log context's pairs count for,
    CONTEXT_PAIR_VALUES each), when its owner budgets large conversions (the actor: wasmtime converted it as it
    converts a sent payload, about 160 bytes a byte)."""
    calls: list[int] = field(default_factory=lambda: [0] * len(HOST_FUNCTIONS), init=False, repr=False,
                             compare=False)
    """How often the guest called each host function (indexed like HOST_FUNCTIONS): read by metrics."""

    def hold_writes(self) -> None:
        """From now on until commit_writes, storage calls go through held writes: each message's
        writes are kept or dropped at end_message and made durable together by commit_writes."""
        self.holding = True
        self.touched = False
        if self.held is not None and (self.in_flight is None or self.in_flight.done()):
            # the previous commit is over (its writes are committed, or gone): start afresh
            self.held = self.in_flight = None

    def start_commit(self) -> CommitInFlight | StorageError | None:
        """Hand the batch's kept writes to storage without waiting for the commit (None: nothing to
        write); the next batch reads them until then. Waits for the previous batch's commit first
        (a blocking section: usually it is confirmed already); its error, if it failed, is returned
        instead and this batch's writes are dropped. Storage calls outside messages write at once
        again afterwards (once that commit is confirmed)."""
        held, self.holding = self.held, False
        if held is None or self.dead:
            self.held = None  # abandoned: never committed
            return None
        try:
            with blocking():  # may wait for the previous batch's fsync: another thread may run meanwhile
                commit = held.start_commit()
        except StorageError as exc:
            self.held = self.in_flight = None
            return exc
        except Exception as exc:  # a host bug: nothing is acknowledged as written
            host_log.exception("storage_commit_failed", component=str(self.component_id))
            self.held = self.in_flight = None
            return StorageError("io-error", f"host error: {type(exc).__name__}: {exc}")
        if commit is None:
            self.held = None
        self.in_flight = commit
        return commit

    def end_message(self, ok: bool) -> None:
        """The message being handled ended: keep its writes (`ok`) or drop them."""
        if self.held is not None:
            self.held.end_message(ok)

    def commit_writes(self) -> StorageError | None:
        """Commit the kept writes of the batch (after the previous batch's) and wait for that; the
        error if they were not committed. Storage calls write at once again afterwards."""
        commit = self.start_commit()
        self.held = self.in_flight = None
        if commit is None or isinstance(commit, StorageError):
            return commit
        with blocking():  # waiting for the fsync: another thread may run meanwhile
            return commit.wait()

    def settle_writes(self) -> None:
        """Outside messages: wait until a commit still in flight is confirmed (or failed: its writes
        are gone then), so that a storage call made now sees and follows what is committed."""
        held, self.held, self.in_flight = self.held, None, None
        if held is not None:
            try:
                with blocking():
                    held.commit()  # nothing kept since: only waits for the one in flight
            except StorageError:
                pass  # that batch's messages hear of it; what comes now goes on from what is committed

    def drop_writes(self) -> None:
        """Forget every held write (the batch was cut short); storage calls write at once again. A commit
        of them still running on another thread (abandoned) hands nothing more over."""
        if self.held is not None:
            self.held.abandon()
        self.held, self.holding, self.in_flight = None, False, None

    def abandon(self) -> None:
        """The call in progress was given up on (its guest waits in WASI past its deadline, on a thread
        that keeps this context until the wait ends): whatever that thread does afterwards has no effect.
        Its host calls fail (a trap, see _trampoline: no send, request, log or storage call goes through),
        its held writes are never committed, and its sleeps end at once. From any thread."""
        self.dead = True
        self.interrupt()

    def successor(self) -> HostContext:
        """A context for a new Store of the same component: the same ports and limits, the same log gate
        (the rate limit is not refilled by starting over), nothing of this one's calls or writes."""
        fresh = HostContext(self.component_id, self.messaging, self.storage, self.directory,
                            log_limit=self.log_limit)
        fresh.log_gate = self.log_gate
        return fresh

    def interrupt(self) -> None:
        """End the current call's waits now (from any thread): a guest in sleep-millis returns at once,
        and so does every sleep after it until the owner clears `interrupted` for the next call. A call
        suspended in its sleep is handed back to its scheduler (see wake_me)."""
        with self._wake:
            self.interrupted = True
            self._wake.notify_all()
            wake, self._waker = self._waker, None
        if wake is not None:
            wake()  # outside the lock: the scheduler takes its own lock, and holds it when calling wake_me

    def wake_me(self, wake: Callable[[], None] | None) -> bool:
        """Have `interrupt` call `wake` (once; None: no longer), for a scheduler that set aside the call
        suspended in sleep-millis. False, and `wake` is not kept, when interrupted already: the sleep is
        over, and the call goes on at its next step."""
        with self._wake:
            if wake is not None and self.interrupted:
                return False
            self._waker = wake
            return True

    def wait_out(self, until: float) -> None:
        """Wait on this thread until time.monotonic() reaches `until` or the call is interrupted, for
        whoever steps a call suspended in sleep-millis without setting it aside (run_to_end, instantiate):
        a blocking section, as every sleep was before calls were suspended."""
        with _waiting(self):
            self.sleep_until(until)

    def sleep_until(self, end: float) -> None:
        """Wait until time.monotonic() reaches `end`, or less if interrupted."""
        with self._wake:
            while not self.interrupted and (left := end - time.monotonic()) > 0:
                self._wake.wait(min(left, threading.TIMEOUT_MAX))  # a deadline years away is still a wait


def id_value(component: ComponentId) -> dict[str, str]:
    """A ComponentId as the codec's `component-id` record."""
    return {"namespace": component.namespace, "name": component.name, "instance": component.instance}


def id_from_value(value: ComponentId | dict[str, str]) -> ComponentId:
    """A `component-id` record from a guest as a ComponentId (raises InvalidComponentId); lifted by
    ComponentIdConverter, it is one already unless it was invalid."""
    if isinstance(value, ComponentId):
        return value
    return ComponentId(value["namespace"], value["name"], value["instance"])


def error_value(error: HostError) -> tuple[str, Any]:
    """A HostError as the codec's variant value."""
    payload = error.payload
    return (error.case, id_value(payload) if isinstance(payload, ComponentId) else payload)


# --- host-messaging -------------------------------------------------------------------------------


def _messaging(ctx: HostContext) -> MessagingPort:
    if ctx.messaging is None:
        raise MessagingError("delivery-failed", "messaging is not available in this host")
    return ctx.messaging


def _target(value: ComponentId | dict[str, str]) -> ComponentId:
    try:
        return id_from_value(value)
    except InvalidComponentId as exc:
        raise MessagingError("invalid-message", str(exc)) from None


def send(ctx: HostContext, target: dict[str, str], payload: bytes) -> Ok[None]:
    """host-messaging.send"""
    _messaging(ctx).send(ctx.component_id, _target(target), payload)
    return Ok(None)


def request(ctx: HostContext, target: dict[str, str], payload: bytes, timeout_ms: int) -> Ok[str]:
    """host-messaging.request"""
    return Ok(_messaging(ctx).request(ctx.component_id, _target(target), payload, timeout_ms))


def cancel_request(ctx: HostContext, request_id: str) -> Ok[None]:
    """host-messaging.cancel-request"""
    _messaging(ctx).cancel_request(ctx.component_id, request_id)
    return Ok(None)


MAX_BROADCAST_TARGETS = 4096
"""Targets one broadcast may name (a guest's list is refused before it is converted, see BoundedList): each
is lifted in Python within one host call no time slice cuts, 3.4 us a target (500,000 held a worker for 1.7 s
and stalled the event loop up to 62 ms at a time), so the bound keeps one call near 14 ms."""


def _too_many_targets(count: int) -> MessagingError:
    return MessagingError("invalid-message",
                          f"broadcast to {count} targets: at most {MAX_BROADCAST_TARGETS} in one call")


class BoundedList(Converter):
    """A `list<T>` argument of a host function longer than `limit` is refused with `too_long(length)`
    before any element becomes a Python object. A guest names the length: 600,000 copies of one id take
    it 14 MB of linear memory, and cost the host 0.9 s of Python under the GIL to convert (4.7 s and
    300 MB more when the ids are invalid, each kept as a dict), all before the host function ran."""

    def __init__(self, items: Converter, limit: int, too_long: Callable[[int], HostError]) -> None:
        self.items = items
        self.limit = limit
        self.too_long = too_long
        self.wit = items.wit

    def lift(self, addr: int) -> Any:
        length = read_word(addr + VAL_PAYLOAD)
        if length > self.limit:
            raise self.too_long(length)
        return self.items.lift(addr)

    def lower(self, value: Any, addr: int) -> None:
        self.items.lower(value, addr)


def broadcast(ctx: HostContext, targets: list[dict[str, str]], payload: bytes) -> Ok[None]:
    """host-messaging.broadcast (at most MAX_BROADCAST_TARGETS targets)"""
    _messaging(ctx).broadcast(ctx.component_id, [_target(t) for t in targets], payload)
    return Ok(None)


def self_id(ctx: HostContext) -> dict[str, str]:
    """host-messaging.self-id"""
    return id_value(ctx.component_id)


# --- host-services --------------------------------------------------------------------------------


_LIST_HEAD = struct.Struct("<QQ")  # a list value's payload: length, address of its values


class ContextPairs:
    """A guest's log context, left in wasmtime's values until the line is written (the host call is still
    running then): a line over the rate limit reads none of it, and one that is written reads only as
    many pairs as a line can hold. A guest names the number of pairs: 900,000 empty ones take it 14 MB of
    linear memory, and converting them all took the host 2.3 s of Python under the GIL and 150 MB."""

    __slots__ = ("_data", "_pair", "count")

    def __init__(self, data: int, count: int, pair: Converter) -> None:
        self._data = data
        self._pair = pair
        self.count = count
        """How many pairs the guest sent."""

    def read(self, limit: int) -> tuple[list[tuple[str, str]], int]:
        """The first `limit` pairs, and how many others there are, which no line of `limit` characters can
        hold: they are not read at all (measuring them cost 0.4 s of Python under the GIL per 900,000-pair
        line, as often as the guest's rate limit admits a line)."""
        first = [self._pair.lift(self._data + i * VAL_SIZE) for i in range(min(limit, self.count))]
        return first, self.count - len(first)


class LazyContext(Converter):
    """`list<tuple<string, string>>` lifted as ContextPairs (for host-services.log)."""

    def __init__(self, pairs: ListConverter) -> None:
        self.pairs = pairs
        self.wit = pairs.wit

    def lift(self, addr: int) -> ContextPairs:
        count, data = _LIST_HEAD.unpack_from(capi.HOST_MEMORY, addr + VAL_PAYLOAD)
        return ContextPairs(data, count, self.pairs.element)

    def lower(self, value: Any, addr: int) -> None:
        self.pairs.lower(value, addr)


def _lazy_context(context: Converter) -> Converter:
    """log's `option<list<tuple<string, string>>>` converter, its list read as ContextPairs."""
    assert isinstance(context, OptionConverter) and isinstance(context.payload, ListConverter), "the loader checked it"
    return OptionConverter(LazyContext(context.payload))


CONTEXT_PAIR_VALUES = 3
"""Values wasmtime makes of one context pair (the tuple and its two strings) where a `list<u8>` makes one of
a byte: what a pair counts for in HostContext.produced. 900,000 empty pairs took the host from 52 to 382 MiB,
and four guests logging them at once to 755 MiB, kept after they went quiet, until they were budgeted."""


def log(ctx: HostContext, level: str, message: str, context: ContextPairs | None) -> None:
    """host-services.log: into structlog, marked as coming from the guest, context pairs as fields, at most
    guest_log.MAX_LINE_CHARS (16 Ki); within the component's rate limit (lines over it are counted and summarised)."""
    if context is not None and ctx.produced is not None:
        # wasmtime converted every pair before this call, whatever becomes of the line: budgeted like a byte list
        ctx.produced(CONTEXT_PAIR_VALUES * context.count)
    method = _LOG_METHODS.get(level, "info")
    enabled = getattr(guest_log, "is_enabled_for", None)
    if enabled is not None and not enabled(_LOG_LEVELS[method]):
        return  # filtered out by the log level anyway: it does not count against the rate
    gate = ctx.log_gate
    if gate is None:
        gate = ctx.log_gate = LogGate(str(ctx.component_id), ctx.log_limit)
    if not gate.admit():
        return
    # Each pair written takes at least one character of the line: past MAX_LINE_CHARS pairs, none can be.
    pairs, unread = context.read(MAX_LINE_CHARS) if context is not None else ([], 0)
    event, fields = guest_line(message, pairs, ctx.correlation_id, unread)
    getattr(guest_log, method)(event, component=str(ctx.component_id), guest=True, guest_level=level, **fields)


def current_time(ctx: HostContext) -> dict[str, int]:
    """host-services.current-time"""
    now = Timestamp.now()
    return {"seconds": now.seconds, "nanoseconds": now.nanoseconds}


def current_time_millis(ctx: HostContext) -> int:
    """host-services.current-time-millis"""
    return time.time_ns() // 1_000_000


@contextmanager
def _waiting(ctx: HostContext) -> Iterator[None]:
    """A wait inside a host call: the scheduler lends another thread meanwhile, and the guest resumes
    with a whole time slice (so a guest woken by an interrupt finishes its few last instructions
    rather than being abandoned at once)."""
    waited = time.perf_counter()
    with blocking():
        yield
    ctx.host_busy -= time.perf_counter() - waited  # waiting is not holding the GIL
    if ctx.fresh_slice is not None:
        ctx.fresh_slice()


def sleep_millis(ctx: HostContext, duration_ms: int) -> float | None:
    """host-services.sleep-millis: when, in time.monotonic(), the guest goes on; never past the current call's
    deadline, and None (at once) when that has passed or the call is interrupted. The sleep is a suspension
    of the guest's call that holds no thread (see _suspending_trampoline); it ends early when the call is
    interrupted (a stop out of drain time)."""
    now = time.monotonic()
    end = min(now + duration_ms / 1000, ctx.deadline)
    return end if end > now and not ctx.interrupted else None


def list_components(ctx: HostContext) -> Listing | list[ComponentId]:
    """host-services.list-components: the directory's answer, lowered by ListingConverter (which keeps it
    lowered until the directory changes)."""
    return Listing(ctx.directory) if ctx.directory is not None else [ctx.component_id]


def get_component_metadata(ctx: HostContext, target: dict[str, str]) -> Ok[dict[str, Any]]:
    """host-services.get-component-metadata"""
    try:
        wanted = id_from_value(target)
    except InvalidComponentId as exc:
        raise ComponentError("invalid-state", str(exc)) from None
    if ctx.directory is None:
        raise ComponentError("invalid-state", "no component directory in this host")
    info = ctx.directory.component_info(wanted)
    return Ok({"id": id_value(info.id), "name": info.name, "version": info.version, "health": info.health})


# --- storage --------------------------------------------------------------------------------------


def _storage(ctx: HostContext) -> StoragePort:
    if ctx.storage is None:
        raise StorageError("io-error", "storage is not enabled for this component")
    return ctx.storage


def _held(ctx: HostContext) -> HeldWrites | None:
    """The batch's held writes while messages are handled (made at the first storage call), else None
    (once a commit still in flight is confirmed)."""
    held = ctx.held
    if not ctx.holding:
        if held is not None:
            ctx.settle_writes()
        return None
    ctx.touched = True
    if held is None:
        held = ctx.held = _storage(ctx).hold(ctx.component_id)
    return held


def storage_get(ctx: HostContext, key: str) -> Ok[bytes | None]:
    """storage.get"""
    held = _held(ctx)
    return Ok(held.get(key) if held is not None else _storage(ctx).get(ctx.component_id, key))


def storage_set(ctx: HostContext, key: str, value: bytes) -> Ok[None]:
    """storage.set: held until the message ends ok and the batch commits; outside messages
    (initialize, shutdown) written at once."""
    if ctx.produced is not None:
        ctx.produced(len(value))  # whatever becomes of the value: its conversion has happened
    held = _held(ctx)
    if held is not None:
        held.set(key, value)
        return Ok(None)
    with _waiting(ctx):  # for the group commit
        _storage(ctx).set(ctx.component_id, key, value)
    return Ok(None)


def storage_delete(ctx: HostContext, key: str) -> Ok[None]:
    """storage.delete, held like storage.set."""
    held = _held(ctx)
    if held is not None:
        held.delete(key)
        return Ok(None)
    with _waiting(ctx):
        _storage(ctx).delete(ctx.component_id, key)
    return Ok(None)


def storage_exists(ctx: HostContext, key: str) -> Ok[bool]:
    """storage.exists"""
    held = _held(ctx)
    return Ok(held.exists(key) if held is not None else _storage(ctx).exists(ctx.component_id, key))


def storage_list_keys(ctx: HostContext, prefix: str | None) -> Ok[list[str]]:
    """storage.list-keys"""
    held = _held(ctx)
    return Ok(held.list_keys(prefix) if held is not None else _storage(ctx).list_keys(ctx.component_id, prefix))


def storage_usage(ctx: HostContext) -> Ok[dict[str, int]]:
    """storage.usage"""
    held = _held(ctx)
    usage = held.usage() if held is not None else _storage(ctx).usage(ctx.component_id)
    return Ok({"used-bytes": usage.used_bytes, "quota-bytes": usage.quota_bytes, "key-count": usage.key_count})


# --- registration ---------------------------------------------------------------------------------

Fallback = Callable[[Exception], Any]


def _err(case: str) -> Fallback:
    return lambda exc: Err((case, f"host error: {type(exc).__name__}: {exc}"))


@dataclass
class HostFunction:
    """One imported function: its implementation, the value returned when the host fails, and the
    converters built from its type on first use."""

    interface: str
    name: str
    impl: Callable[..., Any]
    fallback: Fallback
    bounds: dict[int, Callable[[Converter], Converter]] = field(default_factory=dict)
    """Wrappers of parameter converters by position (BoundedList): what a guest's list may hold."""
    result_as: Callable[[Converter], Converter] | None = None
    """Wrapper of the result converter (ListingConverter: how the result is lowered)."""
    suspends: bool = False
    """Linked as an async host function: `impl` returns when the guest goes on (time.monotonic(), or None:
    at once) and the guest's call is suspended until then (see _suspending_trampoline)."""
    params: list[Converter] | None = None
    result: Converter | None = None
    lifts: list[tuple[Callable[[int], Any], int]] | None = None
    """Each parameter's bound `lift` and its value's offset in the arguments: what `_call` runs per call
    (0.3 us less per call than enumerating the converters, measured with two parameters)."""

    def param_lifts(self, ty_ptr: int) -> list[tuple[Callable[[int], Any], int]]:
        """Parameter lifts with their offsets (`lifts`), built once from the function type wasmtime
        passes in."""
        if self.lifts is None:
            pointer = ctypes.cast(ty_ptr, ctypes.POINTER(wasmtime._ffi.wasmtime_component_func_type_t))
            fty = wc.FuncType._from_ptr(pointer, owner=self)
            result = fty.result
            self.result = converter_for(result) if result is not None else None
            if self.result is not None and self.result_as is not None:
                self.result = self.result_as(self.result)
            params = [with_component_ids(converter_for(ty)) for _, ty in fty.params]
            self.params = [self.bounds[i](conv) if i in self.bounds else conv for i, conv in enumerate(params)]
            self.lifts = [(conv.lift, i * VAL_SIZE) for i, conv in enumerate(self.params)]
        return self.lifts


_MESSAGING = contract.qualified("host-messaging")
_SERVICES = contract.qualified("host-services")
_STORAGE = contract.qualified("storage")

HOST_FUNCTIONS: list[HostFunction] = [
    HostFunction(_MESSAGING, "send", send, _err("delivery-failed")),
    HostFunction(_MESSAGING, "request", request, _err("delivery-failed")),
    HostFunction(_MESSAGING, "cancel-request", cancel_request, _err("delivery-failed")),
    HostFunction(_MESSAGING, "broadcast", broadcast, _err("delivery-failed"),
                 {0: lambda targets: BoundedList(targets, MAX_BROADCAST_TARGETS, _too_many_targets)}),
    HostFunction(_MESSAGING, "self-id", self_id, lambda exc: {"namespace": "?", "name": "?", "instance": "?"}),
    HostFunction(_SERVICES, "log", log, lambda exc: None, {2: _lazy_context}),
    HostFunction(_SERVICES, "current-time", current_time, lambda exc: {"seconds": 0, "nanoseconds": 0}),
    HostFunction(_SERVICES, "current-time-millis", current_time_millis, lambda exc: 0),
    HostFunction(_SERVICES, "sleep-millis", sleep_millis, lambda exc: None, suspends=True),
    HostFunction(_SERVICES, "list-components", list_components, lambda exc: [], result_as=ListingConverter),
    HostFunction(_SERVICES, "get-component-metadata", get_component_metadata, _err("invalid-state")),
    HostFunction(_STORAGE, "get", storage_get, _err("io-error")),
    HostFunction(_STORAGE, "set", storage_set, _err("io-error")),
    HostFunction(_STORAGE, "delete", storage_delete, _err("io-error")),
    HostFunction(_STORAGE, "exists", storage_exists, _err("io-error")),
    HostFunction(_STORAGE, "list-keys", storage_list_keys, _err("io-error")),
    HostFunction(_STORAGE, "usage", storage_usage, _err("io-error")),
]

_contexts: dict[int, HostContext] = {}
_contexts_lock = threading.Lock()


def register_context(context_address: int, ctx: HostContext) -> None:
    """Make `ctx` what host functions see when called from the Store with this context."""
    with _contexts_lock:
        _contexts[context_address] = ctx


def unregister_context(context_address: int) -> None:
    """Forget the Store with this context."""
    with _contexts_lock:
        _contexts.pop(context_address, None)


def _call(fn: HostFunction, ctx: HostContext, args: int, ty: int) -> Any:
    """Run one host function; every failure becomes a WIT value."""
    try:
        values = [lift(args + offset) for lift, offset in fn.param_lifts(ty)]
        return fn.impl(ctx, *values)
    except HostError as exc:
        return Err(error_value(exc))
    except Exception as exc:  # a host bug must not poison the guest's Store
        host_log.error("host_function_failed", function=f"{fn.interface}#{fn.name}",
                       component=str(ctx.component_id), error=repr(exc))
        return fn.fallback(exc)


HOST_WINDOW_S = 0.004
HOST_BURST_S = 0.002
"""A guest that spends this much Python time in host functions within HOST_WINDOW_S (half of it or
more: a loop of host calls) pauses (see _share_the_gil); occasional host calls never do."""
HOST_PAUSE_S = 0.0005
"""How long it then pauses, without the GIL."""


def _share_the_gil(ctx: HostContext, began: float) -> None:
    """Host functions run Python, under the GIL: a guest calling them in a loop (a log flood) would
    hold the GIL nearly all the time, and every other guest, the event loop and the control socket
    need it too. So after each HOST_BURST_S of host-function time a guest pauses HOST_PAUSE_S with the
    GIL released (a hog keeps 80% of it), and the others get their turn. Measured with a guest flooding
    its log next to an echo (`make bench`, logs rows): the echo's p99 went from 283 ms to 3.8 ms."""
    now = time.perf_counter()
    if now - ctx.host_window > HOST_WINDOW_S:
        ctx.host_window, ctx.host_busy = began, 0.0
    ctx.host_busy += now - began
    if ctx.host_busy >= HOST_BURST_S:
        time.sleep(HOST_PAUSE_S)
        ctx.host_window, ctx.host_busy = time.perf_counter(), 0.0


def _trampoline(env: int | None, context: int | None, ty: int | None, args: int | None, nargs: int,
                results: int | None, nresults: int) -> int | None:
    began = time.perf_counter()
    fn = HOST_FUNCTIONS[env or 0]
    ctx = _contexts.get(context or 0)
    if ctx is None or ctx.dead:
        return int(capi.error_new(_refusal(fn, ctx).encode()))
    ctx.calls[env or 0] += 1  # one writer: the thread running this Store
    value = _call(fn, ctx, args or 0, ty or 0)
    if fn.result is not None and results:
        clear_val(results)
        try:
            fn.result.lower(value, results)
        except Exception as exc:
            host_log.error("host_result_unconvertible", function=f"{fn.interface}#{fn.name}",
                           component=str(ctx.component_id), error=repr(exc))
            fn.result.lower(fn.fallback(exc), results)
    _share_the_gil(ctx, began)
    return None


def _refusal(fn: HostFunction, ctx: HostContext | None) -> str:
    """Why a host call ends in a trap before its function runs: its Store has no host context, or its call
    was given up on (its guest awake again after a WASI wait: what it does has no effect)."""
    if ctx is None:
        return f"wasmhost: no host context for {fn.name}"
    return f"wasmhost: {fn.name} refused: the call was given up on"


_TRAMPOLINE = capi.FUNC_CALLBACK(_trampoline)
_NO_FINALIZER = capi.FINALIZER(lambda env: None)


# --- suspending host functions (sleep-millis) -----------------------------------------------------
#
# A suspending host function is linked async: wasmtime calls _suspending_trampoline when the guest makes the
# call, and then polls the continuation it fills each time the guest's call future is polled. While that
# says "not yet", the poll returns unfinished with the guest suspended inside the host call, and no thread
# waits: the call's steps yield Asleep and the worker pool steps it again when the sleep ends (or at once
# when it is interrupted). Before, each sleeping guest held a worker thread for its whole sleep, so beyond
# the lent threads, sleepers stalled every other guest until they woke.

_sleeps: dict[int, HostContext] = {}
"""The contexts of the guests suspended in a sleep, by their continuation's env (one entry per sleep,
removed by its finalizer: when the sleep ends, or its call is abandoned mid-sleep)."""
_sleep_keys = itertools.count(1)


def _still_asleep(env: int | None) -> bool:
    """The continuation's poll: whether the sleep `env` is over (its end reached, or its call interrupted).
    When it is, the guest goes on from here with a whole epoch slice (the sleep used no CPU): given now, as
    the guest resumes, not before the poll, which may first wait for the GIL past the slice's ticks (seen
    when 300 sleepers were stopped at once: one was cut by a tick before it could answer)."""
    try:
        ctx = _sleeps.get(env or 0)
        until = ctx.asleep_until if ctx is not None else None
        if ctx is None or until is None or ctx.interrupted or time.monotonic() >= until:
            if ctx is not None:
                ctx.asleep_until = None
                if ctx.fresh_slice is not None:
                    ctx.fresh_slice()
            return True
        return False
    except BaseException:  # ctypes would print it and answer false: the guest would sleep until its deadline
        return True


def _sleep_over(env: int | None) -> None:
    """The continuation's finalizer: the sleep is over, or its call was abandoned mid-sleep."""
    ctx = _sleeps.pop(env or 0, None)
    if ctx is not None:
        ctx.asleep_until = None


_STILL_ASLEEP = capi.CONTINUATION_CALLBACK(_still_asleep)
_SLEEP_OVER = capi.FINALIZER(_sleep_over)
_AWAKE = capi.CONTINUATION_CALLBACK(lambda env: True)
_STILL_ASLEEP_ADDRESS = ctypes.cast(_STILL_ASLEEP, ctypes.c_void_p).value
_SLEEP_OVER_ADDRESS = ctypes.cast(_SLEEP_OVER, ctypes.c_void_p).value
_AWAKE_ADDRESS = ctypes.cast(_AWAKE, ctypes.c_void_p).value
_CONTINUATION = ctypes.c_void_p * capi.CONTINUATION_FIELDS


def _suspending_trampoline(env: int | None, context: int | None, ty: int | None, args: int | None, nargs: int,
                           results: int | None, nresults: int, error_ret: int | None,
                           continuation: int | None) -> None:
    began = time.perf_counter()
    cont = _CONTINUATION.from_address(continuation or 0)
    # Done first, whatever happens next: wasmtime panics (the daemon aborts) on a continuation left unset.
    cont[0], cont[1], cont[2] = _AWAKE_ADDRESS, None, None
    ctx = None
    try:
        fn = HOST_FUNCTIONS[env or 0]
        ctx = _contexts.get(context or 0)
        if ctx is None or ctx.dead:
            ctypes.c_void_p.from_address(error_ret or 0).value = capi.error_new(_refusal(fn, ctx).encode())
            return
        ctx.calls[env or 0] += 1
        until = _call(fn, ctx, args or 0, ty or 0)
        if until is None:
            _share_the_gil(ctx, began)  # no wait: a loop of these is a loop of host calls
            return
        key = next(_sleep_keys)
        _sleeps[key] = ctx
        ctx.asleep_until = until
        cont[0], cont[1], cont[2] = _STILL_ASLEEP_ADDRESS, key, _SLEEP_OVER_ADDRESS
    except BaseException as exc:  # a host bug: the guest goes on at once rather than the daemon aborting
        if ctx is not None:
            ctx.asleep_until = None
        host_log.error("host_function_failed", function="suspending host function", error=repr(exc))


_SUSPENDING_TRAMPOLINE = capi.ASYNC_FUNC_CALLBACK(_suspending_trampoline)


def build_linker(engine: wasmtime.Engine) -> wc.Linker:
    """A component Linker with WASI 0.2 and every airssys host function defined."""
    linker = wc.Linker(engine)
    linker.add_wasip2()
    by_interface: dict[str, list[tuple[int, HostFunction]]] = {}
    for index, fn in enumerate(HOST_FUNCTIONS):
        by_interface.setdefault(fn.interface, []).append((index, fn))
    with linker.root() as root:
        for interface, functions in by_interface.items():
            with root.add_instance(interface) as instance:
                for index, fn in functions:
                    name = fn.name.encode()
                    # A suspending function is linked async: a Store whose component imports it is async
                    add, trampoline = ((capi.linker_instance_add_func_async, _SUSPENDING_TRAMPOLINE) if fn.suspends
                                       else (capi.linker_instance_add_func, _TRAMPOLINE))
                    error = add(capi.addr_of(instance.ptr()), name, len(name), trampoline, index, _NO_FINALIZER)
                    if error:
                        raise wasmtime.WasmtimeError._from_ptr(
                            ctypes.cast(error, ctypes.POINTER(wasmtime._ffi.wasmtime_error_t))
                        )
    return linker
