"""Applies ResourceLimits to a Store: memory budget once, fuel and epoch deadline before every call."""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import wasmtime

from wasmhost.core.errors import MemoryBudgetError
from wasmhost.core.limits import MAX_INSTANCES, MIN_TABLE_ELEMENTS, TABLE_ELEMENT_BYTES, ResourceLimits
from wasmhost.runtime import capi
from wasmhost.runtime.footprint import PAGE_BYTES, Footprint

UNLIMITED_FUEL = 2**63 - 1
"""Fuel given when a component has no fuel limit (wasmtime counts fuel in a signed 64-bit word)."""

SLICE_FUEL = 2_000_000
"""Fuel a guest burns before it yields its thread (one time slice): 0.2 - 2 ms of guest code
(measured: 0.2 ms of arithmetic with locals, 1.6 ms of an empty loop, the fastest fuel burns)."""

EPOCH_SLICE_TICKS = 1
"""A call also yields at every epoch tick, fuel or not: a guest spending its time in host functions
(whose work burns no fuel) is time-sliced too, and its deadline is checked at every yield."""

FIRST_SLICE_FUEL = SLICE_FUEL // 10
"""The first slice of every call is shorter: a burst of new long calls (hundreds of guests handed
work at once) then costs little before a short call that arrives behind them gets its turn."""

COMPUTING_FUEL_PER_S = 250_000_000
"""Guest code burns 1,000 - 10,000 fuel a microsecond (see SLICE_FUEL); a slice that burnt fuel at a
quarter of the slowest of those rates or faster spent most of its time in guest code, not in Python."""


@dataclass(frozen=True)
class StoreBudget:
    """The Store limits that keep everything a component's instantiation creates, grown as far as
    wasmtime lets it, within max_memory_bytes: each memory and each table gets an equal share."""

    memory_bytes: int
    """The most any one linear memory may hold."""
    table_elements: int
    """The most elements any one table may hold."""
    instances: int
    """MAX_INSTANCES, not the component's own count: wasmtime adds instances of the adapters it
    generates between nested components, which define no memories or tables."""
    memories: int
    tables: int

    @property
    def total_bytes(self) -> int:
        """Every memory and every table at its limit (table elements counted as TABLE_ELEMENT_BYTES)."""
        return self.memories * self.memory_bytes + self.tables * self.table_elements * TABLE_ELEMENT_BYTES

    @classmethod
    def plan(cls, max_memory_bytes: int, footprint: Footprint, source: str) -> StoreBudget:
        """Share `max_memory_bytes` out; MemoryBudgetError names what does not fit."""
        table_elements = max(MIN_TABLE_ELEMENTS, 2 * footprint.largest_table_min) if footprint.tables else 0
        table_bytes = footprint.tables * table_elements * TABLE_ELEMENT_BYTES
        memory_bytes = 0
        if footprint.memories:
            # Whole pages: wasm memories grow by pages, so a share between pages is unusable anyway.
            memory_bytes = max(0, max_memory_bytes - table_bytes) // footprint.memories // PAGE_BYTES * PAGE_BYTES
        if table_bytes > max_memory_bytes or memory_bytes < footprint.largest_memory_min:
            needed = footprint.memories * footprint.largest_memory_min + table_bytes
            parts = []
            if footprint.memories == 1:
                parts.append(f"1 linear memory starting at {footprint.largest_memory_min} bytes")
            elif footprint.memories:
                parts.append(f"{footprint.memories} linear memories sharing it equally, the largest starting at "
                             f"{footprint.largest_memory_min} bytes")
            if footprint.tables:
                parts.append(f"{_count(footprint.tables, 'table', 'tables')} of up to {table_elements} elements "
                             f"at {TABLE_ELEMENT_BYTES} bytes each")
            raise MemoryBudgetError(
                source,
                f"max_memory_bytes = {max_memory_bytes} is too small for what the component creates: "
                f"{' and '.join(parts)}; it needs at least {needed}",
            )
        return cls(
            min(memory_bytes, 2**63 - 1), table_elements, MAX_INSTANCES, footprint.memories, footprint.tables
        )


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


