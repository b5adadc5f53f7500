"""Fairness: one guest in an endless loop (until its deadline) and one computing for seconds within
its limits, while 10 other components answer requests; and how late the runaway is stopped."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import uvloop

from bench.harness import FIXTURES, Row
from wasmhost.actors.restart import RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.runtime import Runtime

RUNAWAY_DEADLINE_MS = 2000
BUSY_ITERATIONS = b"2500000000"  # a few seconds of guest arithmetic, within a 60 s limit


async def _start(sup: Supervisor, fixture: str, cid: ComponentId, limits: ResourceLimits) -> None:
    spec = ActorSpec(cid, limits=limits, restart=RestartPolicy.TEMPORARY)
    await sup.start(spec, sup.runtime.load(cid, FIXTURES / f"{fixture}.wasm"))


async def _measure(runtime: Runtime) -> tuple[float, float, float, float]:
    workers = WorkerPool()
    sup = Supervisor(runtime, MessageRouter(asyncio.get_running_loop()), workers)
    try:
        echoes = [ComponentId("fair", "echo", str(i)) for i in range(10)]
        for cid in echoes:
            await _start(sup, "echo", cid, ResourceLimits())
        runaway, busy = ComponentId("fair", "runaway", "0"), ComponentId("fair", "busy", "0")
        await _start(sup, "spinner", runaway, ResourceLimits(max_execution_time_ms=RUNAWAY_DEADLINE_MS))
        await _start(sup, "busy", busy, ResourceLimits(max_execution_time_ms=60_000))

        async def stopped_after() -> float:
            began = time.perf_counter()
            with contextlib.suppress(RequestFailed):
                await sup.router.host_request(runaway, b"spin", 30.0)
            return time.perf_counter() - began

        runaway_task = asyncio.ensure_future(stopped_after())
        busy_task = asyncio.ensure_future(sup.router.host_request(busy, BUSY_ITERATIONS, 60.0))
        await asyncio.sleep(0.05)
        samples = []
        end = time.perf_counter() + RUNAWAY_DEADLINE_MS / 1000 - 0.2
        while time.perf_counter() < end:
            began = time.perf_counter()
            await sup.router.host_request(random.choice(echoes), b"ping", 5.0)
            samples.append((time.perf_counter() - began) * 1000)
            await asyncio.sleep(0.001)
        assert not busy_task.done(), "the busy guest should still be computing"
        overshoot = (await runaway_task) * 1000 - RUNAWAY_DEADLINE_MS
        busy_started = time.perf_counter()
        await busy_task
        samples.sort()
        return samples[len(samples) // 2], samples[int(len(samples) * 0.99) - 1], overshoot, busy_started
    finally:
        await sup.stop_all(1.0)
        workers.close()


def run(seconds: float = 1.0) -> list[Row]:
    """p50/p99 of requests to 10 echo components while two guests hog threads; runaway lateness."""
    runtime = Runtime()
    try:
        p50, p99, overshoot, _ = uvloop.run(_measure(runtime))
        tick = runtime.engine.tick_ms
    finally:
        runtime.close()
    return [
        Row("fairness", "others p50", 5.0, p50, "ms", 5.0, at_most=True),
        Row("fairness", "others p99", 5.0, p99, "ms", 5.0, at_most=True),
        Row("fairness", "runaway late", float(tick), overshoot, "ms", float(tick), at_most=True),
    ]
