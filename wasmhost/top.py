"""`wasmhost top`: a refreshing table of the daemon's components, sorted by messages per second or any column.

Each frame is one `status` answer; messages per second come from the difference between two successive
answers (handled + failed, over the time between them), so one status request per refresh is all it
costs the daemon, at 10,000 components too: only the rows that fit the terminal are drawn. Plain ANSI
escapes and termios from the standard library: no curses window, no new dependency.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from wasmhost.core.terminal import printable

Row = dict[str, Any]
Fetch = Callable[[], list[Row]]


@dataclass(frozen=True)
class Column:
    """One column of the table: its heading, width, how a row's cell reads, and how it sorts."""

    key: str
    heading: str
    width: int
    numeric: bool  # numbers sort largest first, text alphabetically


COLUMNS = (
    Column("id", "ID", 28, False),
    Column("state", "STATE", 13, False),
    Column("health", "HEALTH", 9, False),
    Column("rate", "MSG/S", 9, True),
    Column("mailbox", "MAILBOX", 8, True),
    Column("p50", "P50 MS", 8, True),
    Column("p99", "P99 MS", 8, True),
    Column("restarts", "RESTARTS", 9, True),
    Column("failed", "FAILED", 7, True),
    Column("memory", "MEMORY", 9, True),
    Column("error", "LAST ERROR", 0, False),
)
SORT_KEYS = tuple(column.key for column in COLUMNS)
KEYS_HELP = "keys: 1-9,0 or </> sort column, r reverse, q quit"


def _value(row: Row, key: str) -> Any:
    """The raw value behind a column (None when the row has none)."""
    if key == "p50":
        return row.get("latency_p50_ms")
    if key == "p99":
        return row.get("latency_p99_ms")
    if key == "memory":
        return row.get("memory_bytes")
    if key == "error":
        return row.get("last_error")
    if key == "state" and row.get("phase"):
        return row["phase"]  # what a starting or restarting component is doing: compiling, initializing...
    return row.get(key)


def _cell(row: Row, key: str) -> str:
    value = _value(row, key)
    if value is None:
        return "-"
    if key == "rate":
        return f"{value:.1f}"
    if key in ("p50", "p99"):
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    if key == "memory":
        return format_bytes(int(value))
    if key == "error":  # the guest's text: its control characters shown, not obeyed
        lines = str(value).strip().splitlines() or [""]
        return printable(lines[0]) + (" ..." if len(lines) > 1 else "")
    return str(value)


def format_bytes(size: int) -> str:
    """A byte count as people read it: 512 B, 3.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


class Rates:
    """Messages per second of each component, from two successive status answers."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self._at: float | None = None

    def update(self, rows: list[Row], now: float) -> None:
        """Set each row's `rate` (None for the first answer: nothing to compare with yet)."""
        elapsed = None if self._at is None else now - self._at
        last = self._last
        counts = {}
        for row in rows:
            count = int(row.get("handled") or 0) + int(row.get("failed") or 0)
            counts[row["id"]] = count
            before = last.get(row["id"])
            row["rate"] = None if before is None or not elapsed else max(0, count - before) / elapsed
        self._last, self._at = counts, now


def sort_rows(rows: list[Row], key: str, reverse: bool = False) -> list[Row]:
    """Rows ordered by column `key`: numbers largest first, text A-Z (missing values last), then by id;
    `reverse` turns the column's order around."""
    numeric = next(column.numeric for column in COLUMNS if column.key == key)

    def order(row: Row) -> tuple[Any, ...]:
        value = _value(row, key)
        if value is None:
            return (1, 0, row["id"])
        return (0, -value if numeric else str(value), row["id"])

    ordered = sorted(rows, key=order)
    if reverse:
        present = [row for row in ordered if _value(row, key) is not None]
        ordered = present[::-1] + ordered[len(present):]
    return ordered


