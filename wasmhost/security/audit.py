"""The audit log of capability denials: every denial counted; repeated ones, and a component's denials
beyond a few lines per interval, rate-limited in the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from wasmhost.core.ids import ComponentId

log = structlog.get_logger("wasmhost.audit")

LINES_PER_INTERVAL = 20
"""`capability_denied` lines one component may cause per interval: a guest trying endless distinct
targets must not write the host's log at the rate it calls."""
REMEMBERED = 4096
"""(component, action, target) triples remembered before those older than the interval are dropped."""


class AuditLog:
    """Logs a denial once per (component, action, target) and interval, at most LINES_PER_INTERVAL per
    component and interval; counts all of them. A logged line says with `suppressed=N` how many denials
    of its component went unlogged since that component's previous line."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], float] = {}  # when each triple was last logged
        self._prune_at = REMEMBERED
        self._windows: dict[str, tuple[float, int]] = {}  # per component: its interval's start, lines logged
        self._suppressed: dict[str, int] = {}  # per component: denials not logged since its last line
        self._counts: dict[str, int] = {}

    def record_denial(self, component: ComponentId, action: str, target: str) -> None:
        """Count a denial and log it unless an identical one was logged within the interval or its
        component has used up its lines for this interval."""
        name = str(component)
        key = (name, action, target)
        now = self.clock()
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            started, lines = self._windows.get(name, (now, 0))
            if now - started >= self.interval:
                started, lines = now, 0
            last = self._last.get(key)
            if (last is not None and now - last < self.interval) or lines >= LINES_PER_INTERVAL:
                self._windows[name] = (started, lines)
                self._suppressed[name] = self._suppressed.get(name, 0) + 1
                return
            self._windows[name] = (started, lines + 1)
            self._last[key] = now
            if len(self._last) > self._prune_at:
                self._forget_before(now - self.interval)
            suppressed = self._suppressed.pop(name, 0)
        extra = {"suppressed": suppressed} if suppressed else {}
        log.warning("capability_denied", component=name, action=action, target=target, denied=True, **extra)

    def _forget_before(self, moment: float) -> None:
        """Drop the triples last logged before `moment` (self._lock held): they no longer suppress."""
        self._last = {key: at for key, at in self._last.items() if at >= moment}
        self._prune_at = max(REMEMBERED, 2 * len(self._last))  # pruning stays amortised O(1) per denial

    def forget(self, component: ComponentId) -> None:
        """Drop what is kept for `component`, which a reload removed: its count (read by the metrics only for
        configured components), its interval and its unlogged denials. Reload after reload, an entry per
        sender ever removed stayed. Its triples go as they age (`_forget_before`)."""
        name = str(component)
        with self._lock:
            self._counts.pop(name, None)
            self._windows.pop(name, None)
            self._suppressed.pop(name, None)

    def components(self) -> set[str]:
        """The components anything is kept for beyond their recent triples (counts, intervals, unlogged denials)."""
        with self._lock:
            return set(self._counts) | set(self._windows) | set(self._suppressed)

    def denials(self, component: ComponentId | None = None) -> int:
        """Denials of one component, or of all."""
        with self._lock:
            if component is None:
                return sum(self._counts.values())
            return self._counts.get(str(component), 0)

    def snapshot(self) -> dict[str, int]:
        """Denials per component."""
        with self._lock:
            return dict(self._counts)
