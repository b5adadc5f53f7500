"""structlog setup: JSON lines when stdout is not a terminal (journald, files), console otherwise.

Rendered lines go to stdout and, when configured, to a log file through a LogSink each (log_writer.py):
logging never waits for a write, and lines a slow destination cannot take are dropped and counted. The
log file is reopened by its path on request (SIGUSR1, see daemon.py), for log rotation.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import structlog

from wasmhost.core.terminal import printable
from wasmhost.system.log_writer import LogSink, open_log_file

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

FLUSH_TIMEOUT_S = 2.0
"""How long shutdown waits for buffered lines to be written before giving up on a blocked destination."""

_sinks: list[LogSink] = []
log = structlog.get_logger("wasmhost.logging")


class BufferedLogger:
    """The structlog logger: hands each rendered line to every sink."""

    def __init__(self, sinks: list[LogSink]) -> None:
        self.sinks = sinks

    def msg(self, message: str) -> None:
        """Queue one rendered line on every destination."""
        line = (message + "\n").encode("utf-8", "backslashreplace")
        for sink in self.sinks:
            sink.put(line)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def _report_drops(destination: str, count: int) -> None:
    log.warning("log_lines_dropped", dropped=count, destination=destination)


def _report_reopen(destination: str, path: str, error: str | None) -> None:
    if error is None:
        log.info("log_file_reopened", path=path)
    else:
        log.error("log_file_reopen_failed", path=path, error=error, detail="still writing to the old file")


_MULTI_LINE = ("exception", "stack")
"""Keys the console renderer prints on lines of their own after the event's line (tracebacks)."""


def escape_for_console(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor for the console format: every text, keys included, with its control
    characters escaped. Guests choose log messages, keys and values; raw, they could drive the
    terminal (ESC sequences) or start a line that reads as an event of ours (a newline, then a
    timestamp), which `wasmhost logs` would take for one. A traceback keeps its lines, each indented,
    so that no line of it starts like an event."""
    escaped: dict[str, Any] = {}
    for key, value in event_dict.items():
        if isinstance(value, str):
            if key in _MULTI_LINE:
                value = "  " + printable(value, newlines=True).replace("\n", "\n  ")
            else:
                value = printable(value)
        escaped[printable(key)] = value  # other values are printed with repr(), which escapes already
    return escaped


def configure_logging(level: str = "info", fmt: str = "auto", log_file: str | None = None) -> None:
    """Configure structlog for the daemon: every event gets timestamp, level and event name."""
    shutdown_logging(0.0)
    sys.stdout.flush()  # from here on stdout is written through its file descriptor only
    sinks = [LogSink("stdout", sys.stdout.fileno(), _report_drops)]
    if log_file:
        sinks.append(LogSink("log_file", open_log_file(log_file), _report_drops, path=log_file,
                             on_reopened=_report_reopen))
    _sinks[:] = sinks
    logger = BufferedLogger(sinks)
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    # JSON lines escape every control character already (json.dumps, ASCII only).
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=False)
    escape: list[Any] = [] if as_json else [escape_for_console]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *escape,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=lambda *args: logger,
        cache_logger_on_first_use=False,
    )


def reopen_log_files() -> None:
    """Reopen `log_file` by its path (SIGUSR1, after logrotate moved it away). Returns at once: the
    file's writer thread opens the new file before writing its next lines."""
    for sink in _sinks:
        sink.reopen()


def lines_dropped() -> int:
    """Log lines dropped so far because a destination could not keep up (summed over destinations)."""
    return sum(sink.dropped for sink in _sinks)


def shutdown_logging(timeout: float = FLUSH_TIMEOUT_S) -> bool:
    """Write what is buffered within `timeout` seconds; True when every destination caught up. Never
    hangs on a blocked destination."""
    deadline = time.monotonic() + timeout
    flushed = True
    for sink in _sinks:
        if not sink.close(deadline):
            flushed = False  # its writer is stuck in a write: leave its descriptor alone
        elif sink.fd > 2:
            os.close(sink.fd)
    _sinks.clear()
    return flushed
