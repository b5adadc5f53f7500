"""Blocking sections: code about to wait on something other than the CPU (a guest's sleep, a storage
commit) says so, and the scheduler running it on a fixed set of threads lends another thread for
the wait, so that guests waiting in host calls do not take the threads the others need.

The scheduler installs a hook on each of its threads; elsewhere (tests, tools) a blocking section
costs nothing.
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
