"""A component's flight recorder: its last failures, each with the messages it was handling.

Per handled message it keeps a tuple of references to what the message already carries (its
delivery, sender, metadata struct, size and outcome; no copy, no clock read) in a fixed ring of
RECENT_KEPT entries, and only for the last RECENT_KEPT messages of a batch: a batch costs one call.
Payload bytes are kept only when `[host] forensics_payload_bytes` asks for a prefix. A failure
copies the ring's entries (the same references) and is turned into plain records only when asked
for: a restart does not wait for timestamps to be formatted. The recorder lives on the actor, not on
an instance: it outlives restarts and handovers.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from wasmhost.core.bounded_text import bounded
from wasmhost.core.errors import (
    ComponentError,
    FuelExhausted,
    GuestExit,
    GuestFailure,
    GuestTimeout,
    InstanceStateError,
    InstantiationError,
    LoadError,
)
from wasmhost.core.ids import ComponentId
from wasmhost.core.messages import MessageMetadata, Timestamp
from wasmhost.messaging.envelope import Delivery
from wasmhost.messaging.outcome import Outcome

if TYPE_CHECKING:
    from wasmhost.actors.actor import Handled

FAILURES_KEPT = 10
"""Failures kept per component (the oldest is dropped first); `total` counts them all."""
RECENT_KEPT = 5
"""Messages whose metadata is kept: the one being handled at a failure and the four before it."""
MAX_PAYLOAD_PREFIX = 4096
"""Largest `forensics_payload_bytes`: a prefix to recognise a message by, not a copy of it."""
MESSAGE_CALLS = frozenset({Delivery.MESSAGE.value, Delivery.CALLBACK.value})

Seen = tuple[Delivery, ComponentId, MessageMetadata, int, Outcome | None, bytes | None]
"""(delivery, sender, metadata, payload size, outcome, payload prefix) of one handled message."""


class MessageRecord(msgspec.Struct):
    """The metadata of one handled message, as `inspect` shows it."""

    delivery: str
    sender: str
    correlation_id: str | None
    size: int
    content_type: str | None
    sent_at: str
    outcome: str
    payload_prefix_hex: str | None = None
    """The first `forensics_payload_bytes` of the payload in hex (None when none are kept)."""


class FailureRecord(msgspec.Struct):
    """One failure of a component: when, what, the guest's own words, and the messages around it."""

    number: int
    """1 for the component's first recorded failure, counting on across restarts."""
    at: str
    kind: str
    """trap, timeout, fuel, exit, memory, initialize, load, instance-state or error."""
    call: str | None
    """The export that failed (handle-message, initialize, health, ...) or the start-up phase."""
    instance: int
    """How many restarts the component had had when it failed (0: its first instance)."""
    summary: str
    """One line: what happened."""
    detail: str
    """The whole text: wasmtime's error with the wasm backtrace."""
    message: MessageRecord | None
    """The message being handled, when the failure happened while handling one."""
    before: list[MessageRecord]
    """The messages handled before it, oldest first."""


class ForensicsReport(msgspec.Struct):
    """What the `forensics` control request answers for one component."""

    id: str
    total: int
    failures: list[FailureRecord]
    """The last FAILURES_KEPT failures, newest first."""
    recent: list[MessageRecord]
    """The last messages handled, oldest first."""
    failures_kept: int = FAILURES_KEPT
    payload_bytes: int = 0


class _Failure(msgspec.Struct):
    """A failure as recorded, formatted into a FailureRecord when reported."""

    number: int
    at: float  # time.time()
    kind: str
    call: str | None
    instance: int
    summary: str
    detail: str
    message: Seen | None
    before: list[Seen]

    def record(self) -> FailureRecord:
        """The failure as `inspect` shows it."""
        message = _message_record(self.message) if self.message is not None else None
        return FailureRecord(self.number, _iso(self.at), self.kind, self.call, self.instance, self.summary,
                             self.detail, message, [_message_record(seen) for seen in self.before])


