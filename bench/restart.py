"""Restart cost: a trapping component back in service (new Store, initialize done)."""

from __future__ import annotations

import contextlib
import statistics
import time

import anyio
import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor, daemon_logging
from wasmhost.actors.restart import Backoff, Intensity
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.state import ActorState
from wasmhost.core import ComponentId
from wasmhost.messaging.outcome import RequestFailed
from wasmhost.runtime.runtime import Runtime

ROUNDS = 200
RESTART_TIMEOUT_S = 5.0
"""A restart not back in service by then fails the benchmark instead of hanging it."""


async def _measure(runtime: Runtime) -> list[float]:
    cid = ComponentId("bench", "trapper", "0")
    # No deliberate backoff: this measures the restart itself, not the policy's wait.
    spec = ActorSpec(cid, backoff=Backoff(base=0.0, maximum=0.0), intensity=Intensity(ROUNDS + 10, 3600))
    samples = []
    async with bench_supervisor(runtime) as sup:
        actor = await sup.start(spec, runtime.load(cid, FIXTURES / "trapper.wasm"))
        for _ in range(ROUNDS):
            restarted = actor.next_attempt()  # set when the boot after the trap has ended
            began = time.perf_counter()
            with contextlib.suppress(RequestFailed):
                await sup.router.host_request(cid, b"boom", 5.0)
            with anyio.fail_after(RESTART_TIMEOUT_S):
                await restarted.wait()  # not polled: a polling loop would take the GIL from the booting worker
            if actor.state is not ActorState.RUNNING or actor.manager.state.value != "initialized":
                raise RuntimeError(f"{cid} is {actor.state.value} after its restart, not running")
            samples.append(time.perf_counter() - began)
    return samples


def _direct(runtime: Runtime) -> list[float]:
    """The bare cost: new Store, instantiate, initialize, on the calling thread."""
    from wasmhost.core import ComponentConfig

    cid = ComponentId("bench", "direct-trapper", "0")
    manager = runtime.store(runtime.load(cid, FIXTURES / "trapper.wasm"), cid)
    samples = []
    for _ in range(ROUNDS):
        began = time.perf_counter()
        manager.instantiate()
        manager.initialize(ComponentConfig())
        samples.append(time.perf_counter() - began)
    manager.close()
    return samples


def run(seconds: float = 1.0) -> list[Row]:
    """p50 of the trap-to-running time through the actor system, and of the bare re-instantiation."""
    runtime = Runtime()
    try:
        with daemon_logging():  # each restart logs two lines, as the daemon writes them
            through_actor = uvloop.run(_measure(runtime))
        direct = _direct(runtime)
    finally:
        runtime.close()
    return [
        Row("restart", "actor p50", 1.0, statistics.median(through_actor) * 1000, "ms", 1.0, at_most=True),
        Row("restart", "store p50", 1.0, statistics.median(direct) * 1000, "ms", 1.0, at_most=True),
    ]
