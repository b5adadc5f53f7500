"""The `make lattice` demo as a user runs it (its script, without make): nats-server and two daemons start,
host A's client gets its reply from host B's server, `status --lattice` lists both hosts, and Ctrl-C
(SIGINT) stops all three processes."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import FIXTURES
from tests.lattice_support import free_port
from tests.test_daemon import ROOT
from wasmhost.cli import build_parser

START_TIMEOUT = 180.0
"""Seconds for the whole demo to come up (two daemons compile their components on a loaded machine)."""


def read_until(lines: queue.Queue[str | None], marker: str, seen: list[str], timeout: float) -> None:
    """Collect the demo's output lines into `seen` until one contains `marker` (at most `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no {marker!r} within {timeout:g} s; output:\n" + "\n".join(seen)) from None
        if line is None:
            raise AssertionError(f"the demo ended before {marker!r}; output:\n" + "\n".join(seen))
        seen.append(line)
        if marker in line:
            return


def test_lattice_demo_requests_across_hosts_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    demo = subprocess.Popen([sys.executable, str(ROOT / "config" / "lattice" / "demo.py"), "--port", str(free_port()),
                             "--run-dir", str(tmp_path / "run"), "--components", str(FIXTURES)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:  # the demo's output, line by line, for a bounded wait on it
        assert demo.stdout is not None
        for line in demo.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        read_until(lines, "lattice demo running", seen, START_TIMEOUT)
        output = "\n".join(seen)
        assert "cross-host reply: hello from host-a" in output
        table = output.split("$ wasmhost status", 1)[1]
        assert re.search(r"^  host-a\s+local\s+1$", table, re.M), table
        assert re.search(r"^  host-b\s+[\d.]+ s ago\s+1$", table, re.M), table
        assert re.search(r"^  demo/client/0\s+host-a\s+running", table, re.M), table
        assert re.search(r"^  demo/server/0\s+host-b\s+running\s+healthy\s+yes$", table, re.M), table
        assert "call --config host-a.toml --lattice demo/server/0 'hello over NATS'\n  hello over NATS\n" in output
        shown = re.findall(r"^\$ wasmhost (.*)$", output, re.M)
        assert len(shown) == 4, output
        for command in shown:  # what the demo shows is what a user can type: the CLI parses it as shown
            build_parser().parse_args(shlex.split(command))
        pids = {name: int(pid) for name, pid in re.findall(r"^([\w-]+): pid (\d+),", output, re.M)}
        assert set(pids) == {"nats-server", "host-a", "host-b"}, output

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 0
        reader.join(timeout=10)
        read_until(lines, "stopped", seen, 10)
        output = "\n".join(seen)
        for name, pid in pids.items():
            assert re.search(rf"^{name}: exited \(0\)$", output, re.M), output
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            raise AssertionError(f"{name} (pid {pid}) still runs after the demo stopped")
    finally:
        if demo.poll() is None:  # a failed test: the demo's processes run in sessions of their own
            demo.kill()
            demo.wait()
            for pid in re.findall(r"^[\w-]+: pid (\d+),", "\n".join(seen), re.M):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
