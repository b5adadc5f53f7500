"""Host memory per large in-flight message: N requests of S bytes in flight to echo components.

Peak RSS growth (VmHWM, reset before each run) of one message is the transient conversion window
(wasmtime's value arrays; wasmhost.actors.conversion_budget lets one such window exist at a time);
the growth of N in-flight messages beyond that window, per message, is what each one costs the host;
and what stays resident once the burst is over and the budget's idle trim ran. Then guests that
themselves send large payloads (converted inside their own calls, budgeted from their next call on).
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path

import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor
from wasmhost.actors.conversion_budget import CONVERSIONS
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.core.message_size import DEFAULT_MAX_MESSAGE_BYTES
from wasmhost.runtime.malloc import release_free_memory
from wasmhost.runtime.runtime import Runtime

ECHOES = 8
MESSAGES = 64
SIZE = DEFAULT_MAX_MESSAGE_BYTES
MiB = 1024 * 1024
SENDERS = 6
SENDS = 5
SENT = 2 * MiB


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
    await _idle_trim()
    return peak - base, _status("VmRSS:") - base


async def _measure(runtime: Runtime) -> tuple[int, int, int]:
    async with bench_supervisor(runtime) as sup:
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


async def _senders(runtime: Runtime) -> tuple[int, int]:
    """(peak, kept) RSS growth while SENDERS guests each send SENDS payloads of SENT bytes to one echo."""
    async with bench_supervisor(runtime) as sup:
        sink = ComponentId("payload", "sink", "0")
        await sup.start(ActorSpec(sink, max_message_bytes=SENT + 1024), runtime.load(sink, FIXTURES / "echo.wasm"))
        senders = []
        for i in range(SENDERS):
            cid = ComponentId("payload", "blaster", str(i))
            await sup.start(ActorSpec(cid), runtime.load(cid, FIXTURES / "blaster.wasm"))
            senders.append(cid)
        command = f"s{SENT}|payload|sink|0".encode()
        gc.collect()
        release_free_memory()
        base = _status("VmRSS:")
        _reset_peak()

        async def sender(cid: ComponentId) -> None:
            for _ in range(SENDS):
                assert await sup.router.host_request(cid, command, 600.0) == b"ok"

        await asyncio.gather(*(sender(cid) for cid in senders))
        sink_actor = sup.actors[sink]
        while len(sink_actor.mailbox) or sink_actor.stats.handled < SENDERS * SENDS:
            await asyncio.sleep(0.05)
        peak = _status("VmHWM:") - base
        await _idle_trim()
        return peak, _status("VmRSS:") - base


async def _idle_trim() -> None:
    """Wait for the budget's next idle trim (bounded)."""
    trims = CONVERSIONS.idle_trims
    deadline = time.monotonic() + 10
    while CONVERSIONS.idle_trims == trims and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def run(seconds: float = 1.0) -> list[Row]:
    """Peak and retained RSS growth for one and for MESSAGES in-flight messages of SIZE bytes."""
    runtime = Runtime()
    try:
        single, peak, retained = uvloop.run(_measure(runtime))
        sent_peak, sent_kept = uvloop.run(_senders(runtime))
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
        Row("payload", f"{SENDERS} guests each sending {SENDS} x {SENT // MiB} MiB: peak RSS growth", 0.0,
            sent_peak / MiB, "MiB", None, at_most=True),
        Row("payload", f"{SENDERS} guests each sending {SENDS} x {SENT // MiB} MiB: RSS kept afterwards", 64.0,
            sent_kept / MiB, "MiB", 64.0, at_most=True),
    ]
