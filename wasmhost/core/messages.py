"""Messages exchanged between components, mirroring the WIT `component-message`."""

from __future__ import annotations

import time

import msgspec

from wasmhost.core.ids import ComponentId


class Timestamp(msgspec.Struct, frozen=True):
    """Wall-clock time since the Unix epoch."""

    seconds: int
    nanoseconds: int

    @classmethod
    def now(cls) -> Timestamp:
        """The current wall-clock time."""
        ns = time.time_ns()
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)


class MessageMetadata(msgspec.Struct, frozen=True):
    """Routing and description data carried with a message."""

    timestamp: Timestamp
    correlation_id: str | None = None
    reply_to: ComponentId | None = None
    content_type: str | None = None


class ComponentMessage(msgspec.Struct, frozen=True):
    """A message as `handle-message` / `handle-callback` receive it."""

    sender: ComponentId
    payload: bytes
    metadata: MessageMetadata
