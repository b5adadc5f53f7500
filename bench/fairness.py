"""Fairness: one guest in an endless loop (until its deadline) and one computing for seconds within
its limits, while 10 other components answer requests; and how late the runaway is stopped. Then
4 to 1,024 spinners, each looping until its 1.5 s deadline, time-sliced over the worker threads
while an idle echo answers requests: its p99, how late the last spinner is stopped, the thread
count and the memory of each suspended call."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass

import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor, daemon_logging, frozen_heap
from wasmhost.actors.restart import RestartPolicy
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.runtime import Runtime

RUNAWAY_DEADLINE_MS = 2000
SPINNER_DEADLINE_MS = 1500
SPINNER_TARGETS = {4: 20.0, 32: 50.0, 256: 100.0, 1024: 100.0}
"""Spinners running at once -> the idle echo's request p99 target (ms)."""
BUSY_ITERATIONS = b"2500000000"  # a few seconds of guest arithmetic, within a 60 s limit


async def _start(sup: Supervisor, fixture: str, cid: ComponentId, limits: ResourceLimits) -> None:
    spec = ActorSpec(cid, limits=limits, restart=RestartPolicy.TEMPORARY)
    await sup.start(spec, sup.stores.runtime.load(cid, FIXTURES / f"{fixture}.wasm"))


async def _measure(runtime: Runtime) -> tuple[float, float, float, float]:
    async with bench_supervisor(runtime) as sup:
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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@dataclass
class Spinning:
    """What one run with `count` spinners measured."""

    count: int
    p99_ms: float
    worst_late_ms: float  # the Store's call ended (the guest stopped running)
    worst_reply_late_ms: float  # the requester got the timeout
    threads: int
    suspended_call_bytes: float


async def _spinners(runtime: Runtime, count: int) -> Spinning:
    """`count` spinners loop until their deadline while an idle echo answers requests."""
    async with bench_supervisor(runtime) as sup:
        echo = ComponentId("spin", "echo", "0")
        await _start(sup, "echo", echo, ResourceLimits())
        ids = [ComponentId("spin", "spinner", str(i)) for i in range(count)]
        limits = ResourceLimits(max_execution_time_ms=SPINNER_DEADLINE_MS)
        for cid in ids:
            await _start(sup, "spinner", cid, limits)
        # Frozen, as the daemon freezes what a deployment built (system/heap.py): otherwise a full
        # collection of this process's heap (130 ms measured, mid-storm) is counted as lateness.
        with frozen_heap():
            managers = [sup.actors[cid].manager for cid in ids]
            idle_rss = _rss_bytes()
            ended: dict[int, float] = {}

            async def spin(index: int) -> None:
                with contextlib.suppress(RequestFailed):
                    await sup.router.host_request(ids[index], b"spin", 30.0)
                ended[index] = time.monotonic()

            tasks = [asyncio.ensure_future(spin(i)) for i in range(count)]
            # Wait until every spinner is inside its call (suspended between slices or running one).
            while not all(m.in_call for m in managers):
                if any(task.done() for task in tasks):
                    raise RuntimeError(f"a spinner ended before all {count} had started: the machine is too slow")
                await asyncio.sleep(0.005)
            deadlines = [m.host.deadline for m in managers]
            suspended_rss = _rss_bytes()
            samples = []
            end = min(deadlines) - 0.05
            while time.monotonic() < end:
                began = time.perf_counter()
                await sup.router.host_request(echo, b"ping", 5.0)
                samples.append((time.perf_counter() - began) * 1000)
                await asyncio.sleep(0.002)
            assert not any(task.done() for task in tasks), "every spinner should still be running"
            threads = threading.active_count()
            await asyncio.gather(*tasks)
            samples.sort()
            late = max(m.failed_at - deadline for m, deadline in zip(managers, deadlines, strict=True)) * 1000
            reply_late = max(ended[i] - deadlines[i] for i in range(count)) * 1000
            p99 = samples[max(0, int(len(samples) * 0.99) - 1)] if samples else float("nan")
            return Spinning(count, p99, late, reply_late, threads, (suspended_rss - idle_rss) / count)


def run(seconds: float = 1.0) -> list[Row]:
    """p50/p99 of requests to 10 echo components while two guests hog threads; runaway lateness;
    an idle echo's p99 next to 4 - 1,024 spinners."""
    runtime = Runtime()
    try:
        with daemon_logging():  # every failure logs its lines, as the daemon writes them
            p50, p99, overshoot, _ = uvloop.run(_measure(runtime))
            spinning = [uvloop.run(_spinners(runtime, count)) for count in SPINNER_TARGETS]
        tick = float(runtime.engine.tick_ms)
    finally:
        runtime.close()
    rows = [
        Row("fairness", "others p50", 5.0, p50, "ms", 5.0, at_most=True),
        Row("fairness", "others p99", 5.0, p99, "ms", 5.0, at_most=True),
        Row("fairness", "runaway late", tick, overshoot, "ms", tick, at_most=True),
    ]
    for s in spinning:
        target = SPINNER_TARGETS[s.count]
        rows += [
            Row("fairness", f"echo p99 {s.count} sp", target, s.p99_ms, "ms", target, at_most=True),
            Row("fairness", f"late {s.count} sp", tick, s.worst_late_ms, "ms", tick, at_most=True),
            Row("fairness", f"reply late {s.count}", 0.0, s.worst_reply_late_ms, "ms", None),
            Row("fairness", f"threads {s.count} sp", float(s.threads), float(s.threads), "threads", None),
            Row("fairness", f"KiB/call {s.count} sp", 0.0, s.suspended_call_bytes / 1024, "KiB", None),
        ]
    return rows
