"""LogSink: the daemon's log lines for one destination (stdout, the log file), kept in a bounded buffer and
written by a thread of its own, so that no thread that logs (the event loop, guest workers) ever waits for
a write; the writer gathers the lines of a burst into one write (GATHER_S). A destination nobody reads (a
full pipe) only costs the lines beyond the buffer: they are dropped and counted, and the count is logged
once the writer has caught up.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable

from wasmhost.core import affinity

MAX_BUFFERED_LINES = 10_000
"""Lines one destination holds while its writer is behind; further lines are dropped and counted."""
MAX_BUFFERED_BYTES = 8 * 1024 * 1024
"""Bytes one destination holds while its writer is behind."""

GATHER_S = 0.005
"""Once lines are queued, the writer waits this long for more before it writes them: it wakes (and
takes the GIL) once per burst of lines instead of once per line, and while lines keep coming it is
never woken by them at all. Measured, a trapping component back in service through its actor (two
lines per restart), alternating runs: median 0.94 ms against 1.17 ms. A line reaches its destination
at most this much later."""

DropReport = Callable[[str, int], None]
"""Called on the writer thread with (destination, lines dropped since the last report) once it caught up."""
ReopenReport = Callable[[str, str, str | None], None]
"""Called on the writer thread after a reopen with (destination, path, error or None)."""
FILE_MODE = 0o640


def open_log_file(path: str) -> int:
    """Open (or create) `path` for appending log lines; O_APPEND keeps lines whole next to other writers
    and after a `copytruncate` rotation. Opened without blocking: a FIFO nobody reads fails at once (ENXIO)
    instead of holding the start (or a reopen) until a reader comes; writes block as usual."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, FILE_MODE)
    os.set_blocking(fd, True)
    return fd


class LogSink:
    """One destination: a file descriptor, a bounded buffer of encoded lines, and the thread writing them.
    A sink made with the `path` its descriptor was opened from can reopen it (after a log rotation)."""

    def __init__(self, name: str, fd: int, on_caught_up: DropReport | None = None,
                 max_lines: int = MAX_BUFFERED_LINES, max_bytes: int = MAX_BUFFERED_BYTES,
                 path: str | None = None, on_reopened: ReopenReport | None = None) -> None:
        self.name = name
        self.fd = fd
        self.path = path
        self._on_reopened = on_reopened
        self._reopen = False  # asked for, not yet done by the writer thread
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.dropped = 0  # lines never written, in total
        self._unreported = 0  # of which not yet reported in a log line
        self._on_caught_up = on_caught_up
        self._lines: deque[bytes] = deque()
        self._bytes = 0
        self._closing = False
        self._waiting = False  # the writer waits for lines (only then does a line wake it)
        self._cond = threading.Condition(threading.Lock())
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{name}", daemon=True)
        self._thread.start()

    def put(self, line: bytes) -> None:
        """Queue one encoded line; drops (and counts) it when the buffer is full. Never waits for I/O."""
        with self._cond:
            if len(self._lines) >= self.max_lines or self._bytes + len(line) > self.max_bytes or self._closing:
                self.dropped += 1
                self._unreported += 1
                return
            self._lines.append(line)
            self._bytes += len(line)
            if self._waiting:
                self._cond.notify()

    def reopen(self) -> None:
        """Ask the writer thread to open `path` anew and write there from its next batch on (the old
        descriptor is closed once the new one is open; if opening fails, it keeps writing to the old
        one and reports the error). Never waits for I/O: safe in a signal handler on the event loop."""
        if self.path is None:
            return
        with self._cond:
            self._reopen = True
            self._cond.notify()  # (without a writer waiting, a no-op: it finds the request when it next looks)

    def close(self, deadline: float) -> bool:
        """Stop taking lines and wait until what is buffered is written or time.monotonic() passes
        `deadline`; True when everything was written. A writer stuck on a full pipe is abandoned (it is a
        daemon thread: it does not keep the process alive)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()

    def _run(self) -> None:
        # A line that finds this thread waiting wakes it, and it then needs the GIL: on another core than
        # the event loop, that wake-up and hand-over cost the loop more than the line (measured: a restart,
        # two lines, median 1.09 ms instead of 1.39 ms). So it goes where the event loop goes
        # (core/affinity.py), and it gathers the lines of a burst before writing (GATHER_S).
        affinity.anchor()
        try:
            self._serve()
        finally:
            affinity.roam()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closing and not self._reopen:
                    self._waiting = True
                    self._cond.wait()
                    self._waiting = False
                gather = not self._closing
            if gather:
                time.sleep(GATHER_S)  # more lines of the same burst join this write (see GATHER_S)
            with self._cond:
                reopen, self._reopen = self._reopen, False
                batch, self._lines, self._bytes = self._lines, deque(), 0
            if batch:
                self._write(batch)  # logged before the reopen request: they belong in the old file
            if reopen:
                self._reopen_file()  # lines logged after the request go to the new file
            if not batch:
                if self._closing:
                    return
                continue
            report = 0
            with self._cond:
                if not self._lines and self._unreported and not self._closing:
                    report, self._unreported = self._unreported, 0
            if report and self._on_caught_up is not None:
                self._on_caught_up(self.name, report)  # logs a line: this sink has room for it now

    def _reopen_file(self) -> None:
        """On the writer thread: swap the descriptor for a new one on `path`."""
        assert self.path is not None
        try:
            fd = open_log_file(self.path)
        except OSError as exc:
            error: str | None = f"{exc.strerror or exc}"
        else:
            old, self.fd, error = self.fd, fd, None
            os.close(old)
        if self._on_reopened is not None:
            self._on_reopened(self.name, self.path, error)

    def _write(self, batch: deque[bytes]) -> None:
        data = memoryview(b"".join(batch))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            # A closed pipe or a full disk: what was not written is lost; count it as whole lines.
            lost = self._lines_in_tail(batch, len(data))
            with self._cond:
                self.dropped += lost
                self._unreported += lost

    @staticmethod
    def _lines_in_tail(batch: deque[bytes], tail: int) -> int:
        """How many lines of `batch` lie at least partly in its last `tail` bytes."""
        count = 0
        for line in reversed(batch):
            if tail <= 0:
                break
            tail -= len(line)
            count += 1
        return count
