"""The lattice across two daemons on this machine and a nats-server, all subprocesses, measured against
the same traffic kept on one host in the same run.

- host req: `wasmhost call`'s path (the control socket, the daemon's host request) to an echo, CONCURRENCY
  requests in flight over as many connections: to host A's own echo (the baseline), then from host A to an
  echo only host B runs (every request and reply crosses NATS). Target: >= 0.3x.
- p99 at half the cross-host peak rate: requests paced (open loop) at half the rate just measured, latency
  from each one's scheduled start to its reply (so a stall counts against every request it delays); the
  same pace to host A's own echo is shown beside it (what the machine gives without the hop).
- guest req: pinger request chains on host A (tests/fixtures/wat/pinger.wat) to an echo on host A, then to
  the echo on host B: guest-to-guest round trips per second (no target: what crossing hosts costs guests).
- cpu replicas: a CPU-bound component (hasher) called by a plain NATS client (external ingress, queue group)
  with host B's replica only, then with host A's as well, three times over: the throughput of two replica
  hosts against one (medians).
  Target: >= 1.6x.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

from bench.harness import Daemon, Row, frozen_heap, running_daemon
from wasmhost.core.ids import ComponentId
from wasmhost.lattice import wire
from wasmhost.system import protocol

CONCURRENCY = 16
"""Host requests (and control connections) in flight in the rate rows."""
CHAINS = 16
"""Pinger request chains kept going at once in the guest rows."""
ENDLESS = 10**15
"""A chain length no run reaches: the benchmark stops the pinger instead."""
HASH_ITERATIONS = 2_000_000
"""Work per message of the CPU-bound rows (a few milliseconds of guest time)."""
HASH_IN_FLIGHT = 8
"""External requests in flight to the hasher replicas."""
REPLICA_TURNS = 3
"""Alternating windows of one and of two replica hosts."""
CALL_TIMEOUT = 10.0
SETTLE_TIMEOUT = 60.0
"""Seconds for a daemon's directory to show what the other host runs (or stopped running)."""
TARGET_RATIO = 0.3
TARGET_P99_MS = 5.0
TARGET_REPLICAS = 1.6
LATTICE = "bench"

ECHO = ComponentId("bench", "echo", "0")  # host A
REMOTE_ECHO = ComponentId("bench", "recho", "0")  # host B only
LOCAL_PINGER = ComponentId("bench", "lpinger", "0")  # host A, chains to ECHO
REMOTE_PINGER = ComponentId("bench", "xpinger", "0")  # host A, chains to REMOTE_ECHO
HASHER = ComponentId("bench", "hash", "0")  # both hosts: replicas


def _component(cid: ComponentId, fixture: str, extra: str = "") -> str:
    return f'[[components]]\nid = "{cid}"\npath = "{fixture}.wasm"\nmailbox_capacity = 4096\n{extra}\n'


def _lattice(url: str, host: str, grants: str = "") -> str:
    return f'[lattice]\nname = "{LATTICE}"\nurls = ["{url}"]\nhost_id = "{host}"\nheartbeat_s = 0.5\n{grants}\n'


def host_a(url: str) -> str:
    """Host A's [lattice] and components."""
    pinger = 'capabilities = { request = ["bench/*"] }'
    return (_lattice(url, "host-a") + _component(ECHO, "echo") + _component(LOCAL_PINGER, "pinger", pinger)
            + _component(REMOTE_PINGER, "pinger", pinger) + _component(HASHER, "hasher", "accept_external = true"))


def host_b(url: str) -> str:
    """Host B's [lattice] (host A's remote pinger may request its echo) and components."""
    grant = f'[[lattice.grants]]\nid = "{REMOTE_PINGER}"\nrequest = ["{REMOTE_ECHO}"]\n'
    return (_lattice(url, "host-b", grant) + _component(REMOTE_ECHO, "echo")
            + _component(HASHER, "hasher", "accept_external = true"))


