"""What a thread running guest code tells its scheduler about how it spends its time.

Blocking sections: code about to wait on something other than the CPU (a guest's sleep, a storage
commit) says so, and the scheduler running it on a fixed set of threads lends another thread for
the wait, so that guests waiting in host calls do not take the threads the others need.

Computing: a guest call that used up a whole slice of fuel runs guest code (without the GIL) rather
than Python, so a second core helps it; the scheduler lets more threads run guest code at once only
then (see actors/workers.py).

The scheduler installs a hook on each of its threads; elsewhere (tests, tools) both cost nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
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
