"""`wasmhost top` against a real daemon: `--once` frames read plainly, and the live view driven through a
pseudo-terminal (frames read, keys sent, sort changed, q quits). The sort and layout logic is also
checked on its own with hand-made rows (our own code, no daemon needed), 10,000 of them included."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_daemon import ROOT, Daemon, component, kill_leftovers, launch
from tests.test_stop import wait_for_status
from wasmhost import top
from wasmhost.system import protocol
from wasmhost.system.client import request

BOUND = 30.0
FRAME = "\x1b[H\x1b[2J"


@pytest.fixture
def busy_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """Three components: t/b/0 kept busy by a thread calling it over the socket, t/c/0 trapped once."""
    started: list[Daemon] = []
    stop = threading.Event()
    pump = None
    try:
        d = launch(tmp_path, component("t/a/0", "echo") + component("t/b/0", "echo")
                   + component("t/c/0", "trapper", "backoff_base_ms = 1"), started)
        assert d.cli("call", "t/c/0", "boom").returncode == 1
        wait_for_status(d, "t/c/0", lambda row: row["state"] == "running" and row["restarts"] == 1)

        def calls() -> None:
            while not stop.is_set():
                assert request(d.socket, protocol.Call("t/b/0", b"x")).ok

        pump = threading.Thread(target=calls)
        pump.start()
        yield d
        stop.set()
        pump.join(BOUND)
        assert d.stop() == 0
    finally:
        stop.set()
        kill_leftovers(started)


def ids(lines: list[str]) -> list[str]:
    return [line.split()[0] for line in lines[2:]]


def test_once_prints_every_component_sorted_by_rate_or_the_column_asked_for(busy_daemon: Daemon) -> None:
    d = busy_daemon
    shown = d.cli("top", "--once", "--interval", "0.3")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "wasmhost top: 3 components (3 running); sorted by MSG/S"
    assert lines[1].split() == ["ID", "STATE", "HEALTH", "MSG/S*", "MAILBOX", "P50", "MS", "P99", "MS", "RESTARTS",
                                "FAILED", "LAST", "ERROR"]
    assert ids(lines) == ["t/b/0", "t/a/0", "t/c/0"]  # the busy one first; the idle ones by id
    busy = lines[2].split()
    assert float(busy[3]) > 0 and busy[1:3] == ["running", "healthy"]
    assert float(busy[5]) > 0 and float(busy[6]) >= float(busy[5])  # p50 and p99 in milliseconds
    assert lines[3].split()[3:7] == ["0.0", "0", "-", "-"]  # idle: no rate, no latency yet
    trapped = lines[4]
    assert trapped.split()[7:9] == ["1", "1"]  # restarts, failed
    assert trapped.endswith("t/c/0: handle-message trapped: wasm trap: wasm `unreachable` instruction executed ...")

    by_failed = d.cli("top", "--once", "--interval", "0.1", "--sort", "failed").stdout.splitlines()
    assert by_failed[0].endswith("sorted by FAILED") and ids(by_failed)[0] == "t/c/0"
    by_id = d.cli("top", "--once", "--interval", "0.1", "--sort", "id", "--reverse").stdout.splitlines()
    assert by_id[0].endswith("sorted by ID (reversed)") and ids(by_id) == ["t/c/0", "t/b/0", "t/a/0"]

    wrong = d.cli("top", "--once", "--sort", "speed")
    assert wrong.returncode == 2 and "invalid choice: 'speed'" in wrong.stderr
    assert "--interval 0: expected seconds from 0.05 to 3600" in d.cli("top", "--interval", "0").stderr


def test_top_needs_a_terminal_unless_once(busy_daemon: Daemon) -> None:
    shown = busy_daemon.cli("top")
    assert (shown.returncode, shown.stderr) == (1, "wasmhost: top: stdin and stdout must be a terminal (for one "
                                                   "frame in a script: --once)\n")


class Terminal:
    """`wasmhost top` on a pseudo-terminal of `lines` x `columns`."""

    def __init__(self, socket: Path, lines: int, columns: int) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.proc = subprocess.Popen([sys.executable, "-m", "wasmhost.cli", "top", "--socket", str(socket),
                                      "--interval", "0.2"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                                     env={**os.environ, "LINES": str(lines), "COLUMNS": str(columns)})
        os.close(slave)
        self.output = ""

    def frame(self, condition: str) -> list[str]:
        """The lines of the first complete frame from now on whose title contains `condition`."""
        end = time.monotonic() + BOUND
        seen = len(self.output)
        while time.monotonic() < end:
            frames = self.output[seen:].split(FRAME)
            for text in frames[1:-1]:  # complete: another frame began after it
                lines = text.replace("\r", "").split("\n")
                if condition in lines[0]:
                    return lines
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                self.output += os.read(self.master, 65536).decode()
        raise AssertionError(f"no frame with {condition!r}; read:\n{self.output[-3000:]!r}")

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(BOUND)
        os.close(self.master)


def test_the_live_view_sorts_by_the_keys_pressed_and_quits_on_q(busy_daemon: Daemon) -> None:
    terminal = Terminal(busy_daemon.socket, lines=4, columns=120)  # room for two of the three rows
    try:
        lines = terminal.frame("sorted by MSG/S;")
        assert lines[0].startswith("wasmhost top: 3 components (3 running); showing 2 of 3, sorted by MSG/S; keys:")
        assert len(lines) == 4 and all(len(line) <= 120 for line in lines)
        lines = terminal.frame("sorted by MSG/S;")  # a refresh: now with rates
        assert ids(lines)[0] == "t/b/0"

        terminal.press(b"1")
        assert ids(terminal.frame("sorted by ID;")) == ["t/a/0", "t/b/0"]
        terminal.press(b"r")
        assert ids(terminal.frame("sorted by ID (reversed);")) == ["t/c/0", "t/b/0"]
        terminal.press(b"\x1b[C")  # right arrow: the next column
        assert "ID" in terminal.frame("sorted by STATE;")[1]
        terminal.press(b">>>>>>>")  # seven more to the right: FAILED
        assert ids(terminal.frame("sorted by FAILED;"))[0] == "t/c/0"

        terminal.press(b"q")
        assert terminal.proc.wait(BOUND) == 0
        rest = b""
        while select.select([terminal.master], [], [], 0.5)[0]:
            try:
                chunk = os.read(terminal.master, 65536)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            rest += chunk
        assert (terminal.output + rest.decode()).endswith("\x1b[?25h\x1b[?1049l")  # the screen given back
    finally:
        terminal.close()


# --- the layout and sort logic on hand-made rows ---


def row(cid: str, handled: int = 0, **fields: object) -> dict[str, object]:
    base: dict[str, object] = {"id": cid, "state": "running", "phase": None, "health": "healthy", "restarts": 0,
                               "mailbox": 0, "handled": handled, "failed": 0, "last_error": None,
                               "latency_p50_ms": None, "latency_p99_ms": None}
    return {**base, **fields}


def test_rates_come_from_two_successive_answers() -> None:
    rates = top.Rates()
    first = [row("a/a/0", 10), row("b/b/0", 0)]
    rates.update(first, 100.0)
    assert [r["rate"] for r in first] == [None, None]
    second = [row("a/a/0", 30), row("b/b/0", 5, failed=5), row("c/c/0", 7)]
    rates.update(second, 102.0)
    assert [r["rate"] for r in second] == [10.0, 5.0, None]  # (handled + failed) per second; new: unknown


def test_ten_thousand_components_show_the_rows_that_fit_best_first() -> None:
    rows = [row(f"ns/c{i:05d}/0", rate=float(i % 997), mailbox=i % 13) for i in range(10_000)]
    lines = top.render(rows, "rate", False, 100, 40)
    assert len(lines) == 40 and all(len(line) <= 100 for line in lines)
    assert "10000 components (10000 running); showing 38 of 10000, sorted by MSG/S" in lines[0]
    assert [float(line.split()[3]) for line in lines[2:5]] == [996.0, 996.0, 996.0]
    assert ids(lines)[:2] == ["ns/c00996/0", "ns/c01993/0"]  # ties by id
    by_mailbox = top.render(rows, "mailbox", True, 100, 5)
    assert [line.split()[4] for line in by_mailbox[2:]] == ["0", "0", "0"]


def test_keys_move_the_sort_column_and_missing_values_sort_last() -> None:
    assert top.next_sort(b"q", "rate", False) is None
    assert top.next_sort(b"2", "rate", True) == ("state", False)
    assert top.next_sort(b"<", "id", True) == ("error", False)  # wraps around; a new column in its own order
    assert top.next_sort(b"\x1b[C", "error", False) == ("id", False)
    assert top.next_sort(b"r", "p99", False) == ("p99", True)
    assert top.next_sort(b"x", "p99", True) == ("p99", True)
    rows = [row("a/a/0", latency_p99_ms=None), row("b/b/0", latency_p99_ms=2.5), row("c/c/0", latency_p99_ms=9.0)]
    assert [r["id"] for r in top.sort_rows(rows, "p99")] == ["c/c/0", "b/b/0", "a/a/0"]
    assert [r["id"] for r in top.sort_rows(rows, "p99", reverse=True)] == ["b/b/0", "c/c/0", "a/a/0"]
    assert "MEMORY" not in top.render(rows, "id", False, 200, None)[1]  # the daemon reports no memory figure
    with_memory = top.render([row("a/a/0", memory_bytes=3 * 1024 * 1024)], "memory", False, 200, None)
    assert "MEMORY*" in with_memory[1] and "3.0 MiB" in with_memory[2]
    assert re.match(r"a/a/0 +compiling +- ", top.render([row("a/a/0", state="starting", phase="compiling",
                                                             health=None)], "id", False, 200, None)[2])
