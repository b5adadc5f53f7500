"""Bounded waits for state a test cannot be told about, only look at: a daemon subprocess's status, a NATS
server's answers, a writer thread's counters, an actor's stats. Each fails the test naming what it waited
for once its bound has passed; where an event can be awaited instead, tests await the event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import anyio

T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout: float = 30.0, every: float = 0.05) -> T:
    """Call `condition` every `every` seconds until it returns something true, and return that; fail
    naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


async def until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Yield to the event loop (5 ms at a time) until `condition()` is true; fail after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)
