"""Memory stability: 1,000,000 messages through echo, counter and storage components; resident
memory growth after warm-up (a leak in value conversion, correlation tracking or logging shows)."""

from __future__ import annotations

import asyncio
import gc
import tempfile
from pathlib import Path

import uvloop

from bench.harness import FIXTURES, Row, bench_supervisor
from wasmhost.actors.spec import ActorSpec
from wasmhost.core import ComponentId
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import Capabilities, CapabilityChecker
from wasmhost.storage.sqlite_store import SqliteStorage

TOTAL = 1_000_000
WARM_UP = 100_000
WINDOW = 256


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _measure(runtime: Runtime, state: Path) -> tuple[int, int]:
    permissions = CapabilityChecker()
    storage = SqliteStorage(state / "storage.sqlite3")
    targets = []
    async with bench_supervisor(runtime, storage=storage, permissions=permissions) as sup:
        for fixture in ("echo", "counter", "storage"):
            cid = ComponentId("mem", fixture, "0")
            permissions.grant(cid, Capabilities(storage=True))
            await sup.start(ActorSpec(cid, mailbox_capacity=4096), runtime.load(cid, FIXTURES / f"{fixture}.wasm"))
            targets.append(cid)
        await sup.router.host_request(targets[2], b"set key " + b"v" * 64, 5.0)
        payloads = {targets[0]: b"x" * 256, targets[1]: b"", targets[2]: b"get key"}
        sent = 0
        rss_after_warm_up = 0

        async def client(n: int) -> None:
            nonlocal sent
            target = targets[n % 3]
            payload = payloads[target]
            while sent < TOTAL:
                sent += 1
                await sup.router.host_request(target, payload, 30.0, wait=True)

        async def watch() -> None:
            nonlocal rss_after_warm_up
            while sent < WARM_UP:
                await asyncio.sleep(0.05)
            gc.collect()
            rss_after_warm_up = _rss_kib()

        await asyncio.gather(watch(), *(client(n) for n in range(WINDOW)))
        gc.collect()
        return rss_after_warm_up, _rss_kib()


def run(seconds: float = 1.0) -> list[Row]:
    """RSS after warm-up vs after TOTAL messages."""
    runtime = Runtime()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            before, after = uvloop.run(_measure(runtime, Path(tmp)))
    finally:
        runtime.close()
    growth = (after - before) / before * 100
    return [Row("memory", f"RSS growth {TOTAL // 1000}k", 5.0, growth, "%", 5.0, at_most=True)]
