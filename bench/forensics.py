"""The cost of crash forensics on the message path: the full actor path (host request -> echo -> reply)
with each actor's recorder keeping the metadata of the messages it handles, against the same path with
the recorder's work replaced by a no-op, measured alternately in short turns in the same run. Pipelined
(512 in flight: batches of up to 64, the recorder runs once per batch), one at a time (a batch per
message: its worst case), and keeping a 64-byte payload prefix. On a loaded machine the one-at-a-time
rows swing by tens of percent either way, so the recorder's own work per one-message batch is also
measured directly, in microseconds."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.actors import _pipelined_rate
from bench.harness import FIXTURES, Row, bench_supervisor, on_uvloop, rate
from wasmhost.actors.actor import Handled
from wasmhost.actors.forensics import Recorder
from wasmhost.actors.spec import ActorSpec
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId, ComponentMessage, MessageMetadata, Timestamp
from wasmhost.messaging.envelope import Envelope
from wasmhost.runtime.runtime import Runtime

REPEATS = 10
"""Alternating on/off turns per case (each a third of the measurement time); the medians are compared."""


@contextmanager
def _recorder_off() -> Iterator[None]:
    seen: Callable[..., Any] = Recorder.seen
    Recorder.seen = lambda self, handled: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        Recorder.seen = seen  # type: ignore[method-assign]


def _recorder_work(seconds: float) -> float:
    """Seconds the recorder takes for a batch of one 64-byte message (what `_deliver` adds per batch)."""
    cid = ComponentId("bench", "recorded", "0")
    batch = [Handled(Envelope(ComponentMessage(cid, b"x" * 64, MessageMetadata(Timestamp.now()))), b"x", None, "")]
    recorder = Recorder()
    return 1 / rate(lambda: recorder.seen(batch), seconds)


async def _sequential_rate(sup: Supervisor, target: ComponentId, payload: bytes, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    done = 0
    began = loop.time()
    while loop.time() - began < seconds:
        await sup.router.host_request(target, payload, 30.0, wait=True)
        done += 1
    return done / (loop.time() - began)


async def _measure(runtime: Runtime, seconds: float) -> list[Row]:
    rows: list[Row] = []
    async with bench_supervisor(runtime) as sup:
        turn = seconds / 3
        plain, keeping = ComponentId("bench", "echo", "0"), ComponentId("bench", "echo-prefix", "0")
        for cid, prefix in ((plain, 0), (keeping, 64)):
            spec = ActorSpec(cid, mailbox_capacity=4096, forensics_payload_bytes=prefix)
            await sup.start(spec, runtime.load(cid, FIXTURES / "echo.wasm"))
        cases = (
            ("64 B, 512 in flight", lambda: _pipelined_rate(sup, [plain], b"x" * 64, turn)),
            ("64 B, one at a time", lambda: _sequential_rate(sup, plain, b"x" * 64, turn)),
            ("64 B, one at a time, 64 B prefix kept", lambda: _sequential_rate(sup, keeping, b"x" * 64, turn)),
        )
        for label, measure in cases:
            on, off = [], []
            for _ in range(REPEATS):  # short alternating turns: load changes hit both sides alike
                with _recorder_off():
                    off.append(await measure())
                on.append(await measure())
            rows.append(Row("forensics", f"recorder on, {label}", statistics.median(off),
                            statistics.median(on), "msg/s", 0.95))
        per_batch = _recorder_work(seconds) * 1e6
        rows.append(Row("forensics", "recorder work per one-message batch (us)", 2.0, per_batch, "us", 2.0,
                        at_most=True))
    return rows


def run(seconds: float = 1.0) -> list[Row]:
    """Run the forensics overhead rows on a uvloop event loop, as the daemon does."""
    return on_uvloop(_measure, seconds)
