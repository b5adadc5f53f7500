"""Actor states and counters, as the layers above see them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from wasmhost.actors.latency import LatencyRecorder


class ActorState(enum.Enum):
    """Where an actor is in its life."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


TAKING_MESSAGES = frozenset({ActorState.STARTING, ActorState.RUNNING, ActorState.RESTARTING})
"""The states in which an actor takes new messages (the lattice subscribes only such components)."""


@dataclass
class ActorStats:
    """Counters of one actor since the daemon started it."""

    handled: int = 0
    failed: int = 0
    restarts: int = 0
    rejected: int = 0  # envelopes answered with an error because the actor stopped or failed
    last_error: str | None = None
    latency: LatencyRecorder = field(default_factory=LatencyRecorder)  # handling time per message
