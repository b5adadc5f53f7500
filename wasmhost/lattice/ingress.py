"""Messages arriving from the lattice for a local component: checked, queued, answered.

From another host (on `P.msg.`, with Wasmhost-Sender-Host): the sender's capabilities are checked on this host
as if it were local (its own grants when it also runs here, else `[[lattice.grants]]`). From an external client
(on `P.in.`): only components with `accept_external = true` take them, and the sender is always `external/...`
whatever its headers claim, Wasmhost-Sender-Host included. The subject, not a header, tells them apart: NATS
permissions can keep clients off `P.msg.`, but no permission reaches into headers (a client that set
Wasmhost-Sender-Host on `P.msg.` reached components that do not accept external messages, as the host itself).
A message on `P.msg.` without the header is refused, naming the client subject. Every message with a reply
subject gets an answer: a request its
outcome (after a `queued` acknowledgement when Wasmhost-Ack asks for it, so the requester knows where it
waits), a send `queued` or `rejected`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from wasmhost.core.errors import MessagingError
from wasmhost.core.ids import HOST_ID, ComponentId, InvalidComponentId
from wasmhost.core.log_budget import LogBudget
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.lattice import wire
from wasmhost.messaging.envelope import Envelope
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.messaging.router import MAX_REQUEST_TIMEOUT_MS, Recipient

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from wasmhost.lattice.link import Link

log = structlog.get_logger("wasmhost.lattice")

DEFAULT_EXTERNAL_TIMEOUT_MS = 30_000
"""How long a request without Wasmhost-Timeout-Ms (a plain `nats req`) may wait for its reply."""


class Ingress:
    """Delivers one host's share of the lattice's messages to its router."""

    def __init__(self, link: Link, accepts_external: Callable[[ComponentId], bool | None]) -> None:
        self.link = link
        self.accepts_external = accepts_external
        # Senders decide how many of their messages are refused (a full mailbox, no grant): each logged, a guest
        # on another host sending in a loop wrote 554,051 lines in 35 s here. At most a few per target now.
        self._rejected_lines = LogBudget()
        self._heartbeat = wire.heartbeat_header(link.settings.heartbeat_s, link.started_at)  # said on `queued`

    async def on_message(self, msg: Msg) -> None:
        """A NATS message on a local component's subject (one subscription task per component)."""
        try:
            self._handle(msg)
        except Exception:  # a bug here must not end the subscription's task
            log.exception("lattice_ingress_failed", subject=msg.subject)

    def _handle(self, msg: Msg) -> None:
        link = self.link
        headers = msg.headers or {}
        try:
            target = link.subjects.component(msg.subject)
        except InvalidComponentId:
            return
        kind = headers.get(wire.KIND) or (wire.KIND_REQUEST if msg.reply else wire.KIND_SEND)
        from_client = link.subjects.from_client(msg.subject)
        sender_host = None if from_client else headers.get(wire.SENDER_HOST)
        if sender_host is None and msg.reply and link.subjects.internal(msg.reply):
            # the answer would be published by this host on a lattice subject the client chose (of this lattice
            # or another on the same NATS): a forged heartbeat, inventory or answer to another host's request.
            # Neither taken nor answered.
            self._rejected(target, headers, "", "invalid-message", f"an external client's reply subject "
                           f"{msg.reply!r} is under {wire.LATTICE_ROOT}, which only hosts may publish on")
            return
        try:
            if sender_host is None and not from_client:
                raise MessagingError("invalid-message", f"{msg.subject} takes messages from hosts only (with "
                                     f"{wire.SENDER_HOST}); NATS clients send to {link.subjects.ingress(target)}")
            if kind not in (wire.KIND_SEND, wire.KIND_REQUEST, wire.KIND_BROADCAST):
                raise MessagingError("invalid-message", f"{wire.KIND} must be send, request or broadcast, "
                                     f"got {kind!r}")
            sender = _sender(headers.get(wire.SENDER), sender_host is not None)
            if sender_host is None and not (accepts := self.accepts_external(target)):
                if accepts is None:  # not configured here (any more): a reload removed it after NATS sent this
                    raise MessagingError("target-not-found", target)
                raise MessagingError("delivery-failed", f"{target} does not accept messages from external clients "
                                     "(its config does not set accept_external = true)")
            recipient = link.router.accept_remote(sender, kind, target, len(msg.data),
                                                  check_sender=sender_host is not None and sender != HOST_ID)
            metadata = MessageMetadata(timestamp=Timestamp.now(), correlation_id=_metadata(headers, wire.CORRELATION),
                                       reply_to=sender, content_type=_metadata(headers, wire.CONTENT_TYPE))
            message = ComponentMessage(sender, msg.data, metadata)
            if kind != wire.KIND_REQUEST or not msg.reply:
                link.router.deliver(recipient, Envelope(message))
                if msg.reply:
                    self._answer(msg.reply, b"", wire.QUEUED, target)
                return
            self._request(msg.reply, message, recipient, target, headers, headers.get(wire.ACK) == "1")
        except MessagingError as exc:
            if sender_host is not None or msg.reply:
                self._rejected(target, headers, sender_host or "", exc.case, _detail(exc))
            if msg.reply:
                self._answer(msg.reply, b"", wire.REJECTED, target, _detail(exc), exc.case)

    def _rejected(self, target: ComponentId, headers: dict[str, str], sender_host: str, error: str,
                  detail: str) -> None:
        """Log a message refused for `target`, within the target's budget of lines (the rest are counted, and
        the next line says how many with `suppressed=N`)."""
        extra = self._rejected_lines.fields(str(target))
        if extra is None:
            return
        # The sender and the detail (a header's value quoted) are a client's text, as long as NATS lets a message
        # be: a 1 MB Wasmhost-Sender and Wasmhost-Kind made a 2 MB line (the budget counts lines, not bytes)
        log.info("lattice_message_rejected", target=str(target), sender=_shortened(headers.get(wire.SENDER, "")),
                 sender_host=_shortened(sender_host), error=error, detail=_shortened(detail), **extra)

    def _request(self, reply: str, message: ComponentMessage, recipient: Recipient, target: ComponentId,
                 headers: dict[str, str], acknowledge: bool) -> None:
        loop = self.link.loop
        future: asyncio.Future[bytes | None] = loop.create_future()
        envelope = Envelope(message, reply_future=future)
        try:
            timeout_ms = min(int(headers.get(wire.TIMEOUT_MS, DEFAULT_EXTERNAL_TIMEOUT_MS)), MAX_REQUEST_TIMEOUT_MS)
        except ValueError:
            raise MessagingError("invalid-message", f"{wire.TIMEOUT_MS} must be a number of milliseconds, got "
                                 f"{headers.get(wire.TIMEOUT_MS)!r}") from None
        if timeout_ms <= 0:
            raise MessagingError("invalid-message", f"{wire.TIMEOUT_MS} must be at least 1")
        self.link.router.deliver(recipient, envelope)
        if acknowledge:  # the requesting host learns where it waits (see Link._end_placed)
            self._answer(reply, b"", wire.QUEUED, target)
        timer = loop.call_at(loop.time() + timeout_ms / 1000, _expire, future, target, timeout_ms)

        def answered(done: asyncio.Future[bytes | None]) -> None:
            timer.cancel()
            if done.cancelled():
                return
            error = done.exception()
            if error is None:
                result = done.result()
                self._answer(reply, result or b"", wire.REPLY if result is not None else Outcome.NO_REPLY.value,
                             target)
            elif isinstance(error, RequestFailed):
                if error.outcome is Outcome.TIMEOUT:
                    recipient.mailbox.withdraw(envelope)  # not taken yet: nobody waits for it any more
                self._answer(reply, b"", error.outcome.value, target, error.detail)
            else:
                self._answer(reply, b"", Outcome.FAILED.value, target, str(error))

        future.add_done_callback(answered)

    def _answer(self, reply: str, payload: bytes, outcome: str, target: ComponentId, detail: str = "",
                error: str | None = None) -> None:
        headers = {wire.OUTCOME: outcome, wire.HOST: self.link.host}
        if outcome == wire.QUEUED:  # the requester may not have heard this host yet: it can watch it from now on
            headers[wire.HEARTBEAT] = self._heartbeat
        if detail:
            headers[wire.DETAIL] = wire.one_line(detail)
        if error is not None:  # a rejection: the sender's host logs it, naming the target
            headers[wire.ERROR] = error
            headers[wire.TARGET] = str(target)
        self.link.publish(reply, payload, headers)


