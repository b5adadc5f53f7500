"""One load per distinct binary within one deployment pass (start-up or a reload).

10,000 components configured with the same `.wasm` file need one read, one digest, one validation and
one link check, not 10,000 of each on 10,000 threads (a thread start blocks the event loop until the
new thread holds the GIL: about 1.5 ms each on two busy cores, most of the start-up time measured).
What stays per component: whether the shared result fits its own max_memory_bytes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from wasmhost.runtime.limiter import StoreBudget
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.runtime import Runtime
from wasmhost.system.config import ComponentPlan
from wasmhost.system.detached import start_detached


class SharedLoads:
    """Loads the binaries of one deployment pass, each (path, wasi:http grant) once, on a detached thread.

    Made for one pass only: the next pass (a reload) reads the files again, so that an edited binary is
    seen. A waiter that is cancelled leaves the load running for the others; if all go away, its outcome
    is dropped."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._loads: dict[tuple[Path, bool], asyncio.Future[LoadedComponent]] = {}

    async def load(self, plan: ComponentPlan) -> LoadedComponent:
        """The component `plan` runs, compiled, validated and link-checked (wasi:http only with outbound_http),
        its footprint checked against its own max_memory_bytes (as `check` does, loading each binary once too);
        raises LoadError (shared by every plan of the same binary) or MemoryBudgetError (this plan's limit)."""
        key = (plan.wasm_path, plan.outbound_http)
        future = self._loads.get(key)
        if future is None:
            cid, path, http = plan.spec.component_id, plan.wasm_path, plan.outbound_http
            future = self._loads[key] = start_detached(lambda: self.runtime.load(cid, path, http), f"compile {cid}")
            future.add_done_callback(_consume)
        loaded = await asyncio.shield(future)
        StoreBudget.plan(plan.spec.limits.max_memory_bytes, loaded.footprint, str(loaded.source))
        return loaded


def _consume(future: asyncio.Future[LoadedComponent]) -> None:
    """Take a failed load's error out, so that asyncio does not report it as never retrieved when every
    waiter went away (each waiter that stayed has it raised)."""
    if not future.cancelled():
        future.exception()
