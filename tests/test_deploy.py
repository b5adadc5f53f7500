"""What deploy/ promises an operator: the log file follows a rotation (SIGUSR1), and the systemd
unit's timeouts and task limit cover what the example configuration and the daemon can take."""

from __future__ import annotations

import configparser
import inspect
import json
import math
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import msgspec

from tests.test_daemon import BASIC, ROOT, Daemon, config_text
from wasmhost.actors.actor import STOP_GRACE
from wasmhost.actors.workers import MAX_LENT_THREADS, default_worker_count
from wasmhost.storage.writer import StorageWriter
from wasmhost.system.config import ComponentSection, ConfigFile
from wasmhost.system.control import MAX_CONNECTIONS
from wasmhost.system.daemon import START_CONCURRENCY
from wasmhost.system.log_writer import LogSink
from wasmhost.system.logging import FLUSH_TIMEOUT_S

STOP_SPARE_S = 2.0
"""What deploy/README.md's "Timeouts" adds to a stop beyond the bounds the code states."""
START_MARGIN_S = 10.0
COLD_COMPILE_ALLOWANCE_S = 120.0
"""Compiling with an empty cache that the example unit must leave room for (deploy/README.md: 170 s)."""
OWN_THREADS = 16
"""deploy/README.md's "Threads": the daemon's own 7 threads and room to spare."""