def _sender(text: str | None, from_host: bool) -> ComponentId:
    """The sender a message claims: a component id from a host; always `external/...` from a client."""
    if text is None:
        if from_host:
            raise MessagingError("invalid-message", f"{wire.SENDER} is missing")
        return wire.DEFAULT_EXTERNAL_SENDER
    try:
        sender = ComponentId.parse(text)
    except InvalidComponentId as exc:
        raise MessagingError("invalid-message", f"{wire.SENDER}: {exc}") from None
    if not from_host and sender.namespace != wire.EXTERNAL_NAMESPACE:
        return ComponentId(wire.EXTERNAL_NAMESPACE, sender.name, sender.instance)
    return sender


def _metadata(headers: dict[str, str], name: str) -> str | None:
    """The header `name`, which becomes the message's metadata; invalid-message when it is longer than
    MAX_METADATA_CHARS (a client's 4 MB correlation id made a 4 MB line of each guest log call)."""
    value = headers.get(name)
    if value is not None and len(value) > wire.MAX_METADATA_CHARS:
        raise MessagingError("invalid-message", f"{name} is {len(value)} characters, at most "
                             f"{wire.MAX_METADATA_CHARS} are allowed")
    return value


LOGGED_CHARS = 1000
"""Characters of a client's text (a header's value) a log line shows at most."""


def _shortened(text: str) -> str:
    """`text` for a log line: at most LOGGED_CHARS characters, saying how many there were when more."""
    return text if len(text) <= LOGGED_CHARS else f"{text[:LOGGED_CHARS]}... ({len(text)} characters)"


def _detail(exc: MessagingError) -> str:
    return str(exc.payload) if exc.payload is not None else exc.case


def _expire(future: asyncio.Future[bytes | None], target: ComponentId, timeout_ms: int) -> None:
    if not future.done():
        future.set_exception(RequestFailed(Outcome.TIMEOUT, f"no reply from {target} within {timeout_ms} ms"))
