"""Call path: wasmtime-py's generic `Func.__call__` vs our typed path, `handle-message` on echo; and
what making every call a sliced async call costs against the same typed call made synchronously."""

from __future__ import annotations

import ctypes
import os

import wasmtime
from wasmtime import component as wc

from bench.harness import FIXTURES, Row, rate
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.runtime import capi, contract
from wasmhost.runtime.capi import VAL_SIZE
from wasmhost.runtime.message_arg import message_argument
from wasmhost.runtime.runtime import Runtime

ASYNC_TARGET = 0.8
"""Async (preemptible) typed calls must keep this share of the synchronous typed call rate."""

SIZES: list[tuple[int, str, float | None]] = [
    (0, "0 B", None), (64, "64 B", 25.0), (4096, "4 KiB", 25.0), (65536, "64 KiB", 25.0), (1 << 20, "1 MiB", 10.0),
]


def _record(**fields: object) -> wc.Record:
    record = wc.Record()
    for name, value in fields.items():
        setattr(record, name.replace("_", "-"), value)
    return record


def _sync_typed(store: wasmtime.Store, func: wc.Func, result: object, message: ComponentMessage) -> object:
    """Our typed call made synchronously on a Store without fuel yields: the path before preemption."""
    argument = message_argument()
    address = argument.fill(message)
    out = (ctypes.c_uint8 * VAL_SIZE)()
    error = capi.func_call(
        ctypes.addressof(func._func), capi.addr_of(store._context()), address, 1, ctypes.addressof(out), 1
    )
    argument.clear()
    if error:
        raise RuntimeError(capi.take_error(error))
    try:
        return result.lift_parts(ctypes.addressof(out))  # type: ignore[attr-defined]
    finally:
        capi.val_delete(ctypes.addressof(out))


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
            assert generic(store, record) == payload and ours.handle_message(message) == payload
            base = rate(lambda: generic(store, record), seconds)  # noqa: B023
            typed = rate(lambda: ours.handle_message(message), seconds)  # noqa: B023
            rows.append(Row("calls", label, base, typed, "calls/s", target))
            if size == 64:
                sync = rate(lambda: _sync_typed(store, generic, ours.loaded.exports["handle-message"].result,
                                                message), seconds)  # noqa: B023
                typed = rate(lambda: ours.handle_message(message), seconds)  # noqa: B023
                rows.append(Row("calls", "async 64 B", sync, typed, "calls/s", ASYNC_TARGET))
        return rows
    finally:
        runtime.close()
