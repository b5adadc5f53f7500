"""StoreManager: one wasmtime Store per component instance and typed calls into its lifecycle exports."""

from __future__ import annotations

import ctypes
import enum
from typing import Any

import wasmtime
from wasmtime import component as wc

from wasmhost.core.errors import (
    ComponentError,
    FuelExhausted,
    GuestExit,
    GuestFailure,
    GuestTimeout,
    GuestTrap,
    InstanceStateError,
    InstantiationError,
    WasmError,
)
from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.messages import ComponentMessage
from wasmhost.core.metadata import ComponentConfig, ComponentMetadata, HealthStatus
from wasmhost.runtime import capi
from wasmhost.runtime.capi import VAL_SIZE
from wasmhost.runtime.codec import Err, ResultConverter
from wasmhost.runtime.host_fn import HostContext, register_context, unregister_context
from wasmhost.runtime.limiter import Limiter
from wasmhost.runtime.loader import LoadedComponent
from wasmhost.runtime.message_arg import message_argument


class InstanceState(enum.Enum):
    """Where a StoreManager is in its life."""

    EMPTY = "empty"  # no Store yet, or closed
    INSTANTIATED = "instantiated"
    INITIALIZED = "initialized"
    DEAD = "dead"  # a trap poisoned the Store: instantiate again


def classify_trap(component: str, function: str, message: str) -> GuestFailure:
    """Turn a wasmtime trap message into timeout, fuel exhaustion or a plain trap."""
    if "all fuel consumed" in message:
        return FuelExhausted(component, function, message)
    if "interrupt" in message:
        return GuestTimeout(component, function, message)
    if "exit status" in message:
        return GuestExit(component, function, message)
    return GuestTrap(component, function, message)


def _config_value(config: ComponentConfig) -> dict[str, Any]:
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


def wasi_config(stdio: bool) -> wasmtime.WasiConfig:
    """WASI for one Store: no files, environment, arguments or network; with `stdio`, the guest's
    stdout and stderr go to the daemon's (a fresh config each time: a Store consumes it)."""
    config = wasmtime.WasiConfig()
    if stdio:
        config.inherit_stdout()
        config.inherit_stderr()
    return config