class Limiter:
    """The limits of one component, turned into Store settings."""

    def __init__(
        self, limits: ResourceLimits, tick_ms: int, footprint: Footprint, source: str = "component"
    ) -> None:
        self.limits = limits
        self.footprint = footprint
        self.source = source
        self.tick_ms = tick_ms
        self.short_slice_s = tick_ms / 4000
        """A slice an epoch tick ends sooner than this (a quarter of a tick) has not had its turn."""
        self.fuel = min(limits.max_fuel, UNLIMITED_FUEL) if limits.max_fuel is not None else UNLIMITED_FUEL
        # One extra tick: the current tick may be nearly over when the deadline is armed, so the
        # guest is interrupted between the limit and the limit plus one tick, never before it.
        self.deadline_ticks = math.ceil(limits.max_execution_time_ms / tick_ms) + 1
        self.deadline_s = limits.max_execution_time_ms / 1000
        self.fuel_unset = True
        self.epoch_yields = False  # set once the Store's calls are async (start_epoch_yields)
        self.fuel_used = 0
        """Fuel the calls on this component's Stores burnt, counted as each call ends (for metrics)."""
        self._fuel_level = 0  # fuel in the Store when it was last set or counted
        self._slice_level = 0  # fuel in the Store when the current slice began
        self._fuel_out = ctypes.c_uint64()
        self._fuel_out_address = ctypes.addressof(self._fuel_out)

    def apply(self, store: wasmtime.Store) -> None:
        """Set every limit wasmtime offers on a fresh Store (memory.grow and table.grow beyond them
        return -1 in the guest; creating more instances, memories or tables fails instantiation).
        Raises MemoryBudgetError when max_memory_bytes cannot hold what the component creates."""
        self.fuel_unset = True
        self.epoch_yields = False
        budget = StoreBudget.plan(self.limits.max_memory_bytes, self.footprint, self.source)
        store.set_limits(
            memory_size=budget.memory_bytes,
            table_elements=budget.table_elements,
            instances=budget.instances,
            tables=budget.tables,
            memories=budget.memories,
        )

    def start_epoch_yields(self, context: int) -> Callable[[], None]:
        """From now on (async calls only) the Store's guest yields at every epoch tick instead of
        trapping at its epoch deadline. Returns what gives the guest a whole slice again, from a
        host function (at least one full tick: the current one may be nearly over)."""
        capi.context_epoch_deadline_async_yield_and_update(context, EPOCH_SLICE_TICKS)
        self.epoch_yields = True
        return functools.partial(capi.context_set_epoch_deadline, context, EPOCH_SLICE_TICKS + 1)

    def count_fuel(self, context: int) -> None:
        """Add what the call that just ended burnt to `fuel_used` (on the thread that owns the Store:
        one wasmtime call, about as cheap as arming)."""
        error = capi.context_get_fuel(context, self._fuel_out_address)
        if error:  # fuel is always on (see engine.py): not expected
            capi.take_error(error)
            return
        remaining = self._fuel_out.value
        self.fuel_used += max(0, self._fuel_level - remaining)
        self._fuel_level = remaining

    def end_slice(self, context: int, interval: int, seconds: float) -> tuple[bool, bool]:
        """(ran_out, computed) for the slice of the call in progress that just yielded after `seconds`.
        ran_out: it used up its fuel (`interval`, the yield interval in force) rather than reaching an
        epoch tick. computed: besides, it burnt fuel at COMPUTING_FUEL_PER_S or faster, so it was spent
        in guest code (a guest looping over host functions burns fuel slowly and yields at epoch
        ticks). Measured per slice: after a slice that an epoch tick ended, wasmtime reports the next
        one as having burnt the previous interval's unused fuel too."""
        error = capi.context_get_fuel(context, self._fuel_out_address)
        if error:  # fuel is always on (see engine.py): not expected
            capi.take_error(error)
            return False, False
        remaining = self._fuel_out.value
        burnt, self._slice_level = self._slice_level - remaining, remaining
        ran_out = burnt >= interval
        return ran_out, ran_out and burnt >= seconds * COMPUTING_FUEL_PER_S

    def arm(self, context: int, deadline_ms: int | None = None) -> float:
        """Refill fuel and arm the epoch deadline for one call on the Store with this context
        address (a shorter `deadline_ms` may replace the limit); return the monotonic deadline.
        Before `start_epoch_yields` the epoch deadline traps the guest at the deadline; after it,
        the guest yields every epoch tick and its poller enforces the deadline."""
        if self.limits.max_fuel is not None or self.fuel_unset:
            # Unlimited fuel is set once: 2^63 units cannot run out between calls.
            self.fuel_unset = False
            error = capi.context_set_fuel(context, self.fuel)
            if error:
                raise RuntimeError(f"cannot set fuel: {capi.take_error(error)}")
            self._fuel_level = self.fuel
        self._slice_level = self._fuel_level
        if self.epoch_yields:
            # The epoch deadline is a yield point now (see EPOCH_SLICE_TICKS); whoever polls the call
            # ends it at the first yield past the returned deadline.
            capi.context_set_epoch_deadline(context, EPOCH_SLICE_TICKS)
            return time.monotonic() + (self.deadline_s if deadline_ms is None else deadline_ms / 1000)
        if deadline_ms is None:
            capi.context_set_epoch_deadline(context, self.deadline_ticks)
            return time.monotonic() + self.deadline_s
        capi.context_set_epoch_deadline(context, math.ceil(deadline_ms / self.tick_ms) + 1)
        return time.monotonic() + deadline_ms / 1000
