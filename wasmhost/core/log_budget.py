"""LogBudget: how many lines of one kind the host writes per key (a component) and interval, when a guest
decides how often the event happens; the rest are counted and the next line says how many."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

LINES_PER_INTERVAL = 20
"""Lines one key may cause per interval (as the audit log of denials allows)."""
INTERVAL_S = 10.0
REMEMBERED = 4096
"""Keys kept before those with nothing to report are let go."""


class LogBudget:
    """At most `lines` lines per key and `interval` seconds. `admit(key)` is None for a line to leave out
    (it is counted), else the number of lines of that key left out since its previous line (0 for none),
    for the line to carry as `suppressed=N`. Thread-safe."""

    def __init__(self, lines: int = LINES_PER_INTERVAL, interval: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lines = lines
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int, int]] = {}  # per key: window start, lines written, left out

    def admit(self, key: str) -> int | None:
        """Whether a line for `key` is written now: None (left out, counted), else how many were left out."""
        now = self.clock()
        with self._lock:
            started, written, left_out = self._windows.get(key, (now, 0, 0))
            if now - started >= self.interval:
                started, written = now, 0
            if written >= self.lines:
                self._windows[key] = (started, written, left_out + 1)
                return None
            if key not in self._windows and len(self._windows) >= REMEMBERED:
                self._forget_quiet(now)
            self._windows[key] = (started, written + 1, 0)
            return left_out

    def _forget_quiet(self, now: float) -> None:
        """Drop the keys whose window has passed with nothing left out (self._lock held): they limit nothing."""
        self._windows = {key: window for key, window in self._windows.items()
                         if window[2] or now - window[0] < self.interval}
