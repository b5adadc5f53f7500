"""Worker threads that run guest code, so the event loop never does."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def default_worker_count() -> int:
    """Enough threads that a few long-running guests cannot starve the others (the OS time-slices
    threads; wasm runs without the GIL)."""
    return max(8, 4 * (os.cpu_count() or 1))


class WorkerPool:
    """A fixed pool of threads for guest calls."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or default_worker_count()
        self._executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="wasmhost-guest")

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a worker thread and wait for it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        """Stop accepting work and let running calls finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)