class Control:
    """One connection to a daemon's control socket, used for one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Control:
        """Connect to the control socket at `path`."""
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def ask(self, message: Any) -> protocol.Response:
        """Send one request and read its response."""
        self.writer.write(protocol.frame(message))
        length = protocol.frame_length(await self.reader.readexactly(protocol.LENGTH.size), protocol.MAX_RESPONSE_FRAME)
        return protocol.response_decoder.decode(await self.reader.readexactly(length))

    async def call(self, target: ComponentId, payload: bytes) -> bytes | None:
        """A host request; raises RuntimeError with the daemon's error when it failed."""
        response = await self.ask(protocol.Call(str(target), payload, CALL_TIMEOUT))
        if not response.ok:
            raise RuntimeError(f"call {target}: {response.error}")
        return response.data  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the connection."""
        self.writer.close()


async def _connections(path: Path, count: int) -> list[Control]:
    return [await Control.open(path) for _ in range(count)]


async def _rate(path: Path, target: ComponentId, seconds: float) -> float:
    """Host requests to `target` per second through daemon `path`, CONCURRENCY in flight, every reply checked."""
    conns = await _connections(path, CONCURRENCY)
    done = 0
    payload = b"0123456789abcdef"

    async def loop(conn: Control, until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            if await conn.call(target, payload) != payload:
                raise RuntimeError(f"{target} answered something other than the echo")
            done += 1

    try:
        await asyncio.gather(*(loop(c, time.perf_counter() + 0.2) for c in conns))  # warm up
        done = 0
        began = time.perf_counter()
        await asyncio.gather(*(loop(c, began + seconds) for c in conns))
        return done / (time.perf_counter() - began)
    finally:
        for c in conns:
            c.close()


async def _paced_p99(path: Path, target: ComponentId, rate: float, seconds: float) -> float:
    """p99 latency (ms) of host requests to `target` sent at `rate` per second (open loop: each from its
    scheduled moment, on whichever connection is free)."""
    conns = await _connections(path, CONCURRENCY)
    free: asyncio.Queue[Control] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    count = max(50, int(rate * seconds))
    latencies: list[float] = []

    async def one(scheduled: float) -> None:
        conn = await free.get()
        try:
            await conn.call(target, b"0123456789abcdef")
            latencies.append(time.perf_counter() - scheduled)
        finally:
            free.put_nowait(conn)

    try:
        with frozen_heap():  # the generator's own collections are not the daemons' latency
            began = time.perf_counter() + 0.05
            tasks = []
            for i in range(count):
                scheduled = began + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the load generator itself, not waiting for a result
                tasks.append(asyncio.ensure_future(one(scheduled)))
            await asyncio.gather(*tasks)
    finally:
        for c in conns:
            c.close()
    latencies.sort()
    return latencies[min(len(latencies) - 1, math.ceil(len(latencies) * 0.99) - 1)] * 1000


async def _handled(path: Path, cid: ComponentId) -> int:
    conn = await Control.open(path)
    try:
        response = await conn.ask(protocol.Status())
    finally:
        conn.close()
    for row in response.data["components"]:
        if row["id"] == str(cid):
            return int(row["handled"])
    raise RuntimeError(f"{cid} is not in the status of {path}")


async def _counted_rate(count: Callable[[], Awaitable[int]], seconds: float) -> float:
    await asyncio.sleep(0.2)  # warm up: the chains are under way
    first, began = await count(), time.perf_counter()
    await asyncio.sleep(seconds)
    return (await count() - first) / (time.perf_counter() - began)


async def _guest_rate(a: Daemon, pinger: ComponentId, echo_daemon: Daemon, echo: ComponentId,
                      seconds: float) -> float:
    """Round trips per second of CHAINS pinger chains on host A to `echo`, counted by the echo's handled
    messages; the pinger is stopped afterwards (its chains end with it)."""
    conn = await Control.open(a.socket)
    try:
        route = f"{echo.namespace}|{echo.name}|{echo.instance}|{ENDLESS}".encode()
        for _ in range(CHAINS):
            await conn.call(pinger, route)
        rate = await _counted_rate(lambda: _handled(echo_daemon.socket, echo), seconds)
        stopped = await conn.ask(protocol.Stop(str(pinger)))
        if not stopped.ok:
            raise RuntimeError(f"stop {pinger}: {stopped.error}")
        return rate
    finally:
        conn.close()


async def _lattice_rows(path: Path) -> list[tuple[str, str, str]]:
    conn = await Control.open(path)
    try:
        response = await conn.ask(protocol.LatticeStatus())
    finally:
        conn.close()
    if not response.ok:
        raise RuntimeError(f"status --lattice: {response.error}")
    return [(c["id"], c["host"], c["state"]) for c in response.data["components"]]


async def _until_seen(path: Path, wanted: Callable[[list[tuple[str, str, str]]], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while not wanted(await _lattice_rows(path)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {SETTLE_TIMEOUT:g} s")
        await asyncio.sleep(0.05)  # another process's directory: polled


async def _hash_rate(url: str, seconds: float) -> float:
    """Hasher requests per second from a plain NATS client (HASH_IN_FLIGHT in flight), every answer a reply."""
    import nats

    nc = await nats.connect(url)
    subject = wire.Subjects(LATTICE).ingress(HASHER)
    headers = {wire.KIND: wire.KIND_REQUEST, wire.SENDER: "external/bench/load",
               wire.TIMEOUT_MS: str(int(CALL_TIMEOUT * 1000))}
    done = 0

    async def loop(until: float) -> None:
        nonlocal done
        while time.perf_counter() < until:
            msg = await nc.request(subject, str(HASH_ITERATIONS).encode(), timeout=CALL_TIMEOUT, headers=headers)
            outcome = (msg.headers or {}).get(wire.OUTCOME)
            if outcome != wire.REPLY:
                raise RuntimeError(f"hasher answered {outcome}: {(msg.headers or {}).get(wire.DETAIL)}")
            done += 1

    try:
        await asyncio.gather(*(loop(time.perf_counter() + 0.3) for _ in range(HASH_IN_FLIGHT)))  # warm up
        done = 0
        began = time.perf_counter()
        await asyncio.gather(*(loop(began + seconds) for _ in range(HASH_IN_FLIGHT)))
        return done / (time.perf_counter() - began)
    finally:
        await nc.close()


async def _replica_rates(a: Daemon, b: Daemon, url: str, seconds: float) -> tuple[float, float]:
    """(one replica host, two replica hosts) hasher throughput, medians of REPLICA_TURNS alternating
    windows each (two daemons, nats-server and the client share 2 cores: one window moves with the
    machine): host A's replica is stopped, measured, started, measured, and again."""
    conn = await Control.open(a.socket)
    ones, twos = [], []

    async def host_a_runs_it(running: bool) -> None:
        answer = await conn.ask(protocol.Start(str(HASHER)) if running else protocol.Stop(str(HASHER)))
        if not answer.ok:
            raise RuntimeError(f"{'start' if running else 'stop'} {HASHER} on host A: {answer.error}")
        await _until_seen(b.socket, lambda rows: ((str(HASHER), "host-a", "running") in rows) == running,
                          f"host B sees host A's hasher {'running' if running else 'stopped'}")

    try:
        for _ in range(REPLICA_TURNS):
            await host_a_runs_it(False)
            ones.append(await _hash_rate(url, seconds))
            await host_a_runs_it(True)
            twos.append(await _hash_rate(url, seconds))
        print(f"lattice: hasher req/s, one replica {[round(r) for r in ones]}, two {[round(r) for r in twos]}")
        return statistics.median(ones), statistics.median(twos)
    finally:
        conn.close()


