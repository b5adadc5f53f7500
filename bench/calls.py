"""Call path: wasmtime-py's generic `Func.__call__` vs our typed path, `handle-message` on echo."""

from __future__ import annotations

import os

import wasmtime
from wasmtime import component as wc

from bench.harness import FIXTURES, Row, rate
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.runtime import contract
from wasmhost.runtime.runtime import Runtime

SIZES: list[tuple[int, str, float | None]] = [
    (0, "0 B", None), (64, "64 B", 25.0), (4096, "4 KiB", 25.0), (65536, "64 KiB", 25.0), (1 << 20, "1 MiB", 10.0),
]


def _record(**fields: object) -> wc.Record:
    record = wc.Record()
    for name, value in fields.items():
        setattr(record, name.replace("_", "-"), value)
    return record


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
        return rows
    finally:
        runtime.close()
