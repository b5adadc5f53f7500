"""ActorSpec: everything needed to run one component as an actor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wasmhost.actors.restart import Backoff, Intensity, RestartPolicy, Strategy
from wasmhost.core.ids import ComponentId
from wasmhost.core.limits import DEFAULT_MAX_OUTSTANDING_REQUESTS, ResourceLimits
from wasmhost.core.message_size import DEFAULT_MAX_MESSAGE_BYTES
from wasmhost.core.rate_limit import RateLimit

DEFAULT_MAILBOX_CAPACITY = 1024
DEFAULT_HEALTH_INTERVAL = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True)
class ActorSpec:
    """How one component is run: its binary, limits, configuration and supervision."""

    component_id: ComponentId
    path: Path | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    env_vars: tuple[tuple[str, str], ...] = ()
    config_data: bytes | None = None
    mailbox_capacity: int = DEFAULT_MAILBOX_CAPACITY
    restart: RestartPolicy = RestartPolicy.TRANSIENT
    intensity: Intensity = field(default_factory=Intensity)
    backoff: Backoff = field(default_factory=Backoff)
    group: str | None = None
    strategy: Strategy = Strategy.ONE_FOR_ONE
    health_interval: float = DEFAULT_HEALTH_INTERVAL
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    storage: bool = False
    wasi: bool = False
    log_limit: RateLimit = field(default_factory=RateLimit)  # guest log lines per second and burst
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # largest payload this component is handed
    max_outstanding_requests: int = DEFAULT_MAX_OUTSTANDING_REQUESTS  # its requests not yet answered and handled
    forensics_payload_bytes: int = 0  # payload prefix kept with the metadata of recent messages (forensics.py)
