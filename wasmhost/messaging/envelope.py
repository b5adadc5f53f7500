"""What travels through a mailbox: a message plus where its outcome must go."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

from wasmhost.core.ids import ComponentId
from wasmhost.core.messages import ComponentMessage


class Delivery(enum.Enum):
    """Which export an envelope is delivered to."""

    MESSAGE = "handle-message"
    CALLBACK = "handle-callback"


@dataclass(slots=True)
class Envelope:
    """One queued delivery. `reply_future` is set for requests from the host; `requester` and
    `correlation_id` for requests from another component (answered through its handle-callback)."""

    message: ComponentMessage
    delivery: Delivery = Delivery.MESSAGE
    reply_future: asyncio.Future[bytes | None] | None = None
    requester: ComponentId | None = None
    correlation_id: str | None = None