class StoreManager:
    """Owns one Store and instance of a component; used by one thread at a time."""

    def __init__(
        self,
        loaded: LoadedComponent,
        component_id: ComponentId,
        limits: ResourceLimits,
        linker: wc.Linker,
        engine: wasmtime.Engine,
        tick_ms: int,
        host: HostContext | None = None,
        wasi_stdio: bool = False,
    ) -> None:
        self.loaded = loaded
        self.component_id = component_id
        self.name = str(component_id)
        self.limiter = Limiter(limits, tick_ms, loaded.footprint, self.name)
        self.linker = linker
        self.engine = engine
        self.host = host or HostContext(component_id)
        self.wasi_stdio = wasi_stdio
        self.state = InstanceState.EMPTY
        self.store: wasmtime.Store | None = None
        self.context = 0
        self._funcs: dict[str, wc.Func] = {}
        self._func_addresses: dict[str, int] = {}
        self._result = (ctypes.c_uint8 * VAL_SIZE)()
        self._result_address = ctypes.addressof(self._result)
        self._message_results: dict[str, ResultConverter] = {}
        for name in ("handle-message", "handle-callback"):
            result = loaded.exports[name].result
            assert isinstance(result, ResultConverter), "the loader checked these signatures"
            self._message_results[name] = result

    # --- lifecycle of the Store ---

    def instantiate(self) -> None:
        """Create a fresh Store and instance (dropping any previous one)."""
        self.close()
        store = wasmtime.Store(self.engine)
        self.limiter.apply(store)
        if self.loaded.uses_wasi:
            store.set_wasi(wasi_config(self.wasi_stdio))
        context = capi.addr_of(store._context())
        register_context(context, self.host)
        try:
            self.host.deadline = self.limiter.arm(context)
            instance = self.linker.instantiate(store, self.loaded.component)
        except wasmtime.WasmtimeError as exc:
            unregister_context(context)
            raise InstantiationError(self.name, f"instantiation failed: {str(exc).strip()}") from None
        funcs = {}
        for name, spec in self.loaded.exports.items():
            func = instance.get_func(store, spec.index)
            if func is None:
                unregister_context(context)
                raise InstantiationError(self.name, f"export {name} vanished after instantiation")
            funcs[name] = func
        self.store, self.context, self._funcs = store, context, funcs
        self._func_addresses = {name: ctypes.addressof(f._func) for name, f in funcs.items()}
        self.state = InstanceState.INSTANTIATED

    def close(self) -> None:
        """Drop the Store and everything in it."""
        if self.context:
            unregister_context(self.context)
        self.store, self.context, self._funcs, self._func_addresses = None, 0, {}, {}
        self.state = InstanceState.EMPTY

    def _require(self, *states: InstanceState) -> None:
        if self.state not in states:
            if self.state is InstanceState.DEAD:
                detail = "its Store was poisoned by an earlier trap; instantiate it again"
            elif self.state is InstanceState.EMPTY:
                detail = "it has not been instantiated"
            else:
                detail = "initialize() has not succeeded yet"
            raise InstanceStateError(f"{self.name}: cannot call now: {detail}")

    # --- calls ---

    def _fail(self, function: str, error: int) -> GuestFailure:
        self.state = InstanceState.DEAD
        return classify_trap(self.name, function, capi.take_error(error))

    def _take_result(self, function: str) -> Any:
        address = self._result_address
        try:
            result = self.loaded.exports[function].result
            return result.lift(address) if result is not None else None
        finally:
            capi.val_delete(address)
            self._result[0] = capi.BOOL  # the next call overwrites (drops) this slot: leave nothing to free

    def _call(self, function: str, args: list[Any], deadline_ms: int | None = None) -> Any:
        """Call an export through the owned-value converters (for the rarely called exports)."""
        spec = self.loaded.exports[function]
        buffer = (ctypes.c_uint8 * (VAL_SIZE * max(len(args), 1)))()
        base = ctypes.addressof(buffer)
        lowered = 0
        try:
            for conv, value in zip(spec.params, args, strict=True):
                conv.lower(value, base + lowered * VAL_SIZE)
                lowered += 1
            self.host.deadline = self.limiter.arm(self.context, deadline_ms)
            error = capi.func_call(
                self._func_addresses[function], self.context, base, lowered, self._result_address,
                1 if spec.result is not None else 0,
            )
        finally:
            for i in range(lowered):
                capi.val_delete(base + i * VAL_SIZE)
        if error:
            raise self._fail(function, error)
        return self._take_result(function)

    def _call_message(self, function: str, message: ComponentMessage) -> tuple[bool, Any]:
        """Call handle-message / handle-callback with the reusable message argument;
        returns (is_ok, payload) of the guest's result."""
        if self.state is not InstanceState.INITIALIZED:
            self._require(InstanceState.INITIALIZED)
        argument = message_argument()
        address = argument.fill(message)
        host = self.host
        host.correlation_id = message.metadata.correlation_id
        host.deadline = self.limiter.arm(self.context)
        result = self._result_address
        error = capi.func_call(self._func_addresses[function], self.context, address, 1, result, 1)
        argument.clear()
        if error:
            raise self._fail(function, error)
        try:
            return self._message_results[function].lift_parts(result)
        finally:
            capi.val_delete(result)
            self._result[0] = capi.BOOL

    def initialize(self, config: ComponentConfig) -> None:
        """Call `initialize`; a guest error raises ComponentError."""
        self._require(InstanceState.INSTANTIATED, InstanceState.INITIALIZED)
        outcome = self._call("initialize", [_config_value(config)])
        if isinstance(outcome, Err):
            raise ComponentError(*outcome.value)
        self.state = InstanceState.INITIALIZED

    def handle_message(self, message: ComponentMessage) -> bytes | None:
        """Call `handle-message`; returns the optional reply, a guest error raises WasmError."""
        is_ok, value = self._call_message("handle-message", message)
        if is_ok:
            return value  # type: ignore[no-any-return]
        raise WasmError(*value)

    def handle_callback(self, message: ComponentMessage) -> None:
        """Call `handle-callback`; a guest error raises WasmError."""
        is_ok, value = self._call_message("handle-callback", message)
        if not is_ok:
            raise WasmError(*value)

    def metadata(self) -> ComponentMetadata:
        """Call `metadata`."""
        self._require(InstanceState.INSTANTIATED, InstanceState.INITIALIZED)
        value = self._call("metadata", [])
        return ComponentMetadata(
            name=value["name"], version=value["version"], description=value["description"],
            author=value["author"], license=value["license"],
            supported_operations=tuple(value["supported-operations"]), stateful=value["stateful"],
        )

    def health(self) -> HealthStatus:
        """Call `health`."""
        self._require(InstanceState.INITIALIZED)
        return HealthStatus(self._call("health", []))

    def shutdown(self, deadline_ms: int | None = None) -> None:
        """Call `shutdown`, interrupted after `deadline_ms` when given (else the usual limit);
        a guest error raises ComponentError."""
        self._require(InstanceState.INITIALIZED)
        outcome = self._call("shutdown", [], deadline_ms)
        if isinstance(outcome, Err):
            raise ComponentError(*outcome.value)

    def fuel_left(self) -> int:
        """Fuel remaining from the last call's budget."""
        remaining = ctypes.c_uint64(0)
        error = capi.context_get_fuel(self.context, ctypes.addressof(remaining))
        if error:
            raise RuntimeError(capi.take_error(error))
        return remaining.value
