"""`initialize` arguments lowered once per distinct configuration and shared by every Store.

A deployment of 10,000 components with one configuration lowered the same `component-config` value
10,000 times (a record holding a list, an option and a record: about 40 us of C allocations and
copies each, measured). wasmtime only reads a call's arguments (its first poll converts them into
values of its own), so one lowered value serves every `initialize` with that configuration, on any
thread at once. Lowered values are kept for the life of the process, up to KEPT_BYTES of C values in
all (a few hundred bytes per configuration without `config_data`); a configuration beyond that is
lowered for its call and freed after it, as before.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from wasmhost.core.metadata import ComponentConfig
from wasmhost.runtime import capi
from wasmhost.runtime.capi import ENTRY_SIZE, VAL_SIZE
from wasmhost.runtime.codec import Converter

KEPT_BYTES = 1 << 20
"""Room for lowered configurations, in bytes of C values (an estimate: see `_size`)."""


def config_value(config: ComponentConfig) -> dict[str, Any]:
    """`config` as the WIT `component-config` record the converters lower."""
    limits = config.resource_limits
    return {
        "env-vars": [tuple(pair) for pair in config.env_vars],
        "config-data": config.config_data,
        "resource-limits": {
            "max-memory-bytes": limits.max_memory_bytes,
            "max-execution-time-ms": limits.max_execution_time_ms,
            "max-fuel": limits.max_fuel,
        },
    }


def _size(config: ComponentConfig) -> int:
    """About the bytes of C values `config` lowers to: a value per byte of config data (list<u8>),
    three per environment variable (a tuple of two strings) and their text, the records' entries."""
    text = sum(len(name) + len(value) for name, value in config.env_vars)
    values = 8 + 3 * len(config.env_vars) + len(config.config_data or b"")
    return values * VAL_SIZE + 6 * ENTRY_SIZE + 4 * text


class LoweredConfigs:
    """The lowered `initialize` argument of each configuration seen, up to KEPT_BYTES (any thread)."""

    def __init__(self, kept_bytes: int = KEPT_BYTES) -> None:
        self._kept: dict[tuple[str, ComponentConfig], ctypes.Array[ctypes.c_uint8]] = {}
        self._bytes = 0
        self._room = kept_bytes
        self._adding = threading.Lock()

    def address(self, converter: Converter, config: ComponentConfig) -> int | None:
        """The address of `config` lowered by `converter`, valid for the life of the process; None
        when there is no room left for it (lower it for the call then)."""
        key = (converter.wit, config)
        kept = self._kept.get(key)
        if kept is not None:
            return ctypes.addressof(kept)
        size = _size(config)
        if self._bytes + size > self._room:
            return None
        value = (ctypes.c_uint8 * VAL_SIZE)()
        converter.lower(config_value(config), ctypes.addressof(value))
        with self._adding:
            kept = self._kept.get(key)  # another thread may have lowered the same one meanwhile
            if kept is None and self._bytes + size <= self._room:
                self._kept[key] = value
                self._bytes += size
                return ctypes.addressof(value)
        capi.val_delete(ctypes.addressof(value))
        return None if kept is None else ctypes.addressof(kept)


LOWERED_CONFIGS = LoweredConfigs()
"""The process's lowered configurations, shared by every StoreManager."""
