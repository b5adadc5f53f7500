"""Density: 10,000 small components in one real daemon; resident memory per idle component beyond a
daemon running one, the p99 of a `call` and of `status` through the control socket at that size, and
the start-up: READY after the daemon was started, per component (target START_PER_COMPONENT_MS), the
median of READY_RUNS starts: single starts of the same code ranged 2.9 - 5.2 s within ten minutes."""

from __future__ import annotations

import compileall
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import wasmhost
from bench.harness import FIXTURES, Row
from wasmhost.system import protocol
from wasmhost.system.client import request

COUNT = 10_000
CALLS = 500
START_PER_COMPONENT_MS = 0.3
"""Start-up target: 10,000 echo components READY within 3 s."""
STATUS_P99_MS = 50.0
READY_RUNS = 3


def _config(directory: Path, count: int) -> Path:
    lines = [f'[host]\ncomponents_dir = "{FIXTURES}"\nstate_dir = "{directory / "state"}"\nlog_level = "warning"\n'
             'default_mailbox_capacity = 16\n']
    lines += [f'[[components]]\nid = "dense/echo/{i}"\npath = "echo.wasm"\n'
              for i in range(count)]
    path = directory / f"dense-{count}.toml"
    path.write_text("\n".join(lines))
    return path


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _Daemon:
    def __init__(self, directory: Path, count: int) -> None:
        self.socket = directory / "state" / "wasmhost.sock"
        notify_path = directory / "notify.sock"
        notify_path.unlink(missing_ok=True)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.settimeout(600)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "run", "--config",
                                      str(_config(directory, count))],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        while b"READY=1" not in self.notify.recv(4096).split(b"\n"):
            pass
        self.ready_after = time.perf_counter() - self.started

    def settle(self) -> int:
        """RSS once the daemon has been idle for a moment."""
        time.sleep(1.0)
        return _rss_kib(self.proc.pid)

    def close(self, kill: bool = False) -> None:
        """Stop the daemon: SIGTERM, or SIGKILL when only its start was timed."""
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        self.proc.wait(timeout=600)
        self.notify.close()


def _p99(samples: list[float]) -> float:
    samples.sort()
    return samples[int(len(samples) * 0.99) - 1] * 1000


def run(seconds: float = 1.0) -> list[Row]:
    """Start a daemon with 1 and with COUNT echo components; compare memory, time calls."""
    # The daemon is timed as installed, its modules' bytecode cached: run from a checkout with
    # PYTHONDONTWRITEBYTECODE=1 (as on this machine), every start compiled its ~90 modules again (0.14 - 0.17 s).
    compileall.compile_dir(Path(wasmhost.__file__).parent, quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        one_dir, many_dir = Path(tmp) / "one", Path(tmp) / "many"
        one_dir.mkdir()
        many_dir.mkdir()
        one = _Daemon(one_dir, 1)
        baseline = one.settle()
        one.close()
        many = _Daemon(many_dir, COUNT)
        try:
            loaded = many.settle()
            calls = []
            for _ in range(CALLS):
                target = f"dense/echo/{random.randrange(COUNT)}"
                began = time.perf_counter()
                response = request(many.socket, protocol.Call(target, b"ping", 5.0))
                calls.append(time.perf_counter() - began)
                assert response.ok and response.data == b"ping", response
            statuses = []
            for _ in range(20):
                began = time.perf_counter()
                assert len(request(many.socket, protocol.Status()).data["components"]) == COUNT
                statuses.append(time.perf_counter() - began)
            readies = [many.ready_after]
        finally:
            many.close()
        for _ in range(READY_RUNS - 1):  # started again on the same state_dir, as a restarted service is
            again = _Daemon(many_dir, COUNT)
            again.close(kill=True)
            readies.append(again.ready_after)
    ready = statistics.median(readies)
    per_component = (loaded - baseline) / COUNT
    return [
        Row("density", f"RSS/comp ({COUNT})", 64.0, per_component, "KiB", 64.0, at_most=True),
        Row("density", "call p99", 50.0, _p99(calls), "ms", 50.0, at_most=True),
        Row("density", "status p99", STATUS_P99_MS, _p99(statuses), "ms", STATUS_P99_MS, at_most=True),
        Row("density", f"READY ({COUNT})", 0.0, ready, "s", None),  # the median
        Row("density", "READY fastest", 0.0, min(readies), "s", None),
        Row("density", "READY slowest", 0.0, max(readies), "s", None),
        Row("density", "READY/comp", START_PER_COMPONENT_MS, ready / COUNT * 1000, "ms", START_PER_COMPONENT_MS,
            at_most=True),
    ]
