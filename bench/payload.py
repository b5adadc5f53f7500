"""Host memory per large in-flight message: N requests of S bytes in flight to echo components.

Peak RSS growth (VmHWM, reset before each run) of one message is the transient conversion window
(wasmtime's value arrays; wasmhost.actors.conversion_budget lets one such window exist at a time);
the growth of N in-flight messages beyond that window, per message, is what each one costs the host;
and what stays resident once the burst is over and the budget's idle trim ran.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import uvloop

from bench.harness import FIXTURES, Row
from wasmhost.actors.conversion_budget import CONVERSIONS
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId
from wasmhost.core.message_size import DEFAULT_MAX_MESSAGE_BYTES
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.malloc import release_free_memory
from wasmhost.runtime.runtime import Runtime

ECHOES = 8
MESSAGES = 64
SIZE = DEFAULT_MAX_MESSAGE_BYTES
MiB = 1024 * 1024


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


async def _burst(sup: Supervisor, targets: list[ComponentId], payloads: list[bytes]) -> tuple[int, int]:
    """(peak growth, retained growth) in bytes for sending `payloads` at once, round robin."""
    gc.collect()
    release_free_memory()
    base = _status("VmRSS:")
    _reset_peak()
    replies = await asyncio.gather(*(
        sup.router.host_request(targets[i % len(targets)], payload, 600.0, wait=True)
        for i, payload in enumerate(payloads)))
    peak = _status("VmHWM:")
    assert all(reply == payload for reply, payload in zip(replies, payloads, strict=True))
    del replies
    gc.collect()
    trims = CONVERSIONS.idle_trims
    deadline = time.monotonic() + 10
    while CONVERSIONS.idle_trims == trims and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the trim itself runs on an executor thread
    return peak - base, _status("VmRSS:") - base


async def _measure(runtime: Runtime) -> tuple[int, int, int]:
    workers = WorkerPool()
    sup = Supervisor(runtime, MessageRouter(asyncio.get_running_loop()), workers)
    try:
        targets = []
        for i in range(ECHOES):
            cid = ComponentId("payload", "echo", str(i))
            spec = ActorSpec(cid, mailbox_capacity=MESSAGES, max_message_bytes=SIZE)
            await sup.start(spec, runtime.load(cid, FIXTURES / "echo.wasm"))
            targets.append(cid)
        await _burst(sup, targets, [os.urandom(SIZE)])  # warm up: first-call allocations
        single, _ = await _burst(sup, targets[:1], [os.urandom(SIZE)])
        peak, retained = await _burst(sup, targets, [os.urandom(SIZE) for _ in range(MESSAGES)])
        return single, peak, retained
    finally:
        await sup.stop_all(1.0)
        workers.close()


def run(seconds: float = 1.0) -> list[Row]:
    """Peak and retained RSS growth for one and for MESSAGES in-flight messages of SIZE bytes."""
    runtime = Runtime()
    try:
        single, peak, retained = uvloop.run(_measure(runtime))
    finally:
        runtime.close()
    total = MESSAGES * SIZE
    per_message = (peak - single) / ((MESSAGES - 1) * SIZE)
    n = f"{MESSAGES} x {SIZE // 1024} KiB in flight to {ECHOES} echoes"
    return [
        Row("payload", f"{n}: peak RSS growth per message beyond the window / payload", 4.0, per_message, "x",
            4.0, at_most=True),
        Row("payload", f"{n}: peak RSS growth / all payload bytes (window included)", 6.0, peak / total, "x",
            None, at_most=True),
        Row("payload", f"1 x {SIZE // 1024} KiB: transient conversion window (budget {CONVERSIONS.total_bytes // 1024}"
            " KiB)", 256.0, single / MiB, "MiB", 256.0, at_most=True),
        Row("payload", f"{n}: RSS kept after the burst / payload", 1.0, retained / total, "x", 1.0,
            at_most=True),
    ]
