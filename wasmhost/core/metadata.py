"""Component self-description, configuration and status enums."""

from __future__ import annotations

import enum

import msgspec

from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import ResourceLimits


class LogLevel(enum.Enum):
    """Severity of a guest log line (WIT `log-level`)."""

    TRACE = "trace"
    DEBUG = "debug"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


class HealthStatus(enum.Enum):
    """Health a component reports (WIT `health-status`)."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    UNKNOWN = "unknown"


class ComponentMetadata(msgspec.Struct, frozen=True):
    """What a component's `metadata()` export returns (WIT `component-lifecycle.component-metadata`)."""

    name: str
    version: str
    description: str = ""
    author: str = ""
    license: str = ""
    supported_operations: tuple[str, ...] = ()
    stateful: bool = False


class ComponentConfig(msgspec.Struct, frozen=True):
    """What `initialize` receives: env vars, opaque config data and limits."""

    env_vars: tuple[tuple[str, str], ...] = ()
    config_data: bytes | None = None
    resource_limits: ResourceLimits = ResourceLimits()


class ComponentInfo(msgspec.Struct, frozen=True):
    """Public information about a loaded component (WIT `host-services.component-info`)."""

    id: ComponentId
    name: str
    version: str
    health: str
