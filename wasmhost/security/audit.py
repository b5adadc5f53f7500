"""The audit log of capability denials: every denial counted, repeated ones rate-limited in the log."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from wasmhost.core.ids import ComponentId

log = structlog.get_logger("wasmhost.audit")


class AuditLog:
    """Logs a denial once per (component, action, target) and interval; counts all of them."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], float] = {}
        self._suppressed: dict[tuple[str, str, str], int] = {}
        self._counts: dict[str, int] = {}

    def record_denial(self, component: ComponentId, action: str, target: str) -> None:
        """Count a denial and log it unless an identical one was logged within the interval."""
        key = (str(component), action, target)
        now = self.clock()
        with self._lock:
            self._counts[key[0]] = self._counts.get(key[0], 0) + 1
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        extra = {"suppressed": suppressed} if suppressed else {}
        log.warning("capability_denied", component=key[0], action=action, target=target, denied=True, **extra)

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
