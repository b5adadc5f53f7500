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


MAX_NAME_CHARS = 256
"""Characters of a component's metadata name, version and each operation name at most."""
MAX_TEXT_CHARS = 4096
"""Characters of its description, author and license at most."""
MAX_OPERATIONS = 256
"""Operation names a component may list at most."""


class ComponentMetadata(msgspec.Struct, frozen=True):
    """What a component's `metadata()` export returns (WIT `component-lifecycle.component-metadata`)."""

    name: str
    version: str
    description: str = ""
    author: str = ""
    license: str = ""
    supported_operations: tuple[str, ...] = ()
    stateful: bool = False

    def problem(self) -> str | None:
        """Why the host refuses this metadata (a field over its bound), or None. It is logged at every
        start and handed to other components, which must not be made to trap on it."""
        fields = [("name", self.name, MAX_NAME_CHARS), ("version", self.version, MAX_NAME_CHARS),
                  ("description", self.description, MAX_TEXT_CHARS), ("author", self.author, MAX_TEXT_CHARS),
                  ("license", self.license, MAX_TEXT_CHARS)]
        if len(self.supported_operations) > MAX_OPERATIONS:
            return f"it lists {len(self.supported_operations)} supported operations, at most {MAX_OPERATIONS}"
        fields += [("an operation name", op, MAX_NAME_CHARS) for op in self.supported_operations]
        for label, value, bound in fields:
            if len(value) > bound:
                return f"its {label} is {len(value)} characters, at most {bound}"
        return None


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
