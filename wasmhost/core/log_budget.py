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
"""Keys kept before those whose window has passed are let go."""
LEFT_OUT_KEPT_S = 60.0
"""How long after its window a key with lines left out is still remembered (once REMEMBERED keys are), for its
next line to say how many: a key that stays quiet longer (a component removed, a target no longer named) is
let go with its count, which only a next line would have reported."""


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
        self._prune_at = REMEMBERED

    def __len__(self) -> int:
        """The keys remembered."""
        return len(self._windows)

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
            if key not in self._windows and len(self._windows) >= self._prune_at:
                self._forget_old(now)
            self._windows[key] = (started, written + 1, 0)
            return left_out

    def fields(self, key: str) -> dict[str, object] | None:
        """`admit` as a log line's fields: None for a line to leave out, else `{"suppressed": N}` when N lines
        of `key` were left out since its previous line, `{}` when none were."""
        left_out = self.admit(key)
        if left_out is None:
            return None
        return {"suppressed": left_out} if left_out else {}

    def _forget_old(self, now: float) -> None:
        """Drop the keys whose window has passed (self._lock held): they limit nothing. Those with lines left out
        stay LEFT_OUT_KEPT_S longer. They stayed for good, one per key ever left out (a component removed, a
        target no longer named), and every new key then scanned them all again: 20,000 keys took 12 s."""
        self._windows = {key: window for key, window in self._windows.items()
                         if now - window[0] < self.interval + (LEFT_OUT_KEPT_S if window[2] else 0.0)}
        self._prune_at = max(REMEMBERED, 2 * len(self._windows))  # pruning stays amortised O(1) per key
