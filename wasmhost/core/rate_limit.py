"""RateLimit and TokenBucket: how many events per second something may produce, with a burst."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_LOG_RATE = 100.0
"""Guest log lines per second a component may write on average."""
DEFAULT_LOG_BURST = 1000
"""Guest log lines a component may write at once before the rate applies."""


@dataclass(frozen=True)
class RateLimit:
    """`rate` events per second on average, up to `burst` at once."""

    rate: float = DEFAULT_LOG_RATE
    burst: int = DEFAULT_LOG_BURST

    def __post_init__(self) -> None:
        if not self.rate > 0 or self.rate == float("inf"):
            raise ValueError(f"rate limit: rate must be a finite number > 0, got {self.rate!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"rate limit: burst must be an integer >= 1, got {self.burst!r}")


class TokenBucket:
    """A token bucket: starts full with `burst` tokens, refills at `rate` per second, one token per event.

    Not thread-safe on its own: the caller holds a lock when several threads share one bucket.
    """

    __slots__ = ("burst", "clock", "rate", "stamp", "tokens")

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = limit.rate
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.clock = clock
        self.stamp = clock()

    def take(self) -> bool:
        """Spend one token if there is one; False means the event is over the limit."""
        now = self.clock()
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