def _wait_for(condition: Callable[[], object], what: str, process: subprocess.Popen[bytes] | None = None,
              seconds: float = 30.0) -> None:
    """Wait (bounded) until `condition()` is true, failing at once if `process` ends meanwhile."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process is None or process.poll() is None, f"the daemon exited ({process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _events(path: Path) -> list[str]:
    return [json.loads(line)["event"] for line in path.read_text().splitlines() if line.startswith("{")]


# --- log rotation ---


def test_a_log_sink_reopens_its_path_and_keeps_the_old_file_when_it_cannot(tmp_path: Path) -> None:
    """LogSink on its own with real files: lines after reopen() go to the new file at the path."""
    path = tmp_path / "a.log"
    reports: list[tuple[str, str, str | None]] = []
    sink = LogSink("log_file", os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), path=str(path),
                   on_reopened=lambda *report: reports.append(report))
    sink.put(b"one\n")
    _wait_for(lambda: path.read_bytes() == b"one\n", "the first line")
    path.rename(tmp_path / "a.log.1")  # what logrotate does before postrotate
    sink.put(b"two\n")
    sink.reopen()
    _wait_for(lambda: reports, "the reopen")
    sink.put(b"three\n")
    _wait_for(lambda: path.exists() and path.read_bytes().endswith(b"three\n"), "a line in the new file")
    assert reports == [("log_file", str(path), None)]
    assert b"one\n" in (tmp_path / "a.log.1").read_bytes() and b"three\n" not in (tmp_path / "a.log.1").read_bytes()

    sink.path = str(tmp_path / "gone" / "a.log")  # a directory that does not exist: the reopen fails
    sink.reopen()
    _wait_for(lambda: len(reports) == 2, "the failed reopen")
    assert reports[1] == ("log_file", sink.path, "No such file or directory")
    sink.put(b"four\n")
    assert sink.close(time.monotonic() + 10)
    assert path.read_bytes().endswith(b"three\nfour\n")  # still the file it had
    os.close(sink.fd)


def test_sigusr1_makes_the_daemon_write_to_a_new_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "wasmhost.log"
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", BASIC).replace("[host]\n", f'[host]\nlog_file = "{log_file}"\n'))
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        rotated = tmp_path / "wasmhost.log.1"
        log_file.rename(rotated)
        d.proc.send_signal(signal.SIGUSR1)
        _wait_for(lambda: log_file.exists() and "log_file_reopened" in log_file.read_text(), "log_file_reopened",
                  d.proc)
        assert d.call("t/echo/0", "after rotation") == "after rotation"
    finally:
        assert d.stop() == 0
    before, after = _events(rotated), _events(log_file)
    assert "daemon_ready" in before and "log_file_reopened" not in before
    assert after[0] == "log_file_reopened" and after[-1] == "stopped"
    assert d.proc.returncode == 0  # SIGUSR1 did not end it (its default action would have)


# --- the unit against the example configuration ---


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string((ROOT / "deploy" / "wasmhost.service").read_text())
    return unit


def _seconds(value: str) -> float:
    assert value.isdigit(), f"expected plain seconds, got {value!r}"
    return float(value)


def _example() -> ConfigFile:
    """deploy/wasmhost.toml with every default filled in, as the daemon reads it."""
    return msgspec.convert(tomllib.loads((ROOT / "deploy" / "wasmhost.toml").read_text()), ConfigFile)


def test_timeout_stop_covers_the_longest_stop_of_the_example_configuration() -> None:
    example = _example()
    default_shutdown = ComponentSection(id="any/one/0").shutdown_timeout_s  # what a component added later gets
    shutdown = max([c.shutdown_timeout_s for c in example.components] or [default_shutdown])
    storage_commit = inspect.signature(StorageWriter.close).parameters["timeout_s"].default
    longest_stop = (example.host.drain_timeout_s + shutdown + 2 * STOP_GRACE + storage_commit + FLUSH_TIMEOUT_S
                    + STOP_SPARE_S)
    assert longest_stop == example.host.drain_timeout_s + shutdown + 15  # the figure deploy/README.md gives
    assert _seconds(_unit()["Service"]["TimeoutStopSec"]) >= longest_stop


def test_timeout_start_covers_the_start_deadlines_and_leaves_room_to_compile() -> None:
    example = _example()
    default_ms = example.host.default_limits.max_execution_time_ms
    assert default_ms is not None
    deadline_s = max(((c.limits.max_execution_time_ms or default_ms) for c in example.components),
                     default=default_ms) / 1000
    groups: dict[str | None, int] = {}
    for c in example.components:
        groups[c.group] = groups.get(c.group, 0) + 1
    longest_group = max([n for g, n in groups.items() if g is not None], default=1)
    waves = max(1, math.ceil(len(example.components) / START_CONCURRENCY))
    deadlines = 4 * deadline_s * longest_group * waves  # instantiation, initialize, metadata, health
    start = _seconds(_unit()["Service"]["TimeoutStartSec"])
    assert start >= deadlines + START_MARGIN_S + COLD_COMPILE_ALLOWANCE_S
    assert f"leaves {start - deadlines - START_MARGIN_S:.0f} s for C" in (ROOT / "deploy" / "README.md").read_text()


def test_tasks_max_covers_every_thread_the_daemon_may_start() -> None:
    example = _example()
    for cores in (2, 64, 240):
        workers = example.host.worker_threads or max(4, 2 * cores)
        most = workers + MAX_LENT_THREADS + min(32, cores + 4) + cores + OWN_THREADS
        assert int(_unit()["Service"]["TasksMax"]) >= most, f"{cores} cores: {most} threads"


def test_the_daemon_runs_no_more_threads_than_deploy_readme_counts(tmp_path: Path) -> None:
    """The count above, against a real daemon: its threads before any are lent."""
    config = tmp_path / "wasmhost.toml"
    config.write_text(config_text(tmp_path / "state", BASIC))
    d = Daemon(tmp_path, config)
    try:
        d.expect("READY=1")
        threads = len(os.listdir(f"/proc/{d.proc.pid}/task"))
    finally:
        assert d.stop() == 0
    cores = os.cpu_count() or 1
    assert threads <= default_worker_count() + min(32, cores + 4) + cores + OWN_THREADS


def test_the_documentation_the_unit_names_is_installed_by_deploy_readme() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    for uri in _unit()["Unit"]["Documentation"].split():
        assert uri.startswith("file://"), uri
        installed = uri.removeprefix("file://")
        source = installed.removeprefix("/opt/wasmhost/")
        assert (ROOT / source).is_file(), f"{uri}: no {source} in the checkout"
        assert f"install -D -m 0644 {source} {installed}" in readme, f"deploy/README.md does not install {uri}"


def test_the_open_file_limit_covers_the_control_connections_and_a_storage_connection_per_thread() -> None:
    """deploy/README.md, "Open files": at the unit's limit the control socket serves its full 1024 connections,
    and every thread TasksMax allows may hold a storage connection (2 files) beside them."""
    service = _unit()["Service"]
    limit = int(service["LimitNOFILE"])
    assert limit // 2 >= MAX_CONNECTIONS  # control.connection_limit: half the limit when that is lower
    assert limit >= MAX_CONNECTIONS + 2 * int(service["TasksMax"]) + 256  # 256: logs, sockets, cache, room
    assert f"`LimitNOFILE={limit}`" in (ROOT / "deploy" / "README.md").read_text()
