"""Shared benchmark helpers: timing loops, the fixture location, a supervisor to run actors in and the
report table."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import uvloop

from wasmhost.actors.supervisor import Supervisor
from wasmhost.actors.workers import WorkerPool
from wasmhost.core import ComponentId, affinity
from wasmhost.messaging.router import MessageRouter
from wasmhost.runtime.runtime import Runtime
from wasmhost.security.capabilities import CapabilityChecker
from wasmhost.storage.sqlite_store import SqliteStorage
from wasmhost.system.heap import steady_collector
from wasmhost.system.logging import configure_logging, shutdown_logging
from wasmhost.system.stores import HostStores

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(os.environ.get("WASMHOST_FIXTURES", ROOT / "tests" / "fixtures" / "build"))
RESULTS = ROOT / "bench" / "results"


@dataclass
class Daemon:
    """A `wasmhost run` subprocess that has sent READY=1, and its control socket."""

    proc: subprocess.Popen[bytes]
    socket: Path


@contextlib.contextmanager
def running_daemon(components: str, host: str = "", stdout: int = subprocess.DEVNULL) -> Iterator[Daemon]:
    """Start `wasmhost run` on the fixtures with `host` lines added to [host] and the `components`
    tables, in a temporary state directory; yield it once READY=1 came; kill it afterwards if it
    is still running."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        config = directory / "wasmhost.toml"
        config.write_text(f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{directory / "state"}"\n'
                          f'log_format = "json"\n{host}{components}')
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(directory / "notify.sock"))
        notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock")}
        proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "run", "--config", str(config)],
                                stdout=stdout, stderr=subprocess.STDOUT, env=env)
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            yield Daemon(proc, directory / "state" / "wasmhost.sock")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            notify.close()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """While this process times something: what it built so far is moved out of the collector's way
    (`gc.freeze`), as the daemon does after a deployment (system/heap.py), so that a full collection
    of it is not counted as latency (20 - 31 ms measured in the lattice rows' load generator, 51,000
    objects; 130 ms among 1,024 spinners). The objects go back under the collector afterwards."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def daemon_logging() -> Iterator[None]:
    """Logging configured as in the daemon (JSON lines, written off the calling thread), with its
    stdout on /dev/null; structlog's defaults again afterwards."""
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    configure_logging("info", "json")
    try:
        yield
    finally:
        shutdown_logging()
        structlog.reset_defaults()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.asynccontextmanager
async def bench_supervisor(runtime: Runtime, *, threads: int | None = None, storage: SqliteStorage | None = None,
                           permissions: CapabilityChecker | None = None, drain_s: float = 1.0
                           ) -> AsyncIterator[Supervisor]:
    """A running Supervisor on a worker pool of its own (`threads`, None for the default size), with
    `storage` and capability checks by `permissions` when given. On the way out, stops every actor
    (draining up to `drain_s`), then closes the pool, then `storage`, each even if the one before raised."""
    affinity.anchor()  # the event loop's thread, as in the daemon (see core/affinity.py)
    workers = WorkerPool(threads)
    loop = asyncio.get_running_loop()
    router = MessageRouter(loop) if permissions is None else MessageRouter(loop, permissions)
    try:
        with steady_collector():  # the collector's thresholds as in the daemon (see system/heap.py)
            async with Supervisor(HostStores(runtime, router, storage, permissions), router, workers) as sup:
                try:
                    yield sup
                finally:
                    try:
                        await sup.stop_all(drain_s)
                    finally:
                        try:
                            workers.close()
                        finally:
                            if storage is not None:
                                storage.close()
    finally:
        affinity.leave_home()  # daemons the next benchmark starts inherit this thread's cores and may take its home


async def echo_latencies_ms(sup: Supervisor, echo: ComponentId, seconds: float,
                            each: Callable[[], object] | None = None) -> list[float]:
    """`echo`'s request latencies (ms, in order) over `seconds`, one request after another 1 ms apart, after a
    50 ms start for whatever runs beside it; `each` is called after every sample."""
    await asyncio.sleep(0.05)
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        began = time.perf_counter()
        assert await sup.router.host_request(echo, b"ping", 10.0) == b"ping"
        samples.append((time.perf_counter() - began) * 1000)
        if each is not None:
            each()
        await asyncio.sleep(0.001)
    return samples


def rate(call: Callable[[], object], seconds: float, min_calls: int = 3) -> float:
    """Calls per second of `call`, measured for about `seconds` (and at least `min_calls` calls)."""
    call()  # warm up
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(8):
            call()
        calls += 8
        now = time.perf_counter()
        if now >= deadline and calls >= min_calls:
            return calls / (now - start)


ROUNDS = 5
"""Windows each side of an alternated comparison gets (see `alternated`)."""


