"""`initialize` receives exactly its own component-config, whether its lowered form is shared with
other Stores (the same configuration), kept from an earlier boot (a restart), or lowered for the one
call (no room left). Real guests: the `configured` fixture answers with the config it was given."""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import Starter
from tests.test_runtime_calls import message
from wasmhost.core import ComponentConfig
from wasmhost.core.limits import ResourceLimits
from wasmhost.runtime import store
from wasmhost.runtime.lowered_configs import LoweredConfigs
from wasmhost.runtime.store import StoreManager

PLAIN = ComponentConfig()
FULL = ComponentConfig(
    env_vars=(("MODE", "test"), ("ZONE", "é-1")),
    config_data=b'{"k": 1}',
    resource_limits=ResourceLimits(max_memory_bytes=1 << 22, max_execution_time_ms=250, max_fuel=10_000),
)


def expected(config: ComponentConfig) -> bytes:
    """The text the `configured` guest makes of `config`."""
    limits = config.resource_limits
    env = "".join(f"{name}={value};" for name, value in config.env_vars)
    data = config.config_data if config.config_data is not None else b"-"
    fuel = "-" if limits.max_fuel is None else str(limits.max_fuel)
    return (f"env {env}|data ".encode() + data
            + f"|mem {limits.max_memory_bytes}|time {limits.max_execution_time_ms}|fuel {fuel}".encode())


def given(manager: StoreManager) -> bytes | None:
    return manager.handle_message(message(b""))


def booted(start: Starter, config: ComponentConfig) -> StoreManager:
    manager = start("configured", initialize=False)
    manager.initialize(config)
    return manager


def test_each_instance_gets_its_own_config_when_configurations_are_shared(start: Starter) -> None:
    managers = [booted(start, config) for config in (FULL, PLAIN, FULL, PLAIN, FULL)]
    assert [given(m) for m in managers] == [expected(c) for c in (FULL, PLAIN, FULL, PLAIN, FULL)]
    assert expected(FULL) == b'env MODE=test;ZONE=\xc3\xa9-1;|data {"k": 1}|mem 4194304|time 250|fuel 10000'
    restarted = managers[0]
    restarted.instantiate()  # a restart: a fresh Store, the same configuration again
    restarted.initialize(FULL)
    assert given(restarted) == expected(FULL)


def test_a_configuration_beyond_the_room_is_lowered_for_its_call(
        start: Starter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LOWERED_CONFIGS", LoweredConfigs(kept_bytes=0))
    large = ComponentConfig(config_data=bytes(range(256)) * 64)
    assert given(booted(start, large)) == expected(large)
    assert given(booted(start, FULL)) == expected(FULL)
    empty = ComponentConfig(config_data=b"")
    assert given(booted(start, empty)) == expected(empty) == b"env |data |mem 67108864|time 30000|fuel -"


def test_kept_values_are_shared_bounded_and_told_apart_by_type(start: Starter) -> None:
    """Our own bookkeeping: one value per (type, configuration), until the room is used up."""
    converter = start("configured", initialize=False).loaded.exports["initialize"].params[0]
    kept = LoweredConfigs(kept_bytes=4096)
    first = kept.address(converter, FULL)
    assert first is not None and kept.address(converter, FULL) == first
    assert kept.address(converter, ComponentConfig(env_vars=FULL.env_vars)) not in (None, first)
    assert kept.address(converter, ComponentConfig(config_data=bytes(4096))) is None  # no room for it

    class Renamed:
        """The same lowering under another WIT type name: kept apart."""
        wit = converter.wit + " (another)"
        lower = converter.lower

    assert kept.address(Renamed(), FULL) not in (None, first)  # type: ignore[arg-type]


def test_threads_asking_at_once_share_one_kept_value(start: Starter) -> None:
    converter = start("configured", initialize=False).loaded.exports["initialize"].params[0]
    kept = LoweredConfigs()
    gate = threading.Barrier(8)

    def ask(_: int) -> int | None:
        gate.wait(timeout=10)
        return kept.address(converter, FULL)

    with ThreadPoolExecutor(8) as pool:
        addresses = set(pool.map(ask, range(8)))
    assert len(addresses) == 1 and None not in addresses
    (address,) = addresses
    assert ctypes.c_uint8.from_address(address).value != 0  # a lowered record, not a cleared slot
