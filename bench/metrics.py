"""Metrics: the scrape of a real daemon with 10,000 components (every one has handled a message, so each
has its latency histogram: the most series), the daemon's memory growth over those scrapes, the cost of
the per-message latency recording, and the message path with the endpoint on (and scraped every
second) vs off."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.harness import FIXTURES, Row, rate
from wasmhost.actors.latency import LatencyRecorder
from wasmhost.system import protocol
from wasmhost.system.client import request

COUNT = 10_000
SCRAPES = 20
SCRAPE_TARGET_S = 1.0
PATH_COMPONENTS = 1_000
"""Components in the daemons of the on/off comparison (the scrape every second reads them all)."""
ROUNDS = 7


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@contextlib.contextmanager
def _daemon(directory: Path, count: int, metrics: bool) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """A daemon with `count` echo components (the endpoint on any free port when `metrics`); yields it,
    its control socket and the endpoint's port (0 when off) once READY=1 came."""
    directory.mkdir()
    log = directory / "daemon.log"
    lines = [f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{directory / "state"}"\nlog_level = "info"\n'
             f'log_format = "json"\nlog_file = "{log}"\ndefault_mailbox_capacity = 16\n'
             + ('metrics = "127.0.0.1:0"\n' if metrics else "")]
    lines += [f'[[components]]\nid = "dense/echo/{i}"\npath = "echo.wasm"\n' for i in range(count)]
    config = directory / "wasmhost.toml"
    config.write_text("\n".join(lines))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(directory / "notify.sock"))
    notify.settimeout(600)
    env = {**os.environ, "NOTIFY_SOCKET": str(directory / "notify.sock")}
    proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        port = 0
        if metrics:
            for line in log.read_text().splitlines():
                event = json.loads(line) if line.startswith("{") else {}
                if event.get("event") == "metrics_listening":
                    port = int(event["address"].rsplit(":", 1)[1])
        yield proc, directory / "state" / "wasmhost.sock", port
    finally:
        proc.terminate()
        proc.wait(timeout=600)
        notify.close()


def _scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as response:
        return bytes(response.read())


def _touch_all(control: Path, count: int) -> None:
    """One message to every component, four at a time."""
    def one(i: int) -> None:
        assert request(control, protocol.Send(f"dense/echo/{i}", b"x")).ok

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))


def _scrape_rows(tmp: Path) -> list[Row]:
    with _daemon(tmp / "scrape", COUNT, metrics=True) as (proc, control, port):
        _touch_all(control, COUNT)
        before = _rss_kib(proc.pid)
        times = []
        rss = []
        size = 0
        for _ in range(SCRAPES):
            began = time.perf_counter()
            size = len(_scrape(port))
            times.append(time.perf_counter() - began)
            rss.append(_rss_kib(proc.pid))
    print(f"metrics: {SCRAPES} scrapes at {COUNT:,}: {[round(t, 3) for t in times]} s, {size / 1e6:.1f} MB each; "
          f"RSS {before / 1024:.0f} MiB before, then {[round(r / 1024) for r in rss]} MiB; load {os.getloadavg()}",
          file=sys.stderr)
    recorder = LatencyRecorder()
    per_component = (sys.getsizeof(recorder) + sys.getsizeof(recorder.counts) + 17 * 8 + 56) / 1024
    return [
        Row("metrics", f"scrape p50 ({COUNT // 1000}k)", SCRAPE_TARGET_S * 1000, statistics.median(times) * 1000, "ms",
            SCRAPE_TARGET_S * 1000, at_most=True),
        Row("metrics", f"scrape max ({COUNT // 1000}k)", SCRAPE_TARGET_S * 1000, max(times) * 1000, "ms",
            SCRAPE_TARGET_S * 1000, at_most=True),
        Row("metrics", "RSS after 1st", 0.0, (rss[0] - before) / 1024, "MiB", None),
        Row("metrics", f"RSS after {SCRAPES}th", 0.0, (rss[-1] - before) / 1024, "MiB", None),
        Row("metrics", "counters/comp", 0.0, per_component, "KiB", None),
    ]


def _observe_cost(seconds: float) -> Row:
    """What the actor adds per message: two perf_counter reads and one observe."""
    recorder = LatencyRecorder()
    clock = time.perf_counter

    def one() -> None:
        began = clock()
        recorder.observe(clock() - began)

    per_second = rate(one, seconds)
    return Row("metrics", "record/message", 0.0, 1e6 / per_second, "us", None)


def _send_rate(control: Path, seconds: float) -> float:
    """Host sends per second to one echo, four clients at a time (each send answered once queued)."""
    def burst() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: request(control, protocol.Send("dense/echo/0", b"x")), range(32)))

    return rate(burst, seconds) * 32


def _path_rows(tmp: Path, seconds: float) -> list[Row]:
    """Sends per second to a daemon with the endpoint off and to one with it on and scraped every second,
    both running, measured in alternating windows (so that the load of the machine hits both alike)."""
    off: list[float] = []
    on: list[float] = []
    with _daemon(tmp / "off", PATH_COMPONENTS, metrics=False) as (_, off_control, _port), \
            _daemon(tmp / "on", PATH_COMPONENTS, metrics=True) as (_, on_control, port):
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(1.0):
                _scrape(port)

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        try:
            for _ in range(ROUNDS):
                off.append(_send_rate(off_control, seconds))
                on.append(_send_rate(on_control, seconds))
        finally:
            stop.set()
            thread.join()
    print(f"metrics: sends/s off {[round(r) for r in off]}, on {[round(r) for r in on]}; load {os.getloadavg()}",
          file=sys.stderr)
    return [Row("metrics", "path on/off", statistics.median(off), statistics.median(on), "msg/s", 0.9)]


def run(seconds: float = 1.0) -> list[Row]:
    """Every metrics row."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        rows = _scrape_rows(tmp)
        rows.append(_observe_cost(seconds))
        rows += _path_rows(tmp, max(seconds, 2.0))
    return rows
