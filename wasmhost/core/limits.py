"""Resource limits applied to one component."""

from __future__ import annotations

import msgspec

DEFAULT_MAX_MEMORY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_EXECUTION_TIME_MS = 30_000


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
