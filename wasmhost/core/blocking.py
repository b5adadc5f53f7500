"""What a thread running guest code tells its scheduler about how it spends its time.

Blocking sections: code about to wait on something other than the CPU (a storage commit, a guest's
sleep where nothing sets its call aside) says so, and the scheduler running it on a fixed set of
threads lends another thread for the wait, so that guests waiting in host calls do not take the
threads the others need.

Sleeping: a guest call suspended in a sleep yields Asleep, and needs no thread until it wakes (see
actors/workers.py); only where nothing sets it aside does a thread wait for it.

Computing: a guest call that used up a whole slice of fuel runs guest code (without the GIL) rather
than Python, so a second core helps it; the scheduler lets more threads run guest code at once only
then (see actors/workers.py).

The scheduler installs a hook on each of its threads; elsewhere (tests, tools) both cost nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class BlockingHook(Protocol):
    """What a scheduler does when one of its threads starts and stops waiting."""

    def enter_blocking(self) -> None:
        """The calling thread is about to wait."""

    def leave_blocking(self) -> None:
        """The calling thread is running again."""

    def computing(self) -> None:
        """The calling thread's current step ran a whole slice of guest code."""


_local = threading.local()


def install(hook: BlockingHook | None) -> None:
    """Make `hook` the calling thread's (None removes it)."""
    _local.hook = hook


@contextmanager
def blocking() -> Iterator[None]:
    """Wrap a wait of the calling thread, so that its scheduler can lend a thread meanwhile."""
    hook: BlockingHook | None = getattr(_local, "hook", None)
    if hook is None:
        yield
        return
    hook.enter_blocking()
    try:
        yield
    finally:
        hook.leave_blocking()


def computing() -> None:
    """Tell the calling thread's scheduler that the step it runs spent a whole slice in guest code."""
    hook: BlockingHook | None = getattr(_local, "hook", None)
    if hook is not None:
        hook.computing()


class Sleeper(Protocol):
    """Whose guest sleeps: how a scheduler waits for it (see Asleep)."""

    def wake_me(self, wake: Callable[[], None] | None) -> bool:
        """Have an interrupt of the sleep call `wake` (from any thread; None: no longer). False, and
        `wake` is not kept, when the sleep is interrupted already (it is over: step the call now)."""

    def wait_out(self, until: float) -> None:
        """Wait on the calling thread (a blocking section) until time.monotonic() reaches `until` or the
        sleep is interrupted."""


class Asleep(float):
    """What a step of a guest call yields when the call is suspended in a sleep (host-services.sleep-millis):
    its value is the call's deadline, as every step yields; the call needs no thread until time.monotonic()
    reaches `until`, or until the sleep is interrupted (`sleeper`), and its next step then goes on with the
    guest. A scheduler sets the call aside meanwhile (`sleeper.wake_me` tells it of an interrupt); one that
    does not know of it may wait on its thread (`sleeper.wait_out`) or step it again at once (the step only
    yields Asleep again, after a poll of a few microseconds)."""

    until: float
    sleeper: Sleeper

    def __new__(cls, deadline: float, until: float, sleeper: Sleeper) -> Asleep:
        asleep = super().__new__(cls, deadline)
        asleep.until = until
        asleep.sleeper = sleeper
        return asleep
