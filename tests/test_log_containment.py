"""Log containment against the real daemon: a guest flooding its log is held to its rate, and a stdout nobody
reads never blocks the event loop, status, calls or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.test_daemon import ROOT, Daemon, component, config_text, wasmhost
from wasmhost.system import protocol
from wasmhost.system.client import request

NEIGHBOUR = component("t/echo/0", "echo")
UNLIMITED = "log_rate = 1000000000.0\nlog_burst = 1000000000"


def call(socket_path: Path, cid: str, payload: bytes) -> bytes:
    response = request(socket_path, protocol.Call(cid, payload, 60), timeout=60)
    assert response.ok, response.error
    return bytes(response.data)


class PipedDaemon:
    """`wasmhost run` whose stdout and stderr are one pipe the test reads only when it chooses to."""

    def __init__(self, tmp: Path, components: str) -> None:
        config = tmp / "wasmhost.toml"
        config.write_text(config_text(tmp / "state", components))
        self.socket = tmp / "state" / "wasmhost.sock"
        notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(notify_path))
        self.notify.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        self.proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "run", "--config", str(config)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        while "READY=1" not in self.notify.recv(4096).decode().split("\n"):
            pass
        self.lines: list[dict[str, Any]] = []

    def status(self) -> dict[str, Any]:
        result = wasmhost("status", "--json", "--socket", str(self.socket))
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def read_in_background(self, wanted: str) -> threading.Event:
        """Start reading the pipe; the event is set once a line with event `wanted` was read."""
        seen = threading.Event()
        stream: IO[bytes] = self.proc.stdout  # type: ignore[assignment]

        def read() -> None:
            for raw in stream:
                if raw.startswith(b"{"):
                    event = json.loads(raw)
                    self.lines.append(event)
                    if event.get("event") == wanted:
                        seen.set()

        threading.Thread(target=read, daemon=True).start()
        return seen

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.notify.close()


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[Any]:
    started: list[PipedDaemon] = []

    def start(components: str) -> PipedDaemon:
        daemon = PipedDaemon(tmp_path, components)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def test_a_log_flood_into_a_pipe_nobody_reads_blocks_neither_status_calls_nor_sigterm(piped: Any) -> None:
    d = piped(NEIGHBOUR + component("t/flood/0", "logflood", UNLIMITED))
    assert call(d.socket, "t/flood/0", b"30000") == b"30000"  # ~5 MB of lines into a 64 KiB pipe
    status = d.status()
    assert status["log_lines_dropped"] > 0
    assert {row["id"]: row["state"] for row in status["components"]} == {"t/echo/0": "running",
                                                                         "t/flood/0": "running"}
    assert call(d.socket, "t/echo/0", b"still here") == b"still here"
    text = wasmhost("status", "--socket", str(d.socket)).stdout
    assert f"logs: {d.status()['log_lines_dropped']} line(s) dropped" in text
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0  # the flush at exit gives up on the pipe instead of hanging


def test_dropped_lines_are_logged_once_the_writer_catches_up(piped: Any) -> None:
    d = piped(NEIGHBOUR + component("t/flood/0", "logflood", UNLIMITED))
    assert call(d.socket, "t/flood/0", b"30000") == b"30000"
    assert d.status()["log_lines_dropped"] > 0
    caught_up = d.read_in_background("log_lines_dropped")
    assert caught_up.wait(60), "no log_lines_dropped line after the pipe was read"
    reported = [e for e in d.lines if e["event"] == "log_lines_dropped"]
    assert sum(e["dropped"] for e in reported) == d.status()["log_lines_dropped"]
    assert {e["destination"] for e in reported} == {"stdout"}
    assert call(d.socket, "t/echo/0", b"hello") == b"hello"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=60) == 0


def test_a_guest_flooding_its_log_is_held_to_its_rate_and_every_drop_is_counted(tmp_path: Path) -> None:
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", NEIGHBOUR + component(
        "t/flood/0", "logflood", "log_rate = 50.0\nlog_burst = 100") + component("t/logger/0", "logger")))
    d = Daemon(tmp_path, config)
    d.expect("READY=1")
    began = time.monotonic()
    assert d.call("t/flood/0", "50000") == "50000"
    assert d.call("t/echo/0", "neighbour") == "neighbour"
    assert d.cli("call", "t/logger/0", "the logger is not limited by the flood").returncode == 0
    assert d.stop() == 0  # shutdown reports the last pending count
    elapsed = time.monotonic() - began
    events = d.events()
    written = [e for e in events if e.get("guest") and e["component"] == "t/flood/0"]
    counts = [e["suppressed"] for e in events if e["event"] == "guest_log_suppressed"]
    assert {e["component"] for e in events if e["event"] == "guest_log_suppressed"} == {"t/flood/0"}
    assert len(written) + sum(counts) == 50000
    assert len(written) <= 100 + 50 * elapsed  # the burst, then the rate
    assert 1 <= len(counts) <= elapsed + 2  # at most one summary a second, not one per dropped line
    assert any(e.get("guest") and e["event"] == "the logger is not limited by the flood" for e in events)
