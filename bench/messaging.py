"""Guest-to-guest messaging against the host's own sends, measured in the same run.

- baseline: the host sends 16 B messages to an echo as fast as its mailbox takes them; the rate is
  messages handled per second (all of them, waited for).
- request round trips: pinger chains (tests/fixtures/wat/pinger.wat) each request a number from an
  echo and request again from their `handle-callback`; the rate is round trips per second (each one a
  guest `request`, the echo's `handle-message` and the pinger's `handle-callback`).
- send chain: relay tokens circulate around a ring of pingers, each hop a guest `send` to the next;
  the rate is hops handled per second.

The three are measured in alternating short windows and each guest row is the median of its windows'
ratios to the baseline window beside it (bench.harness.alternated), so the machine's load moves both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from bench.harness import FIXTURES, Row, alternated, bench_supervisor, on_uvloop
from wasmhost.actors.actor import ComponentActor
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.runtime.runtime import Runtime

IN_FLIGHT = 64
"""Request chains, and relay tokens, kept going at once (the host baseline keeps its mailbox full)."""
RING = 3
"""Relays in the send chain's ring."""
ENDLESS = 10**15
"""A chain or token length no run reaches: the benchmark stops the actors instead."""
PAYLOAD = b"0123456789abcdef"


async def _start(sup: Supervisor, fixture: str, name: str) -> ComponentActor:
    cid = ComponentId("bench", name, "0")
    spec = ActorSpec(cid, mailbox_capacity=4096)
    return await sup.start(spec, sup.stores.runtime.load(cid, FIXTURES / f"{fixture}.wasm"))


def _address(actor: ComponentActor) -> str:
    cid = actor.component_id
    return f"{cid.namespace}|{cid.name}|{cid.instance}"


async def _host_send_rate(sup: Supervisor, echo: ComponentActor, seconds: float) -> float:
    """16 B host sends to `echo` per second, counting only once every one was handled."""
    before = echo.stats.handled
    sent = 0
    began = time.perf_counter()
    stop = began + seconds
    while time.perf_counter() < stop:
        for _ in range(64):
            await sup.router.host_send(echo.component_id, PAYLOAD, wait=True, timeout=30.0)
        sent += 64
    await _until(lambda: echo.stats.handled - before >= sent, 30.0)
    return sent / (time.perf_counter() - began)


async def _until(condition: Callable[[], bool], timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > end:
            raise RuntimeError("the benchmark's messages were not all handled in time")
        await asyncio.sleep(0.001)


async def _counted_rate(count: Callable[[], int], seconds: float) -> float:
    """Growth per second of `count` over `seconds`, after a short warm-up."""
    await asyncio.sleep(0.1)
    first, began = count(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (count() - first) / (time.perf_counter() - began)


async def _round_trip_rate(sup: Supervisor, seconds: float) -> float:
    echo = await _start(sup, "echo", "rt-echo")
    pinger = await _start(sup, "pinger", "rt-pinger")
    for _ in range(IN_FLIGHT):
        await sup.router.host_request(pinger.component_id, f"{_address(echo)}|{ENDLESS}".encode(), 5.0)
    rate = await _counted_rate(lambda: echo.stats.handled, seconds)
    await sup.remove(pinger.component_id, 1.0)  # removed, not only stopped: the next window starts them again
    await sup.remove(echo.component_id, 1.0)
    return rate


async def _send_chain_rate(sup: Supervisor, seconds: float) -> float:
    relays = [await _start(sup, "pinger", f"relay-{i}") for i in range(RING)]
    route = ";".join(_address(r) for r in relays[1:] + relays[:1])
    for _ in range(IN_FLIGHT):
        await sup.router.host_send(relays[0].component_id, f">{ENDLESS};{route}".encode(), wait=True, timeout=5.0)
    rate = await _counted_rate(lambda: sum(r.stats.handled for r in relays), seconds)
    for relay in relays:
        await sup.remove(relay.component_id, 1.0)
    return rate


async def _measure(runtime: Runtime, seconds: float) -> list[Row]:
    async with bench_supervisor(runtime) as sup:
        echo = await _start(sup, "echo", "echo")
        # each window of a guest row starts its actors and chains afresh (and stops them after it), so
        # nothing of theirs runs during the baseline's windows; their 0.1 s warm-up is outside the window
        result = await alternated(lambda window: _host_send_rate(sup, echo, window),
                                  [lambda window: _round_trip_rate(sup, window),
                                   lambda window: _send_chain_rate(sup, window)], seconds)
        await sup.stop(echo.component_id, 1.0)
    return [
        Row("messaging", "host send->echo", result.baseline, result.baseline, "msg/s", None),
        Row("messaging", "guest req->reply", result.baseline, result.measured(0), "trips/s", 0.35),
        Row("messaging", "guest send chain", result.baseline, result.measured(1), "hops/s", 0.7),
    ]


def run(seconds: float = 1.0) -> list[Row]:
    """Run the guest-to-guest messaging benchmarks on a uvloop event loop, as the daemon does."""
    return on_uvloop(_measure, seconds)
