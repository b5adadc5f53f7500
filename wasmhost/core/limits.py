"""Resource limits applied to one component."""

from __future__ import annotations

import msgspec

DEFAULT_MAX_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_EXECUTION_TIME_MS = 30_000
MAX_EXECUTION_TIME_MS = 86_400_000
"""A call's deadline is at most a day (the config's bound on every timeout): the worker pool's deadline thread
waits for the earliest deadline, and Python refuses a wait past about 292 years (OverflowError), which ended
that thread and with it every component's deadlines."""
DEFAULT_MAX_OUTSTANDING_REQUESTS = 4096
"""Requests a component may have outstanding (sent, their callback not yet handled) before `request`
fails with queue-full: their answers wait in its own mailbox past its capacity (README, "Threat model")."""

# What one component's Store may create, whatever its max_memory_bytes (README, "Threat model").
# A componentize-py guest creates 14 core instances, 1 memory and 2 tables.
MAX_INSTANCES = 100
"""Core module instances per Store (a component counted at load with more is refused; the Store
limit also leaves room for the adapter instances wasmtime adds between nested components)."""
MAX_COMPONENT_INSTANCES = 100
"""Component instances per component (wit-component makes one or two; each costs host memory, and
wasmtime's compiler flattens them all, so they are counted before compiling)."""
MAX_MEMORIES = 16
"""Linear memories per Store (each also reserves address space, however little of it is used)."""
MAX_TABLES = 100
"""Tables per Store."""
TABLE_ELEMENT_BYTES = 8
"""What one table element is counted as against max_memory_bytes (wasmtime stores a pointer)."""
MIN_TABLE_ELEMENTS = 10_000
"""Every table may grow to this many elements, or to twice the largest table the component
declares if that is more (a componentize-py guest declares 5,688)."""


class ResourceLimits(msgspec.Struct, frozen=True):
    """Memory cap, per-call wall-clock deadline and optional per-call fuel budget."""

    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    max_execution_time_ms: int = DEFAULT_MAX_EXECUTION_TIME_MS
    max_fuel: int | None = None

    def __post_init__(self) -> None:
        for label, value in (
            ("max_memory_bytes", self.max_memory_bytes),
            ("max_execution_time_ms", self.max_execution_time_ms),
            ("max_fuel", self.max_fuel),
        ):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value >= 2**64:
                raise ValueError(f"resource limits: {label} must be an integer in 1..2^64-1, got {value!r}")
        if self.max_execution_time_ms > MAX_EXECUTION_TIME_MS:
            raise ValueError(f"resource limits: max_execution_time_ms must be at most {MAX_EXECUTION_TIME_MS} "
                             f"(a day), got {self.max_execution_time_ms!r}")
