"""Log containment: what a guest line refused by its rate limit costs against a written one, and a real
daemon whose stdout is a pipe nobody reads while a guest floods its log: an echo's call p99 meanwhile,
the lines dropped, and how long SIGTERM takes to exit."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import FIXTURES, Row, daemon_logging, running_daemon
from wasmhost.core import ComponentConfig, ComponentId
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.rate_limit import RateLimit
from wasmhost.runtime.guest_log import flush_suppressed
from wasmhost.runtime.host_fn import HostContext
from wasmhost.runtime.runtime import Runtime
from wasmhost.system import protocol
from wasmhost.system.client import request

FLOOD = 20_000  # lines per flood call


def _line_us(seconds: float, limit: RateLimit) -> float:
    """Microseconds per guest `log` call under `limit` (wasm -> host -> back), logging configured as in the
    daemon (JSON) with its stdout on /dev/null."""
    cid = ComponentId("bench", "logflood", "0")
    with daemon_logging(), tempfile.TemporaryDirectory() as tmp:
        runtime = Runtime(cache_dir=Path(tmp))
        manager = runtime.store(runtime.load(cid, FIXTURES / "logflood.wasm"), cid,
                                host=HostContext(cid, log_limit=limit))
        manager.instantiate()
        manager.initialize(ComponentConfig())
        message = ComponentMessage(cid, str(FLOOD).encode(), MessageMetadata(timestamp=Timestamp.now()))
        manager.handle_message(message)  # warms up (and spends a small burst)
        lines, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            manager.handle_message(message)
            lines += FLOOD
        elapsed = time.perf_counter() - began
        flush_suppressed()
        manager.close()
        runtime.close()
    return elapsed / lines * 1e6


def _p99(samples: list[float]) -> float:
    samples.sort()
    return samples[max(0, int(len(samples) * 0.99) - 1)] * 1000


def _blocked_pipe(seconds: float) -> tuple[float, float, int]:
    """(echo call p99 in ms, seconds from SIGTERM to exit, lines dropped) for a daemon whose stdout
    nobody reads while a guest floods its log without a rate limit."""
    components = ('[[components]]\nid = "b/echo/0"\npath = "echo.wasm"\n'
                  '[[components]]\nid = "b/flood/0"\npath = "logflood.wasm"\n'
                  'log_rate = 1000000000.0\nlog_burst = 1000000000\n')
    with running_daemon(components, stdout=subprocess.PIPE) as daemon:  # a pipe nobody reads
        proc, sock = daemon.proc, daemon.socket
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                request(sock, protocol.Call("b/flood/0", str(FLOOD).encode(), 60), timeout=60)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        calls = []
        began = time.perf_counter()
        while time.perf_counter() - began < max(seconds * 3, 2.0):
            t0 = time.perf_counter()
            assert request(sock, protocol.Call("b/echo/0", b"ping", 10), timeout=30).data == b"ping"
            calls.append(time.perf_counter() - t0)
        dropped = int(request(sock, protocol.Status(), timeout=30).data["log_lines_dropped"])
        stop.set()
        flooder.join(60)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        exit_s = time.perf_counter() - t0
    return _p99(calls), exit_s, dropped


def run(seconds: float = 1.0) -> list[Row]:
    """Measure the cost of a suppressed line and a daemon logging into a pipe nobody reads."""
    written = _line_us(seconds, RateLimit(1e9, 10**9))
    suppressed = _line_us(seconds, RateLimit(1e-6, 1))
    p99, exit_s, dropped = _blocked_pipe(seconds)
    return [
        Row("logs", "line: written/dropped", suppressed, written, "us", 2.0),  # a dropped line costs far less
        Row("logs", "echo p99, unread", 50.0, p99, "ms", 50.0, at_most=True),
        Row("logs", "SIGTERM exit, unread", 7.0, exit_s, "s", 7.0, at_most=True),
        Row("logs", "lines dropped", 0.0, float(dropped), "lines", None),
    ]
