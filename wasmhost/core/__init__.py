"""Pure types, errors and protocols shared by every layer (no wasmtime here)."""

from wasmhost.core.errors import (
    ComponentError,
    HostError,
    MessagingError,
    StorageError,
    WasmError,
)
from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.core.limits import ResourceLimits
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.metadata import ComponentConfig, ComponentInfo, ComponentMetadata, HealthStatus, LogLevel

__all__ = [
    "ComponentConfig",
    "ComponentError",
    "ComponentId",
    "ComponentInfo",
    "ComponentMessage",
    "ComponentMetadata",
    "HealthStatus",
    "HostError",
    "InvalidComponentId",
    "LogLevel",
    "MessageMetadata",
    "MessagingError",
    "ResourceLimits",
    "StorageError",
    "Timestamp",
    "WasmError",
]
