"""MessageRouter: the `host-messaging` imports for real, plus the host's own send and request.

Guests call in from worker threads; the host calls from the event loop. Routing answers at once:
an unknown target is `target-not-found`, a full mailbox `queue-full`; nothing waits and nothing
is dropped silently. Replies to requests come back as `handle-callback` calls on the requester.

Payload size: every payload is checked against the *target's* `max_message_bytes` (it must be able to
take it) before it is queued, so an oversized one is `invalid-message` naming the size and the limit
and the target never sees it; a reply larger than the requester's limit becomes a `failed` outcome.

Broadcast: every target is checked first (unknown -> target-not-found, not permitted ->
delivery-failed, too large -> invalid-message, and then nothing is sent); then each target gets the
message, and targets whose mailbox is full or stopping are named in one delivery-failed error after
the others got it.

Remote targets (a lattice, see README "Lattice"): a target with no local recipient goes to `remote` when
there is one; a local recipient is always preferred. The sender's capabilities are checked here as for a
local target, and `remote.check` answers at once; a remote request is pending here like a local one (same
deadline heap, cancel and callback), its answer arriving through `complete_remote`.

The host's requests and sends that wait for mailbox room (`wasmhost call` / `send`) are bounded by
their timeout as a whole: waiting for room, then for the reply. A request that times out or whose
caller goes away (cancelled) is withdrawn from the mailbox if the actor has not taken it yet; if it
has, the guest call runs to its end and its reply is dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

import structlog

from wasmhost.core.errors import MessagingError
from wasmhost.core.ids import HOST_ID, ComponentId
from wasmhost.core.limits import DEFAULT_MAX_OUTSTANDING_REQUESTS
from wasmhost.core.log_budget import LogBudget
from wasmhost.core.message_size import DEFAULT_MAX_MESSAGE_BYTES, check_message_size, too_large
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.core.protocols import RemotePort
from wasmhost.messaging.deadlines import RequestDeadlines
from wasmhost.messaging.envelope import Delivery, Envelope
from wasmhost.messaging.mailbox import Mailbox
from wasmhost.messaging.outcome import OUTCOME_CONTENT_TYPE, Outcome, RequestFailed, encode_outcome

log = structlog.get_logger("wasmhost.messaging")

PRODUCED_NOTICE = 64 * 1024
"""Guest payloads from this size on are reported to the sending actor (see Recipient.produced)."""
MAX_REQUEST_TIMEOUT_MS = 24 * 3600 * 1000
"""Longer request timeouts (e.g. u64::MAX meaning 'forever') are capped to a day."""


class Recipient(Protocol):
    """What the router needs of an actor."""

    component_id: ComponentId
    mailbox: Mailbox
    max_message_bytes: int
    max_outstanding_requests: int

    def produced(self, size: int) -> None:
        """This component's guest passed a payload of `size` bytes to a messaging import."""


class Permissions(Protocol):
    """Capability checks (the security layer); raise MessagingError when denied."""

    def check_message(self, sender: ComponentId, action: str, target: ComponentId) -> None:
        """Allow or deny `sender` doing `action` to `target`."""


@dataclass(slots=True)
class PendingRequest:
    """A request from a component that still expects a callback."""

    requester: ComponentId
    target: ComponentId


