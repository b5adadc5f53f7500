"""Stop under a long-running guest: how long `stop` takes for a component in the middle of a call with a
ten-minute deadline (spinning, or sleeping in sleep-millis with a shutdown that traps), against
drain_timeout + shutdown_timeout + 100 ms; and a real daemon from SIGTERM to exit with both."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor, running_daemon
from wasmhost.actors.spec import ActorSpec
from wasmhost.core import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.client import request

DRAIN_S = 0.5
SHUTDOWN_S = 1.0
ROUNDS = 5
QUEUED = 100  # requests queued behind the long call, all answered by the stop
LONG = ResourceLimits(max_execution_time_ms=600_000)


async def _stop_times(runtime: Runtime, payload: bytes) -> list[float]:
    """Seconds each `stop` took, the component `payload`-busy (spin / sleep) for up to ten minutes."""
    samples = []
    async with bench_supervisor(runtime, drain_s=DRAIN_S) as sup:
        for round_ in range(ROUNDS):
            cid = ComponentId("bench", "stoptrap", str(round_))
            spec = ActorSpec(cid, limits=LONG, shutdown_timeout=SHUTDOWN_S)
            actor = await sup.start(spec, runtime.load(cid, FIXTURES / "stoptrap.wasm"))
            calls = [asyncio.ensure_future(sup.router.host_request(cid, payload, 600.0))]
            while len(actor.mailbox) or not actor.manager.in_call:
                await asyncio.sleep(0.001)
            calls += [asyncio.ensure_future(sup.router.host_request(cid, b"m", 600.0)) for _ in range(QUEUED)]
            await asyncio.sleep(0)
            began = time.perf_counter()
            await sup.stop(cid, DRAIN_S)
            samples.append(time.perf_counter() - began)
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
            assert len(results) == QUEUED + 1, "every request is answered"
    return samples


def _sigterm_exit() -> float:
    """Seconds from SIGTERM to exit for a daemon with a spinning and a sleeping ten-minute call."""
    hung = f"limits = {{ max_execution_time_ms = 600000 }}\nshutdown_timeout_s = {SHUTDOWN_S}\n"
    components = (f'[[components]]\nid = "b/spin/0"\npath = "stoptrap.wasm"\n{hung}'
                  f'[[components]]\nid = "b/sleep/0"\npath = "stoptrap.wasm"\n{hung}')
    with running_daemon(components, f"drain_timeout_s = {DRAIN_S}\n") as daemon:
        proc, sock = daemon.proc, daemon.socket
        for cid, payload in (("b/spin/0", b"spin"), ("b/sleep/0", b"sleep")):
            threading.Thread(target=request, args=(sock, protocol.Call(cid, payload, 600.0)),
                             kwargs={"timeout": 60}, daemon=True).start()
        time.sleep(0.3)  # the two calls arrive ...
        while any(r["queued"] for r in request(sock, protocol.Status()).data["components"]):
            time.sleep(0.01)  # ... and are taken: both guests are in their ten-minute calls
        began = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        return time.perf_counter() - began


def run(seconds: float = 1.0) -> list[Row]:
    """Worst stop time over a few rounds, spinning and sleeping; a daemon's SIGTERM-to-exit."""
    runtime = Runtime()
    try:
        spinning = uvloop.run(_stop_times(runtime, b"spin"))
        sleeping = uvloop.run(_stop_times(runtime, b"sleep"))
    finally:
        runtime.close()
    exit_s = _sigterm_exit()
    limit_ms = (DRAIN_S + SHUTDOWN_S) * 1000 + 100
    return [
        Row("stop", "spinning call", limit_ms, max(spinning) * 1000, "ms", limit_ms, at_most=True),
        Row("stop", "sleeping call", limit_ms, max(sleeping) * 1000, "ms", limit_ms, at_most=True),
        Row("stop", "SIGTERM exit", DRAIN_S + SHUTDOWN_S + 1, exit_s, "s", DRAIN_S + SHUTDOWN_S + 1, at_most=True),
    ]