@contextlib.contextmanager
def _lattice_hosts(workdir: Path) -> Iterator[tuple[Daemon, Daemon, str]]:
    """A nats-server (8 MiB max_payload, random loopback port) and hosts A and B on it."""
    from tests.lattice_support import NatsServer  # the tests' nats-server helper (the binary from the venv)

    server = NatsServer(workdir / "nats").start()
    try:
        with running_daemon(host_a(server.url)) as a, running_daemon(host_b(server.url)) as b:
            yield a, b, server.url
    finally:
        server.kill()


async def _measure(a: Daemon, b: Daemon, url: str, seconds: float) -> list[Row]:
    await _until_seen(a.socket, lambda rows: (str(REMOTE_ECHO), "host-b", "running") in rows,
                      "host A sees host B's echo")
    await _until_seen(b.socket, lambda rows: (str(HASHER), "host-a", "running") in rows,
                      "host B sees host A's hasher")
    same = await _rate(a.socket, ECHO, seconds)
    cross = await _rate(a.socket, REMOTE_ECHO, seconds)
    p99 = await _paced_p99(a.socket, REMOTE_ECHO, cross / 2, max(seconds, 2.0))
    local_p99 = await _paced_p99(a.socket, ECHO, cross / 2, max(seconds, 2.0))  # the same pace, no hop
    guest_same = await _guest_rate(a, LOCAL_PINGER, a, ECHO, seconds)
    guest_cross = await _guest_rate(a, REMOTE_PINGER, b, REMOTE_ECHO, seconds)
    one, two = await _replica_rates(a, b, url, max(seconds, 2.0))
    return [
        Row("lattice", "host req local", same, same, "req/s", None),
        Row("lattice", "host req x-host", same, cross, "req/s", TARGET_RATIO),
        Row("lattice", "local p99 @half", local_p99, local_p99, "ms", None),
        Row("lattice", "x-host p99 @half", TARGET_P99_MS, p99, "ms", TARGET_P99_MS, at_most=True),
        Row("lattice", "guest req local", guest_same, guest_same, "trips/s", None),
        Row("lattice", "guest req x-host", guest_same, guest_cross, "trips/s", None),
        Row("lattice", "cpu 1 replica", one, one, "req/s", None),
        Row("lattice", "cpu 2 replicas", one, two, "req/s", TARGET_REPLICAS),
    ]


def run(seconds: float = 1.0) -> list[Row]:
    """Start nats-server and two daemons, measure, stop them."""
    with tempfile.TemporaryDirectory() as tmp, _lattice_hosts(Path(tmp)) as (a, b, url):
        return uvloop.run(_measure(a, b, url, seconds))  # the load generator on uvloop, as the daemons are