class Recorder:
    """The failures and recently handled messages of one component (event loop only)."""

    __slots__ = ("_failures", "_next", "_ring", "payload_bytes", "total")

    def __init__(self, payload_bytes: int = 0) -> None:
        self.payload_bytes = payload_bytes
        self.total = 0
        self._ring: list[Seen | None] | None = None  # made at the first message: idle components pay nothing
        self._next = 0
        self._failures: deque[_Failure] | None = None

    def seen(self, handled: Sequence[Handled]) -> None:
        """Remember the metadata of the last messages of a batch just answered."""
        ring = self._ring
        if ring is None:
            ring = self._ring = [None] * RECENT_KEPT
        at = self._next
        keep = self.payload_bytes
        for item in handled[-RECENT_KEPT:] if len(handled) > RECENT_KEPT else handled:
            envelope = item.envelope
            message = envelope.message
            payload = message.payload
            ring[at] = (envelope.delivery, message.sender, message.metadata, len(payload), item.outcome,
                        payload[:keep] if keep else None)
            at = at + 1 if at < RECENT_KEPT - 1 else 0
        self._next = at

    def _recent_seen(self) -> list[Seen]:
        """The ring's entries, oldest first."""
        ring = self._ring
        if ring is None:
            return []
        return [seen for seen in ring[self._next:] + ring[:self._next] if seen is not None]

    def recent(self) -> list[MessageRecord]:
        """The messages handled last, oldest first."""
        return [_message_record(seen) for seen in self._recent_seen()]

    def failed(self, error: BaseException, call: str | None, instance: int) -> None:
        """Record a failure; when `call` is handle-message or handle-callback, the last message seen
        is the one it failed on."""
        self.total += 1
        kind, summary, detail = describe(error)
        if isinstance(error, GuestFailure):
            call = error.function
        recent = self._recent_seen()
        message = recent.pop() if call in MESSAGE_CALLS and recent else None
        if self._failures is None:
            self._failures = deque(maxlen=FAILURES_KEPT)
        self._failures.append(_Failure(self.total, time.time(), kind, call, instance, summary, detail, message, recent))

    def report(self, component: str) -> ForensicsReport:
        """Everything kept, for the control socket."""
        failures = [failure.record() for failure in reversed(self._failures)] if self._failures else []
        return ForensicsReport(component, self.total, failures, self.recent(), payload_bytes=self.payload_bytes)


def describe(error: BaseException) -> tuple[str, str, str]:
    """(kind, one line, whole text) of a component's failure, both texts bounded: a guest's own error (an
    `initialization-failed` message, say) may be megabytes, and the last FAILURES_KEPT of them are kept and
    answered in one control frame."""
    text = bounded(str(error).strip())
    summary = bounded(error.summary) if isinstance(error, GuestFailure) else (text.splitlines() or [""])[0]
    if isinstance(error, GuestTimeout):
        kind = "timeout"
    elif isinstance(error, FuelExhausted):
        kind = "fuel"
    elif isinstance(error, GuestExit):
        kind = "exit"
    elif isinstance(error, GuestFailure):
        kind = "trap"
    elif isinstance(error, InstantiationError):
        kind = "memory" if "memor" in error.reason else "instantiate"
    elif isinstance(error, LoadError):
        kind = "load"
    elif isinstance(error, ComponentError):
        kind = "initialize" if error.case == "initialization-failed" else "lifecycle"
    elif isinstance(error, InstanceStateError):
        kind = "instance-state"
    else:
        kind = "error"
    return kind, summary, text


def _message_record(seen: Seen) -> MessageRecord:
    delivery, sender, metadata, size, outcome, prefix = seen
    return MessageRecord(
        delivery.value, str(sender), metadata.correlation_id, size, metadata.content_type,
        _timestamp(metadata.timestamp),
        "failed" if outcome is Outcome.FAILED else "ok" if outcome is None else outcome.value,
        prefix.hex() if prefix is not None else None,
    )


def _timestamp(stamp: Timestamp) -> str:
    return _iso(stamp.seconds + stamp.nanoseconds / 1e9)


def _iso(seconds: float) -> str:
    """UTC, to the millisecond: 2026-12-03T00:40:01.123Z."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def escaped(prefix_hex: str) -> str:
    """A payload prefix for a terminal: printable ASCII as is, everything else as \\xNN escapes."""
    data = bytes.fromhex(prefix_hex)
    return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in data)
