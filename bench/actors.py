"""Message path: full actor path (enqueue -> actor -> guest -> reply) vs direct typed calls, scaling
over two CPU-bound actors, and the latency of an idle actor while another runs a long guest loop."""

from __future__ import annotations

import asyncio
import os
import statistics
import time

from bench.harness import FIXTURES, Row, bench_supervisor, on_uvloop, rate
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentConfig, ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime.runtime import Runtime

WINDOW = 512  # requests kept in flight by the load generator
BUSY_ITERATIONS = b"1000000"  # guest work per message (about 1 ms) for the CPU-bound scaling case


def _direct_rate(runtime: Runtime, fixture: str, payload: bytes, seconds: float) -> float:
    cid = ComponentId("bench", "direct", "0")
    manager = runtime.store(runtime.load(cid, FIXTURES / f"{fixture}.wasm"), cid)
    manager.instantiate()
    manager.initialize(ComponentConfig())
    message = ComponentMessage(cid, payload, MessageMetadata(timestamp=Timestamp.now()))
    try:
        return rate(lambda: manager.handle_message(message), seconds)
    finally:
        manager.close()


async def _pipelined_rate(sup: Supervisor, targets: list[ComponentId], payload: bytes, seconds: float) -> float:
    """Messages/s answered when every target has WINDOW / len(targets) requests in flight."""
    done = 0
    stop = time.perf_counter() + seconds

    async def client(target: ComponentId) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await sup.router.host_request(target, payload, 30.0, wait=True)
            done += 1

    began = time.perf_counter()
    per_target = WINDOW // len(targets)
    await asyncio.gather(*(client(t) for t in targets for _ in range(per_target)))
    return done / (time.perf_counter() - began)


async def _start(sup: Supervisor, fixture: str, name: str, **limits: int) -> ComponentId:
    cid = ComponentId("bench", name, "0")
    spec = ActorSpec(cid, limits=ResourceLimits(**limits), mailbox_capacity=4096)
    await sup.start(spec, sup.stores.runtime.load(cid, FIXTURES / f"{fixture}.wasm"))
    return cid


async def _latency_under_load(sup: Supervisor) -> tuple[float, float]:
    """p50 and p99 (ms) of small requests to an idle echo while another actor loops for ~2 s."""
    echo = await _start(sup, "echo", "idle-echo")
    spinner = await _start(sup, "spinner", "spinner", max_execution_time_ms=2000)
    spin = asyncio.ensure_future(sup.router.host_request(spinner, b"spin", 10.0))
    await asyncio.sleep(0.05)
    samples = []
    end = time.perf_counter() + 1.5
    while time.perf_counter() < end:
        began = time.perf_counter()
        await sup.router.host_request(echo, b"ping", 5.0)
        samples.append((time.perf_counter() - began) * 1000)
        await asyncio.sleep(0.002)
    await asyncio.gather(spin, return_exceptions=True)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


async def _measure(runtime: Runtime, seconds: float) -> list[Row]:
    rows: list[Row] = []
    async with bench_supervisor(runtime) as sup:
        echo = await _start(sup, "echo", "echo")
        for size, label in ((64, "64 B"), (4096, "4 KiB")):
            payload = os.urandom(size)
            direct = await asyncio.to_thread(_direct_rate, runtime, "echo", payload, seconds)
            full = await _pipelined_rate(sup, [echo], payload, seconds)
            rows.append(Row("actors", f"1 actor {label}", direct, full, "msg/s", 0.5))
        busy = [await _start(sup, "busy", f"busy-{i}") for i in range(2)]
        one = await _pipelined_rate(sup, busy[:1], BUSY_ITERATIONS, seconds)
        two = await _pipelined_rate(sup, busy, BUSY_ITERATIONS, seconds)
        rows.append(Row("actors", "2 busy actors", one, two, "msg/s", 1.7))
        p50, p99 = await _latency_under_load(sup)
        rows.append(Row("actors", "idle p50", 5.0, p50, "ms", 5.0, at_most=True))
        rows.append(Row("actors", "idle p99", 5.0, p99, "ms", 5.0, at_most=True))
    return rows


def run(seconds: float = 1.0) -> list[Row]:
    """Run the actor benchmarks on a uvloop event loop, as the daemon does."""
    return on_uvloop(_measure, seconds)

