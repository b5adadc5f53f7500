"""What deploy/ promises an operator: the log file follows a rotation (SIGUSR1), and the systemd
unit's timeouts and task limit cover what the example configuration and the daemon can take."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.test_daemon import BASIC, Daemon, config_text
from wasmhost.system.log_writer import LogSink


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
