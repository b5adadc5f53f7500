"""Restart policies, group strategies, exponential backoff and restart intensity."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass


class RestartPolicy(enum.Enum):
    """When a component is restarted."""

    PERMANENT = "permanent"  # after a failure and after a normal exit
    TRANSIENT = "transient"  # only after a failure (trap, timeout, failed initialize)
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which members of a supervisor group restart when one fails."""

    ONE_FOR_ONE = "one-for-one"  # only the failed component
    ONE_FOR_ALL = "one-for-all"  # every component of the group
    REST_FOR_ONE = "rest-for-one"  # the failed one and those started after it in the group


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th consecutive restart: base * 2^n, capped at `maximum` (seconds)."""

    base: float = 0.05
    maximum: float = 5.0

    def delay(self, attempt: int) -> float:
        """Delay before restart number `attempt` (0 for the first)."""
        return float(min(self.maximum, self.base * (2 ** min(attempt, 62))))


@dataclass(frozen=True)
class Intensity:
    """At most `max_restarts` restarts within `window` seconds, then the component is failed."""

    max_restarts: int = 5
    window: float = 60.0


class RestartHistory:
    """Restarts of one component inside the sliding intensity window."""

    def __init__(self, intensity: Intensity) -> None:
        self.intensity = intensity
        self._times: deque[float] = deque()
        self.consecutive = 0

    def allow(self, now: float) -> bool:
        """Record a restart at `now` if the intensity allows it; False means give up."""
        window_start = now - self.intensity.window
        while self._times and self._times[0] < window_start:
            self._times.popleft()
        if len(self._times) >= self.intensity.max_restarts:
            return False
        self._times.append(now)
        self.consecutive += 1
        return True

    def settled(self) -> None:
        """The component ran fine again: the next failure starts the backoff from its base."""
        self.consecutive = 0