def render(rows: list[Row], key: str, reverse: bool, width: int, height: int | None) -> list[str]:
    """One frame: a title line, the headings and as many rows (best first) as fit `height` lines (all
    when None: a frame for scripts, without the keys), each cut to `width` characters. The MEMORY
    column shows only when the daemon reports it."""
    columns = [c for c in COLUMNS if c.key != "memory" or any(r.get("memory_bytes") is not None for r in rows)]
    ordered = sort_rows(rows, key, reverse)
    heading = next(c.heading for c in COLUMNS if c.key == key)
    room = len(ordered) if height is None else max(0, height - 2)
    states: dict[str, int] = {}
    for row in rows:
        states[row["state"]] = states.get(row["state"], 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "no components"
    shown = f"showing {room} of {len(rows)}, " if room < len(rows) else ""
    title = (f"wasmhost top: {len(rows)} components ({summary}); {shown}sorted by {heading}"
             f"{' (reversed)' if reverse else ''}" + (f"; {KEYS_HELP}" if height is not None else ""))

    def line(cells: list[str]) -> str:
        text = "  ".join(cell.ljust(c.width) if c.width else cell for cell, c in zip(cells, columns, strict=True))
        return text.rstrip()[:width]

    lines = [title[:width], line([c.heading + ("*" if c.key == key else "") for c in columns])]
    for row in ordered[:room]:
        lines.append(line([_fit(_cell(row, c.key), c.width) for c in columns]))
    return lines


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters (a cut ends in `~`); width 0: as it is."""
    return text if not width or len(text) <= width else text[: width - 1] + "~"


def once(fetch: Fetch, key: str, reverse: bool, interval: float, width: int) -> list[str]:
    """One frame for scripts: two status answers `interval` seconds apart (for the rates), every row."""
    rates = Rates()
    rates.update(fetch(), time.monotonic())
    time.sleep(interval)
    rows = fetch()
    rates.update(rows, time.monotonic())
    return render(rows, key, reverse, width, None)


KEY_MOVES = {b"<": -1, b">": 1, b"\x1b[D": -1, b"\x1b[C": 1}


def next_sort(pressed: bytes, key: str, reverse: bool) -> tuple[str, bool] | None:
    """The sort after a key press (None: quit): a digit picks the column (1 = first, 0 = tenth), < and >
    (or the arrow keys) the one before or after, each in its own order; r reverses; anything else
    changes nothing."""
    if pressed in (b"q", b"Q", b"\x03"):  # q, or Ctrl-C in raw mode
        return None
    index = SORT_KEYS.index(key)
    if pressed in KEY_MOVES:
        return SORT_KEYS[(index + KEY_MOVES[pressed]) % len(SORT_KEYS)], False
    if pressed.isdigit() and len(pressed) == 1:
        chosen = (int(pressed) - 1) % 10
        return (SORT_KEYS[chosen], False) if chosen < len(SORT_KEYS) else (key, reverse)
    if pressed in (b"r", b"R"):
        return key, not reverse
    return key, reverse


def _keys(data: bytes) -> Iterator[bytes]:
    """Split what one read returned into key presses (an escape sequence is one)."""
    while data:
        if data.startswith(b"\x1b[") and len(data) >= 3:
            yield data[:3]
            data = data[3:]
        else:
            yield data[:1]
            data = data[1:]


@contextlib.contextmanager
def _terminal(fd_in: int, out: Any) -> Iterator[None]:
    """Keys without Enter or echo, the alternate screen and no cursor; all put back however it ends."""
    saved = termios.tcgetattr(fd_in)
    tty.setcbreak(fd_in)
    out.write("\x1b[?1049h\x1b[?25l")
    out.flush()
    try:
        yield
    finally:
        out.write("\x1b[?25h\x1b[?1049l")
        out.flush()
        termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)


def live(fetch: Fetch, key: str, reverse: bool, interval: float) -> None:
    """Redraw every `interval` seconds (and at once after a key) until q."""
    fd_in = sys.stdin.fileno()
    out = sys.stdout
    rates = Rates()
    rows: list[Row] = []
    due = 0.0
    with _terminal(fd_in, out):
        while True:
            now = time.monotonic()
            if now >= due:
                rows = fetch()
                rates.update(rows, time.monotonic())
                due = now + interval
            size = shutil.get_terminal_size()
            frame = render(rows, key, reverse, size.columns, size.lines)
            out.write("\x1b[H\x1b[2J" + "\n".join(frame))  # cbreak keeps output processing: \n is CR LF
            out.flush()
            ready, _, _ = select.select([fd_in], [], [], max(0.0, due - time.monotonic()))
            if not ready:
                continue
            data = os.read(fd_in, 64)
            if not data:
                return  # stdin closed
            for pressed in _keys(data):
                sort = next_sort(pressed, key, reverse)
                if sort is None:
                    return
                key, reverse = sort
