"""Blocking work (compiling a component) on threads that nobody waits for on exit.

A compile cannot be interrupted: 8-17 s for an 18 MB componentize-py guest. A stop must not wait for
it, so it runs on a daemon thread of its own, not on asyncio's default executor (which `asyncio.run`
/ `uvloop.run` join on exit) nor anyio's worker threads (joined when the event loop ends); the awaiting
task can be cancelled at once, and the thread's result is then dropped. `cmd_run` checks `busy()` to
leave the process without finalizing the interpreter under a thread still inside wasmtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from wasmhost.core import affinity

T = TypeVar("T")

_lock = threading.Lock()
_running = 0


def busy() -> bool:
    """Whether a detached thread is still working."""
    with _lock:
        return _running > 0


def start_detached(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Start `fn` on a new daemon thread; the returned future (of the running loop) gets its result.
    Cancelling the future abandons the work (its result is dropped); several waiters can share it
    through `asyncio.shield`."""
    global _running
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def work() -> None:
        global _running
        result: Any = None
        error: BaseException | None = None
        try:
            affinity.roam()  # compiles run outside the GIL: any core
            result = fn()
        except BaseException as exc:  # handed to the waiter, whatever it is
            error = exc
        finally:
            with _lock:
                _running -= 1
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, result, error)

    with _lock:
        _running += 1
    try:  # a plain thread: anyio has no thread it does not join (see the module docstring)
        threading.Thread(target=work, name=name, daemon=True).start()
    except BaseException:
        with _lock:
            _running -= 1
        raise
    return future


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
