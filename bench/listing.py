"""list-components at 100 to 10,000 components: what one call costs a guest looping on it (the `lister`
fixture, many calls per message), and an echo neighbour's request p99 meanwhile, against its p99 beside a
guest computing without host calls (`busy`, which takes a core as the lister does). A real Supervisor
holding N echo components; `python -m bench.listing` also prints the echo's p99 beside idle guests."""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor, daemon_logging, echo_latencies_ms, frozen_heap
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.runtime.runtime import Runtime

SIZES = (100, 1_000, 10_000)
CALL_US_AT_SCALE = 20_000.0
"""One call at 10,000 components (116 ms when each id was lowered in Python; 6 - 9 ms kept lowered)."""
ECHO_P99_MS_AT_SCALE = 25.0
"""The echo's p99 beside the lister at 10,000 (51 - 75 ms before; 8 - 11 ms kept lowered, as beside any guest
calling a cheap host function in a loop: a log flood gave 12 ms in the same runs)."""
LISTER = ComponentId("list", "lister", "0")
BUSY = ComponentId("list", "busy", "0")
ECHO = ComponentId("list", "echo", "0")


async def _populate(sup: Supervisor, runtime: Runtime, count: int) -> None:
    """`count` echo components (one of them ECHO), the lister and the busy guest, all running."""
    echo = runtime.load(ECHO, FIXTURES / "echo.wasm")
    ids = [ECHO] + [ComponentId("list", "echo", str(i)) for i in range(1, count)]
    for start in range(0, len(ids), 500):
        await asyncio.gather(*(sup.start(ActorSpec(cid, health_interval=3600.0), echo)
                               for cid in ids[start:start + 500]))
    await sup.start(ActorSpec(LISTER, health_interval=3600.0), runtime.load(LISTER, FIXTURES / "lister.wasm"))
    await sup.start(ActorSpec(BUSY, health_interval=3600.0), runtime.load(BUSY, FIXTURES / "busy.wasm"))


async def _per_call_us(sup: Supervisor, seconds: float) -> tuple[float, int]:
    """Microseconds per list-components call inside one message of many calls; the length listed."""
    calls = 1
    while True:
        began = time.perf_counter()
        listed = await sup.router.host_request(LISTER, str(calls).encode(), 60.0)
        elapsed = time.perf_counter() - began
        if elapsed >= seconds / 4 or calls >= 1 << 20:
            return elapsed / calls * 1e6, int(listed or b"0")
        calls *= 2


async def _echo_p99_ms(sup: Supervisor, seconds: float, hog: ComponentId | None = None, payload: bytes = b"") -> float:
    """The echo's request p99 (ms) over `seconds`, while `hog` handles `payload` again and again (None:
    while the others idle)."""
    stop = False

    async def loop(target: ComponentId) -> None:
        while not stop:
            await sup.router.host_request(target, payload, 60.0)

    looping = asyncio.ensure_future(loop(hog)) if hog is not None else None
    samples = await echo_latencies_ms(sup, ECHO, seconds)
    stop = True
    if looping is not None:
        await looping
    samples.sort()
    return samples[max(0, int(len(samples) * 0.99) - 1)]


async def _measure(runtime: Runtime, seconds: float) -> list[Row]:
    rows = []
    for count in SIZES:
        async with bench_supervisor(runtime) as sup:
            await _populate(sup, runtime, count)
            with frozen_heap():
                us, listed = await _per_call_us(sup, seconds)
                assert listed == count + 2, (listed, count)
                idle = await _echo_p99_ms(sup, seconds)
                computing = await _echo_p99_ms(sup, seconds, BUSY, b"20000000")
                listing = await _echo_p99_ms(sup, seconds, LISTER, str(max(1, int(20_000 / us))).encode())  # ~20 ms
            print(f"{count:>6} ids: {us:10.1f} us/call ({us / (count + 2):.3f} us/id); echo p99 idle "
                  f"{idle:.2f} ms, beside a computing guest {computing:.2f} ms, beside the looping lister "
                  f"{listing:.2f} ms", file=sys.stderr, flush=True)
            at_scale = count == SIZES[-1]
            rows += [Row("listing", f"call, {count} ids", CALL_US_AT_SCALE if at_scale else 0.0, us, "us",
                         CALL_US_AT_SCALE if at_scale else None, at_most=True),
                     Row("listing", f"echo p99, {count}", ECHO_P99_MS_AT_SCALE if at_scale else computing, listing,
                         "ms", ECHO_P99_MS_AT_SCALE if at_scale else None, at_most=at_scale)]
    return rows


def run(seconds: float = 1.0) -> list[Row]:
    """list-components per call and a neighbour's p99 at each of SIZES components (the p99's baseline: beside
    a guest computing without host calls)."""
    runtime = Runtime()
    try:
        with daemon_logging():  # as in the daemon: the lines of 10,000 starts and stops off this thread, to /dev/null
            return uvloop.run(_measure(runtime, seconds))
    finally:
        runtime.close()


if __name__ == "__main__":
    run(2.0)