class MessageRouter:
    """Routes messages between actors and from the host; implements the MessagingPort protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop, permissions: Permissions | None = None,
                 host_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.loop = loop
        self.permissions = permissions
        self.host_max_message_bytes = host_max_message_bytes  # replies the host accepts ([host] max_message_bytes)
        self._recipients: dict[ComponentId, Recipient] = {}
        self._load_failures: dict[ComponentId, str] = {}  # configured, but their binary could not be loaded
        self._pending: dict[str, PendingRequest] = {}
        # Answered requests whose callback is queued but not yet taken by the requester's actor (by
        # requester), and those of them the guest cancelled meanwhile: their callbacks are not delivered.
        self._answered: dict[str, ComponentId] = {}
        self._cancelled: set[str] = set()
        self._outstanding: dict[ComponentId, int] = {}  # per requester: pending or answered, not yet handled
        self._deadlines = RequestDeadlines(loop, self._expire)  # one loop timer for every pending request
        self._lock = threading.Lock()
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self.late_responses = 0
        # A guest decides how many answers are dropped (requests it cancels at once, or with a 1 ms timeout):
        # each logged would let it write the host's log at the rate its target answers, past its log_rate.
        self._late_lines = LogBudget()
        self.remote: RemotePort | None = None  # the lattice, when the daemon is part of one

    # --- directory of recipients ---

    def attach(self, recipient: Recipient) -> None:
        """Make `recipient` reachable under its component id."""
        self._recipients[recipient.component_id] = recipient
        self._load_failures.pop(recipient.component_id, None)
        self.local_changed()

    def detach(self, component: ComponentId) -> None:
        """Make `component` unreachable."""
        self._recipients.pop(component, None)
        self.local_changed()

    def local_changed(self) -> None:
        """A local component came, went, or started or stopped taking messages: the lattice follows."""
        if self.remote is not None:
            self.remote.local_changed()

    def local_components(self) -> list[ComponentId]:
        """The components reachable on this host."""
        return list(self._recipients)

    def local_recipient(self, component: ComponentId) -> Recipient | None:
        """The local recipient of `component`, or None."""
        return self._recipients.get(component)

    def load_failed(self, component: ComponentId, reason: str | None) -> None:
        """Record that the configured `component` could not be loaded and why (None: forget it, it
        is no longer configured), so that messages to it say so instead of `target-not-found`."""
        if reason is None:
            self._load_failures.pop(component, None)
        else:
            self._load_failures[component] = " ".join(line.strip() for line in reason.splitlines() if line.strip())

    def _not_accepting(self, component: ComponentId) -> str:
        """Why `component`'s closed mailbox refuses a message: its load failure when that is the reason."""
        reason = self._load_failures.get(component)
        if reason is not None:
            return f"{component} failed to load: {reason}"
        return f"{component} is not accepting messages"

    # --- the MessagingPort protocol (called from guest threads) ---

    def _resolve(self, sender: ComponentId, action: str, target: ComponentId, size: int) -> Recipient:
        """The local recipient for a message from `sender` (capabilities and size checked)."""
        recipient = self._route(sender, action, target, size, remote=False)
        assert recipient is not None  # only remote routes have none
        return recipient

    def _route(self, sender: ComponentId, action: str, target: ComponentId, size: int,
               remote: bool = True) -> Recipient | None:
        """The local recipient for a message from `sender`, or None when it goes to `self.remote` (checked
        there); capabilities and size are checked either way."""
        recipient = self._recipients.get(target)
        if recipient is None:
            if target in self._load_failures:
                raise MessagingError("delivery-failed", self._not_accepting(target))
            if not remote or self.remote is None:
                raise MessagingError("target-not-found", target)
            # Whether it exists first, as for local targets: only denials of real targets are audited.
            self.remote.check(target, size)
        if self.permissions is not None and sender != HOST_ID:
            self.permissions.check_message(sender, action, target)
        if recipient is None:
            return None
        check_message_size(size, recipient.max_message_bytes, target)
        return recipient

    def accept_remote(self, sender: ComponentId, action: str, target: ComponentId, size: int,
                      check_sender: bool = True) -> Recipient:
        """The local recipient of a message that came from the lattice (never forwarded on: a target with
        no local recipient is target-not-found); the sender's capabilities are checked on this host as if it
        were local, unless `check_sender` is False (external clients, checked by the lattice itself)."""
        recipient = self._recipients.get(target)
        if recipient is None:
            if target in self._load_failures:
                raise MessagingError("delivery-failed", self._not_accepting(target))
            raise MessagingError("target-not-found", target)
        if check_sender and self.permissions is not None:
            self.permissions.check_message(sender, action, target)
        check_message_size(size, recipient.max_message_bytes, target)
        return recipient

    def deliver(self, recipient: Recipient, envelope: Envelope) -> None:
        """Queue `envelope` for `recipient` now (queue-full / delivery-failed when it cannot be)."""
        self._offer(recipient, envelope)

    def _produced(self, sender: ComponentId, payload: bytes) -> None:
        """Tell the sending actor how large a payload its guest produced (large ones budget its calls)."""
        if len(payload) >= PRODUCED_NOTICE:
            recipient = self._recipients.get(sender)
            if recipient is not None:
                recipient.produced(len(payload))

    def _offer(self, recipient: Recipient, envelope: Envelope) -> None:
        if recipient.mailbox.offer(envelope):
            return
        if recipient.mailbox.closed:
            raise MessagingError("delivery-failed", self._not_accepting(recipient.component_id))
        raise MessagingError("queue-full")

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes) -> None:
        """Enqueue a message for `target` with reply-to = sender."""
        self._produced(sender, payload)
        recipient = self._route(sender, "send", target, len(payload))
        if recipient is None:
            self.remote.send(sender, target, payload)  # type: ignore[union-attr]  # _route: remote is set
            return
        self._offer(recipient, Envelope(_message(sender, payload)))

    def new_correlation_id(self) -> str:
        """A correlation id unique within this process run."""
        return f"{self._prefix}-{next(self._counter)}"

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, timeout_ms: int) -> str:
        """Enqueue a request; its outcome arrives later as a callback on `sender`."""
        self._produced(sender, payload)
        if timeout_ms <= 0:
            raise MessagingError("invalid-message", "timeout-ms must be at least 1")
        recipient = self._route(sender, "request", target, len(payload))
        correlation_id = self.new_correlation_id()
        pending = PendingRequest(sender, target)
        requester = self._recipients.get(sender)
        limit = requester.max_outstanding_requests if requester is not None else DEFAULT_MAX_OUTSTANDING_REQUESTS
        with self._lock:
            outstanding = self._outstanding.get(sender, 0)
            if outstanding >= limit:  # their answers would pile up in its own mailbox past its capacity
                raise MessagingError("queue-full")  # the WIT case carries no text: README, "Threat model"
            self._outstanding[sender] = outstanding + 1
            self._pending[correlation_id] = pending
        # armed before it is queued: an answer that comes at once finds the deadline to discard
        timeout_ms = min(timeout_ms, MAX_REQUEST_TIMEOUT_MS)
        self._deadlines.add(correlation_id, timeout_ms / 1000)
        try:
            if recipient is None:
                self.remote.request(sender, target, payload, correlation_id, timeout_ms)  # type: ignore[union-attr]
            else:
                self._offer(recipient, Envelope(_message(sender, payload, correlation_id), requester=sender,
                                                correlation_id=correlation_id))
        except MessagingError:
            with self._lock:
                still_pending = self._pending.pop(correlation_id, None) is not None
                if still_pending:
                    self._ended(sender)
            self._deadlines.discard(correlation_id)
            if still_pending:
                raise
            # Its deadline fired while it was being queued: the `timeout` callback on its way is its one
            # outcome, so the guest gets the id it names rather than an error as well.
        return correlation_id

    def cancel_request(self, sender: ComponentId, request_id: str) -> None:
        """Stop a pending request of `sender` from producing a callback."""
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.requester != sender:
                if self._answered.get(request_id) == sender:  # answered, its callback not handled yet
                    self._cancelled.add(request_id)
                    return
                raise MessagingError("invalid-message", f"no pending request {request_id!r} from {sender}")
            del self._pending[request_id]
            self._ended(sender)
        self._deadlines.discard(request_id)
        self._forget_remote(request_id)

    def _forget_remote(self, correlation_id: str) -> None:
        """A pending request ended without its answer: the lattice drops where it waited (else kept until the
        answer comes, growing with every cancelled request)."""
        if self.remote is not None:
            self.remote.forget(correlation_id)

    def _ended(self, requester: ComponentId) -> None:
        """One of `requester`'s requests is no longer outstanding (under the lock)."""
        left = self._outstanding.get(requester, 0) - 1
        if left > 0:
            self._outstanding[requester] = left
        else:
            self._outstanding.pop(requester, None)

    def callback_wanted(self, correlation_id: str | None) -> bool:
        """The requester's actor is about to hand this callback to its guest (any thread): False when the
        guest cancelled the request after its answer was on its way (the callback is then skipped)."""
        if correlation_id is None:
            return True
        with self._lock:
            requester = self._answered.pop(correlation_id, None)
            if requester is not None:
                self._ended(requester)
            if correlation_id in self._cancelled:
                self._cancelled.discard(correlation_id)
                return False
        return True

    def broadcast(self, sender: ComponentId, targets: list[ComponentId], payload: bytes) -> None:
        """Deliver to every target (see the module docstring for partial failures)."""
        self._produced(sender, payload)
        if not targets:
            raise MessagingError("invalid-message", "broadcast needs at least one target")
        unique = list(dict.fromkeys(targets))
        recipients = [self._route(sender, "broadcast", target, len(payload)) for target in unique]
        missed = []
        for target, recipient in zip(unique, recipients, strict=True):
            try:
                if recipient is None:
                    self.remote.send(sender, target, payload, "broadcast")  # type: ignore[union-attr]  # _route
                else:
                    self._offer(recipient, Envelope(_message(sender, payload)))
            except MessagingError as exc:
                missed.append(f"{target} ({exc.case})")
        if missed:
            reached = len(recipients) - len(missed)
            raise MessagingError(
                "delivery-failed",
                f"broadcast reached {reached} of {len(recipients)} targets; missed: {', '.join(missed)}",
            )

    # --- requests from the host (event loop) ---

    async def host_send(self, target: ComponentId, payload: bytes, wait: bool = False,
                        timeout: float = math.inf) -> None:
        """Send from the host; with `wait`, wait up to `timeout` seconds for mailbox room instead of
        failing with queue-full (then RequestFailed `timeout`, and nothing was queued)."""
        recipient = self._route(HOST_ID, "send", target, len(payload))
        if recipient is None:
            await self.remote.host_send(target, payload, timeout if wait else 5.0)  # type: ignore[union-attr]
            return
        envelope = Envelope(_message(HOST_ID, payload))
        if wait:
            await self._put(recipient, envelope, self.loop.time() + timeout, timeout, "the message was not sent")
        else:
            self._offer(recipient, envelope)

    async def _put(self, recipient: Recipient, envelope: Envelope, deadline: float, timeout: float,
                   consequence: str) -> None:
        """Queue `envelope`, waiting for room until `deadline` (loop time); never half-queued."""
        if recipient.mailbox.offer(envelope):  # room now, the common case: no timeout to arm (5 - 7 us)
            return
        try:
            async with asyncio.timeout_at(deadline if math.isfinite(deadline) else None):
                queued = await recipient.mailbox.put(envelope)
        except TimeoutError:
            raise RequestFailed(Outcome.TIMEOUT, f"the mailbox of {recipient.component_id} stayed full "
                                f"({recipient.mailbox.capacity} messages) for {timeout:g} s: {consequence}") from None
        if not queued:
            raise MessagingError("delivery-failed", self._not_accepting(recipient.component_id))

    async def host_request(
        self, target: ComponentId, payload: bytes, timeout: float, wait: bool = False
    ) -> bytes | None:
        """Request from the host and wait for the reply (None when the target returned none); with
        `wait`, wait for mailbox room instead of failing with queue-full. `timeout` bounds both.

        Raises RequestFailed for a failed, stopped or timed-out request, MessagingError when it
        cannot be delivered. Timed out or cancelled, the request is withdrawn if not yet taken.
        """
        recipient = self._route(HOST_ID, "request", target, len(payload))
        if recipient is None:
            return await self.remote.host_request(target, payload, timeout)  # type: ignore[union-attr]
        future: asyncio.Future[bytes | None] = self.loop.create_future()
        envelope = Envelope(_message(HOST_ID, payload), reply_future=future)
        deadline = self.loop.time() + timeout
        if wait:
            await self._put(recipient, envelope, deadline, timeout, "the request was not queued")
        else:
            self._offer(recipient, envelope)
        # A timer instead of asyncio.wait_for: half the per-request cost on the hot path.
        timer = self.loop.call_at(deadline, _expire_host_request, future, target, timeout)
        try:
            return await future
        except RequestFailed as exc:
            if exc.outcome is not Outcome.TIMEOUT:
                raise
            if recipient.mailbox.withdraw(envelope):
                raise RequestFailed(exc.outcome, f"{exc.detail}; the request was withdrawn unhandled") from None
            raise RequestFailed(exc.outcome, f"{exc.detail}; {target} was already handling it: its reply "
                                "will be dropped") from None
        except asyncio.CancelledError:  # the caller went away (a `wasmhost call` that hung up)
            recipient.mailbox.withdraw(envelope)
            raise
        finally:
            timer.cancel()

    # --- outcomes (event loop, after an actor handled a batch) ---

    def _expire(self, correlation_id: str) -> None:
        with self._lock:
            pending = self._pending.pop(correlation_id, None)
        if pending is not None:
            self._forget_remote(correlation_id)
            self._callback(pending.requester, pending.target, correlation_id, encode_outcome(
                Outcome.TIMEOUT, f"no reply from {pending.target} in time"), OUTCOME_CONTENT_TYPE)

    def complete(self, responder: ComponentId, envelope: Envelope, reply: bytes | None,
                 outcome: Outcome | None = None, detail: str = "", trace: str = "") -> None:
        """Route the result of handling `envelope`: a reply, or an outcome when `outcome` is given.
        `detail` is one line; `trace` the whole story (a guest backtrace), for the host's requests only."""
        future = envelope.reply_future
        if outcome is None and reply is not None:
            requester = "the host" if future is not None else envelope.requester
            limit = self._reply_limit(envelope)
            if len(reply) > limit:
                outcome, detail, reply = Outcome.FAILED, f"reply from {responder}: " + too_large(
                    len(reply), limit, requester), None
        if future is not None:
            if future.done():
                return
            if outcome is None:
                future.set_result(reply)
            elif outcome is Outcome.NO_REPLY:
                future.set_result(None)
            else:
                future.set_exception(RequestFailed(outcome, detail, trace))
            return
        if envelope.requester is None or envelope.correlation_id is None:
            return
        with self._lock:
            pending = self._pending.pop(envelope.correlation_id, None)
        if pending is None:
            self._late_response(envelope.correlation_id, str(envelope.requester), component=str(responder))
            return
        self._deadlines.discard(envelope.correlation_id)
        if outcome is None:
            self._callback(envelope.requester, responder, envelope.correlation_id, reply or b"", None)
        else:
            self._callback(envelope.requester, responder, envelope.correlation_id,
                           encode_outcome(outcome, detail), OUTCOME_CONTENT_TYPE)

    def complete_remote(self, correlation_id: str, reply: bytes | None, outcome: Outcome | None = None,
                        detail: str = "") -> bool:
        """Route the answer to a remote request (event loop): `reply`, or `outcome` when given. False when
        the request is no longer pending (answered, timed out or cancelled already: dropped)."""
        with self._lock:
            pending = self._pending.pop(correlation_id, None)
        if pending is None:
            self._late_response(correlation_id, "", remote=True)
            return False
        self._deadlines.discard(correlation_id)
        if outcome is None and reply is not None:
            recipient = self._recipients.get(pending.requester)
            limit = recipient.max_message_bytes if recipient is not None else self.host_max_message_bytes
            if len(reply) > limit:
                outcome, detail = Outcome.FAILED, f"reply from {pending.target}: " + too_large(
                    len(reply), limit, pending.requester)
        if outcome is None:
            self._callback(pending.requester, pending.target, correlation_id, reply or b"", None)
        else:
            self._callback(pending.requester, pending.target, correlation_id, encode_outcome(outcome, detail),
                           OUTCOME_CONTENT_TYPE)
        return True

    def _late_response(self, correlation_id: str, requester: str, **fields: object) -> None:
        """Count an answer to a request no longer pending and log it, within the requester's budget of
        lines (remote answers share one: their requester is not known any more)."""
        self.late_responses += 1
        extra = self._late_lines.fields(requester)
        if extra is None:
            return
        if requester:
            extra["requester"] = requester
        log.info("late_response_dropped", correlation_id=correlation_id, **fields, **extra)

    def pending_target(self, correlation_id: str) -> ComponentId | None:
        """The target of a pending request, or None when it is not pending."""
        pending = self._pending.get(correlation_id)
        return pending.target if pending is not None else None

    def _reply_limit(self, envelope: Envelope) -> int:
        """The largest reply the requester of `envelope` takes."""
        if envelope.reply_future is not None or envelope.requester is None:
            return self.host_max_message_bytes
        recipient = self._recipients.get(envelope.requester)
        return recipient.max_message_bytes if recipient is not None else self.host_max_message_bytes

    def _callback(self, requester: ComponentId, responder: ComponentId, correlation_id: str,
                  payload: bytes, content_type: str | None) -> None:
        recipient = self._recipients.get(requester)
        message = ComponentMessage(
            responder, payload,
            MessageMetadata(timestamp=Timestamp.now(), correlation_id=correlation_id, reply_to=responder,
                            content_type=content_type),
        )
        # Callbacks answer requests the requester made, so they may pass its capacity: bounded by
        # its outstanding requests, and never dropped for lack of room. Noted as answered first: the
        # actor may take the callback the moment it is queued.
        with self._lock:
            self._answered[correlation_id] = requester
        if recipient is None or not recipient.mailbox.force(Envelope(message, Delivery.CALLBACK)):
            with self._lock:
                if self._answered.pop(correlation_id, None) is not None:
                    self._ended(requester)
            log.warning("callback_undeliverable", component=str(requester), correlation_id=correlation_id,
                        responder=str(responder))

    def pending_by_requester(self) -> dict[ComponentId, int]:
        """Requests waiting for their reply, per requesting component (a snapshot, from any thread)."""
        with self._lock:
            requesters = [pending.requester for pending in self._pending.values()]
        return dict(Counter(requesters))

    def forget_requester(self, component: ComponentId) -> None:
        """Drop pending requests of a component that stopped (their callbacks have nowhere to go)."""
        with self._lock:
            gone = [cid for cid, p in self._pending.items() if p.requester == component]
            for cid in gone:
                del self._pending[cid]
                self._deadlines.discard(cid)
                self._forget_remote(cid)
            answered = [cid for cid, requester in self._answered.items() if requester == component]
            for cid in answered:
                del self._answered[cid]
                self._cancelled.discard(cid)
            self._outstanding.pop(component, None)


def _expire_host_request(future: asyncio.Future[bytes | None], target: ComponentId, timeout: float) -> None:
    if not future.done():
        future.set_exception(RequestFailed(Outcome.TIMEOUT, f"no reply from {target} within {timeout:g} s"))


def _message(sender: ComponentId, payload: bytes, correlation_id: str | None = None) -> ComponentMessage:
    return ComponentMessage(
        sender, payload, MessageMetadata(timestamp=Timestamp.now(), correlation_id=correlation_id, reply_to=sender)
    )