@dataclass
class Alternated:
    """What `alternated` measured: the baseline's median rate, and for each subject the median of its
    rounds' ratios to the baseline of the same round."""

    baseline: float
    ratios: list[float]

    def measured(self, subject: int) -> float:
        """Subject `subject`'s figure for a Row: its median ratio times the median baseline, so that the
        row's ratio is that median ratio."""
        return self.ratios[subject] * self.baseline


async def alternated(baseline: Callable[[float], Awaitable[float]],
                     subjects: Sequence[Callable[[float], Awaitable[float]]],
                     seconds: float, rounds: int = ROUNDS, warm_up: float = 0.1) -> Alternated:
    """Rates of `baseline` and each of `subjects` (each called with a window's length in seconds and
    returning its rate over it), measured in `rounds` alternating rounds of `seconds / rounds` each,
    reduced to the median baseline and each subject's median ratio to its round's baseline.

    Why: a baseline measured once for a second and its subject once after it moves with the machine's
    minute (host -> echo 44,500 - 56,400/s on the same code, ratios 0.31 - 0.40x), so one run's ratio
    did too. Measured next to each other in short windows, the baseline and its subject share the
    machine's state, and the median of the rounds' ratios drops the windows another process disturbed.
    Every other round runs in reverse order (B S1 S2, S2 S1 B, ...) so a drift within a round does not
    always favour the same side. A first round of `warm_up`-second windows is not counted: a process's
    first windows run slower (host -> echo 18,800/s in its first 0.1 s, 45,000 - 56,000/s after),
    which favoured the subjects when the baseline was measured first.
    """
    for measure in [baseline, *subjects]:
        await measure(warm_up)
    window = seconds / rounds
    bases: list[float] = []
    ratios: list[list[float]] = [[] for _ in subjects]
    for turn in range(rounds):
        rates: dict[int, float] = {}
        order = [-1, *range(len(subjects))]  # -1: the baseline
        for index in order if turn % 2 == 0 else order[::-1]:
            rates[index] = await (baseline if index < 0 else subjects[index])(window)
        bases.append(rates[-1])
        for index, subject_ratios in enumerate(ratios):
            subject_ratios.append(rates[index] / rates[-1] if rates[-1] else float("inf"))
    return Alternated(statistics.median(bases), [statistics.median(r) for r in ratios])


@dataclass
class Row:
    """One line of the report: a measured figure against its same-run baseline and target.

    With `at_most`, the figure is absolute (a latency, say) and must not exceed `target`; the
    baseline column then repeats the limit.
    """

    benchmark: str
    case: str
    baseline: float
    measured: float
    unit: str
    target: float | None
    at_most: bool = False

    @property
    def ratio(self) -> float:
        """measured / baseline."""
        return self.measured / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        """Whether the target is reached (None when the row has no target)."""
        if self.target is None:
            return None
        return self.measured <= self.target if self.at_most else self.ratio >= self.target

    def target_text(self) -> str:
        """The target as printed."""
        if self.target is None:
            return "-"
        return f"<= {self.target:g}" if self.at_most else f">= {self.target:g}x"


def machine() -> str:
    """A one-line description of where the figures were measured."""
    return f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def report(rows: list[Row], failed: dict[str, str] | None = None) -> str:
    """The table `make bench` prints; `failed` maps each benchmark that raised to its error, shown as
    a FAILED line of its own."""
    header = (f"{'benchmark':<9} {'case':<16} {'baseline':>13} {'measured':>13} {'unit':<8} "
              f"{'ratio':>8} {'target':>9}  ok")
    lines = [f"# {machine()}", header, "-" * len(header)]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append(
            f"{r.benchmark:<9} {r.case:<16} {r.baseline:>13,.1f} {r.measured:>13,.1f} {r.unit:<8} "
            f"{(f'{r.ratio:.2f}x' if r.baseline else '-'):>8} {r.target_text():>9}  {ok}"
        )
    for name, error in (failed or {}).items():
        lines.append(f"{name:<9} {'FAILED':<16} {error}")
    return "\n".join(lines)


def save(rows: list[Row], failed: dict[str, str] | None = None, results: Path = RESULTS) -> Path:
    """Write the rows (and the benchmarks that failed, with their errors) as JSON under `results` and
    return the file."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / time.strftime("bench-%Y%m%d-%H%M%S.json")
    data = {"machine": machine(), "rows": [asdict(r) | {"ratio": r.ratio, "met": r.met} for r in rows],
            "failed": failed or {}}
    path.write_text(json.dumps(data, indent=2))
    return path


def on_uvloop(measure: Callable[[Runtime, float], Coroutine[object, object, list[Row]]], seconds: float) -> list[Row]:
    """Run `measure` with a fresh Runtime on a uvloop event loop, as the daemon does; close the Runtime after."""
    runtime = Runtime()
    try:
        return uvloop.run(measure(runtime, seconds))
    finally:
        runtime.close()
