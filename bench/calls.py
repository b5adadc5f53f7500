"""Call path: wasmtime-py's generic `Func.__call__` vs our typed path, `handle-message` on echo; and
what making every call a sliced async call costs against the same typed call made synchronously."""

from __future__ import annotations

import asyncio
import ctypes
import os

import wasmtime
from wasmtime import component as wc

from bench.harness import FIXTURES, Alternated, Row, alternated, rate
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.runtime import capi, contract
from wasmhost.runtime.capi import VAL_SIZE
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.limiter import Limiter
from wasmhost.runtime.message_arg import message_argument
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import StoreManager

ASYNC_TARGET = 0.75
"""Async (preemptible) typed calls must keep this share of the synchronous typed call rate: measured
0.77 - 0.85x at 64 B, 4 KiB and 64 KiB alike (wasmtime's async call path costs about a fifth more per
value converted, plus about 2.5 us to create and delete the call future)."""

SIZES: list[tuple[int, str, float | None]] = [
    # Every call is async since preemption: 25x for the synchronous typed path (still 28 - 29x) times
    # the async share above gives the 20x these rows must keep.
    (0, "0 B", None), (64, "64 B", 20.0), (4096, "4 KiB", 20.0), (65536, "64 KiB", 20.0), (1 << 20, "1 MiB", 10.0),
]


def _record(**fields: object) -> wc.Record:
    record = wc.Record()
    for name, value in fields.items():
        setattr(record, name.replace("_", "-"), value)
    return record


class _SyncTyped:
    """Our typed `handle-message` call made synchronously on a Store without fuel yields, step for
    step as StoreManager made it before calls became sliced async calls: the baseline of their cost."""

    def __init__(self, store: wasmtime.Store, func: wc.Func, manager: StoreManager) -> None:
        self.context = capi.addr_of(store._context())
        self.func = ctypes.addressof(func._func)
        self.limiter = Limiter(manager.limiter.limits, manager.limiter.tick_ms, manager.loaded.footprint)
        self.host = HostContext(manager.component_id)
        self.lift = manager._message_results["handle-message"].lift_parts
        self.out = (ctypes.c_uint8 * VAL_SIZE)()
        self.address = ctypes.addressof(self.out)

    def __call__(self, message: ComponentMessage) -> object:
        argument = message_argument()
        address = argument.fill(message)
        self.host.correlation_id = message.metadata.correlation_id
        self.host.deadline = self.limiter.arm(self.context)
        error = capi.func_call(self.func, self.context, address, 1, self.address, 1)
        argument.clear()
        if error:
            raise RuntimeError(capi.take_error(error))
        try:
            return self.lift(self.address)
        finally:
            capi.val_delete(self.address)
            self.out[0] = capi.BOOL


async def _async_against_sync(sync_call: _SyncTyped, ours: StoreManager, message: ComponentMessage,
                              seconds: float) -> Alternated:
    """The synchronous typed call's rate (the baseline) and the sliced async call's, in alternating
    windows (see bench.harness.alternated: a single window of each moved this row by more than its miss).
    A window costs nothing to set up here, so this row takes more, shorter rounds than the others: the
    median of 20 is moved less by the few a neighbour's burst lands in."""
    async def sync_rate(window: float) -> float:
        return rate(lambda: sync_call(message), window)

    async def async_rate(window: float) -> float:
        return rate(lambda: ours.handle_message(message), window)

    return await alternated(sync_rate, [async_rate], seconds, rounds=20)


def run(seconds: float = 1.0) -> list[Row]:
    """Measure both paths for every payload size."""
    runtime = Runtime()
    try:
        sender = ComponentId("bench", "sender", "0")
        loaded = runtime.load(ComponentId("bench", "echo", "0"), FIXTURES / "echo.wasm")
        ours = runtime.store(loaded, ComponentId("bench", "echo", "0"))
        ours.instantiate()
        ours.initialize(ComponentConfig())

        store = wasmtime.Store(runtime.engine.engine)
        store.set_fuel(2**62)
        store.set_epoch_deadline(2**40)
        instance = wc.Linker(runtime.engine.engine).instantiate(store, loaded.component)
        lifecycle = instance.get_export_index(store, contract.LIFECYCLE)
        generic = instance.get_func(store, instance.get_export_index(store, "handle-message", lifecycle))

        rows = []
        for size, label, target in SIZES:
            payload = os.urandom(size)
            stamp = Timestamp.now()
            message = ComponentMessage(sender, payload, MessageMetadata(timestamp=stamp))
            record = _record(
                sender=_record(namespace="bench", name="sender", instance="0"),
                payload=payload,
                metadata=_record(
                    correlation_id=None, reply_to=None, content_type=None,
                    timestamp=_record(seconds=stamp.seconds, nanoseconds=stamp.nanoseconds),
                ),
            )
            # the sync baseline below arms the shared Store's deadline per call: give the generic
            # calls their unbounded one back, or a slow 1 MiB run outlives it and is interrupted
            store.set_epoch_deadline(2**40)
            assert generic(store, record) == payload and ours.handle_message(message) == payload
            base = rate(lambda: generic(store, record), seconds)  # noqa: B023
            typed = rate(lambda: ours.handle_message(message), seconds)  # noqa: B023
            rows.append(Row("calls", label, base, typed, "calls/s", target))
            if size == 64:
                result = asyncio.run(_async_against_sync(_SyncTyped(store, generic, ours), ours, message, seconds))
                rows.append(Row("calls", "async 64 B", result.baseline, result.measured(0), "calls/s",
                                ASYNC_TARGET))
        return rows
    finally:
        runtime.close()
