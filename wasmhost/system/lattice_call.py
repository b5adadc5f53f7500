"""`wasmhost call --lattice`: one request to a component on whichever host runs it, straight over NATS.

The CLI is then a plain NATS client (the documented ingress wire format, the same path `nats req` takes):
it needs no local daemon, only the [lattice] URLs and credentials, and the receiving host treats it as
an external sender (`external/cli/<machine>`), so the target must say `accept_external = true`.

Like a daemon's own requests, it asks the host that takes the request to say so (`Wasmhost-Ack: 1`, answered
`queued` naming that host and its heartbeat interval) and then watches that host's heartbeats: when it misses
three of them (of its own interval, counted from the acknowledgement) or restarts, the call ends at once with
`target-stopped` instead of waiting for its timeout. When NATS refuses it the heartbeats (a client user allowed
only the clients' subjects), hearing none says nothing: the call waits for its answer up to its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from wasmhost.core.ids import ComponentId, InvalidComponentId
from wasmhost.lattice import wire
from wasmhost.lattice.directory import MISSED_HEARTBEATS
from wasmhost.lattice.settings import LatticeSettings, shown_url

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

CONNECT_TIMEOUT = 5.0
"""Seconds to reach a NATS server before the call fails (the CLI does not wait for NATS to come back)."""


class LatticeCallFailed(Exception):
    """The request did not get a reply: NATS unreachable, nobody runs the target, or an outcome other than
    `reply`/`no-reply` (the message names it)."""


@dataclass(frozen=True)
class Answer:
    """What came back: the outcome header, its detail, the host that answered and the reply bytes."""

    outcome: str
    detail: str
    host: str
    payload: bytes


def external_sender() -> str:
    """The sender id the CLI's requests carry: `external/cli/<this machine's name>`."""
    try:
        return str(ComponentId(wire.EXTERNAL_NAMESPACE, "cli", socket.gethostname()))
    except InvalidComponentId:  # an empty or odd host name: the sender is still an external client
        return str(ComponentId(wire.EXTERNAL_NAMESPACE, "cli", "unknown"))


def connect_options(settings: LatticeSettings) -> dict[str, Any]:
    """nats.connect keyword arguments for `settings`: its servers, credentials, TLS files and inbox prefix."""
    options: dict[str, Any] = {"servers": list(settings.urls), "name": f"wasmhost-cli@{settings.host_id}"}
    if settings.credentials is not None:
        options["user_credentials"] = settings.user_credentials()
    if settings.cli_inbox_prefix is not None:  # answers that clients allowed _INBOX.> can neither read nor forge
        options["inbox_prefix"] = settings.cli_inbox_prefix
    if settings.tls_ca is not None or settings.tls_cert is not None:
        context = ssl.create_default_context(cafile=str(settings.tls_ca) if settings.tls_ca else None)
        if settings.tls_cert is not None and settings.tls_key is not None:
            context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
        options["tls"] = context
    return options


async def call(connect: dict[str, Any], lattice: str, target: ComponentId, payload: bytes, timeout: float
               ) -> Answer:
    """Request `target` with `payload` through NATS (`connect`: nats.connect keyword arguments) and return
    the answer; raises LatticeCallFailed when there is none or it is not a reply."""
    import nats
    from nats import errors

    from wasmhost.lattice.link import HEADER_ROOM

    seen: list[Exception] = []

    async def quietly(exc: Exception) -> None:  # nats-py prints each error with a traceback by default
        seen.append(exc)

    under_way = anyio.CancelScope()  # the request: cancelled when the connection is closed under it

    async def closed() -> None:
        # nats-py closes the connection (no reconnection here) after a server's -ERR other than a permissions
        # violation ('maximum payload violation' past a user JWT's payload limit, 'user authentication
        # expired') or when the server goes, and then wakes neither a flush nor the wait for the answer: the
        # call waited its whole --timeout, then said "timeout: no answer". (After the answer: nothing to end.)
        under_way.cancel()

    try:  # each server tried twice at most (nats-py reads max_reconnect_attempts=0 as "forever")
        nc = await nats.connect(**connect, connect_timeout=CONNECT_TIMEOUT, allow_reconnect=False,
                                max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=quietly,
                                closed_cb=closed)
    except (OSError, errors.Error, TimeoutError) as exc:
        servers = ", ".join(shown_url(url) for url in connect.get("servers", [])) or "the default server"
        cause = seen[-1] if seen else exc
        raise LatticeCallFailed(f"cannot reach NATS at {servers}: {cause or type(cause).__name__}") from None
    try:
        if len(payload) + HEADER_ROOM > nc.max_payload:  # the server would drop the connection instead
            raise LatticeCallFailed(f"invalid-message: the payload of {len(payload)} bytes does not fit the NATS "
                                    f"server's max_payload of {nc.max_payload} bytes (with {HEADER_ROOM} bytes "
                                    "for headers)")
        headers = {wire.KIND: wire.KIND_REQUEST, wire.SENDER: external_sender(),
                   wire.TIMEOUT_MS: str(max(1, int(timeout * 1000))), wire.ACK: "1"}
        msg: Msg | None = None
        with contextlib.suppress(errors.ConnectionClosedError), under_way:  # a ConnectionClosedError: a publish
            # or subscription after nats-py began closing, before closed(); a cancellation from outside (Ctrl-C)
            # goes on as before, since only closed() cancels this scope
            msg = await _request(nc, lattice, target, payload, headers, timeout,
                                 lambda subject: any(_refused(error, subject) for error in seen))
        if msg is None:
            raise LatticeCallFailed(f"NATS closed the connection before an answer came: "
                                    f"{nc.last_error or 'connection lost'}")
    finally:
        await nc.close()
    found = msg.headers or {}
    answer = Answer(found.get(wire.OUTCOME, ""), found.get(wire.DETAIL, ""), found.get(wire.HOST, ""), msg.data)
    if answer.outcome in (wire.REPLY, "no-reply"):
        return answer
    error = found.get(wire.ERROR)
    kind = f"{answer.outcome} ({error})" if error else answer.outcome or "an answer without Wasmhost-Outcome"
    where = f" on {answer.host}" if answer.host else ""
    raise LatticeCallFailed(f"{target}{where}: {kind}: {answer.detail or '(no detail)'}")


def _refused(error: Exception, subject: str) -> bool:
    """Whether `error` (as nats-py reports a server's -ERR) is a refused subscription to, or publish to,
    `subject`."""
    text = str(error).lower()
    return (("permissions violation for subscription" in text or "permissions violation for publish" in text)
            and f'"{subject.lower()}"' in text)


async def _server_read_all(nc: Client, timeout: float) -> None:
    """Return once the server has answered all this client sent so far (its -ERRs come before the PONG), or
    raise. nats-py's flush writes its PING to the socket at once, ahead of a SUB or PUB still waiting for its
    flusher task: one flush after a refused subscription returned before the refusal in 5 runs of 6. The
    first PONG comes after the flusher has run, so the second PING follows those commands."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout  # both within `timeout`
    for _ in range(2):
        await nc.flush(timeout=max(0.001, end - loop.time()))  # type: ignore[arg-type]  # seconds


async def _refusal(nc: Client, timeout: float, refused: Callable[[str], bool], subject: str, what: str) -> None:
    """Raise LatticeCallFailed if NATS refused this client's last subscription or publish to `subject`; `what`
    says what it may not do."""
    with contextlib.suppress(Exception):  # no PONG in time, no connection: the deadline and answer decide
        await _server_read_all(nc, timeout)
    if refused(subject):
        raise LatticeCallFailed(f"NATS refused the request: this client's user may not {what} (permissions "
                                "violation)")


async def _request(nc: Client, lattice: str, target: ComponentId, payload: bytes, headers: dict[str, str],
                   timeout: float, refused: Callable[[str], bool]) -> Msg:
    """Publish the request and return its answer (not the `queued` acknowledgement), within `timeout` s.
    The acknowledgement names the host that took the request: its heartbeats are watched from then on, and
    the call ends `target-stopped` when that host misses MISSED_HEARTBEATS of them or restarts (the same rule
    and words as a daemon's requests, see Link._end_placed). The acknowledgement says the host's interval and
    start (Wasmhost-Heartbeat), so one that dies before the CLI hears any of its heartbeats is noticed too;
    without it (a host of an older version), only from its first heartbeat heard. `refused(subject)`: whether
    NATS refused this client's subscription to `subject` (the watch then ends: silence would be no sign)."""
    subjects = wire.Subjects(lattice)
    subject = subjects.ingress(target)  # a plain client's subject: the CLI is not a host
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    arrived: asyncio.Queue[Msg] = asyncio.Queue()  # answers and heartbeats; the subscriptions end with nc

    async def put(msg: Msg) -> None:
        arrived.put_nowait(msg)

    inbox = nc.new_inbox()
    # nats-server refuses a subscription or a publish (permissions: its user's, or its creds' JWT's) with an
    # -ERR sent before the PONG of a flush. Unasked, a client that may not subscribe to its inbox or publish
    # to the component waited its whole --timeout, then said "timeout: no answer". The inbox is asked about
    # before the request goes out: a request whose answer could not be heard is not sent.
    await nc.subscribe(inbox, cb=put)
    await _refusal(nc, deadline - loop.time(), refused, inbox, f"subscribe to its inbox {inbox} (no answer "
                   "could reach it; the request was not sent)")
    await nc.publish(subject, payload, reply=inbox, headers=headers)
    await _refusal(nc, deadline - loop.time(), refused, subject, f"publish to {subject}")
    holder, beats = "", ""  # the host that took the request, its heartbeat subject
    last: wire.Heartbeat | None = None
    heard = 0.0  # loop.time() of `last`
    while True:
        try:
            msg = arrived.get_nowait()  # what has come counts before any deadline is judged
        except asyncio.QueueEmpty:
            now = loop.time()
            gone = heard + MISSED_HEARTBEATS * last.heartbeat_s if last is not None else deadline
            if gone < deadline and now > gone:
                if refused(beats):  # NATS refused the subscription (permissions): no heartbeat could be heard
                    last = None
                    continue
                raise LatticeCallFailed(f"{target}: target-stopped: host {holder} left the lattice (no heartbeat) "
                                        "with the request") from None
            if now >= deadline:
                raise LatticeCallFailed(f"timeout: no answer from {target} within {timeout:g} s") from None
            try:  # woken by a message, or at the next deadline to judge
                msg = await asyncio.wait_for(arrived.get(), min(gone, deadline) - now + 0.001)
            except TimeoutError:
                continue
        if msg.subject == beats:
            try:
                beat = wire.heartbeat_codec[1].decode(msg.data)
            except Exception:  # not a heartbeat: a daemon ignores it too
                continue
            if beat.host != holder:  # only a host's own subject speaks for it, and only for itself
                continue
            if last is not None and beat.started_at != last.started_at:
                raise LatticeCallFailed(f"{target}: target-stopped: host {holder} restarted with the request")
            last, heard = beat, loop.time()
            continue
        if msg.subject != inbox:
            continue
        found = msg.headers or {}
        if found.get("Status") == "503":  # NATS: nothing subscribes the subject
            raise LatticeCallFailed(f"no host of lattice {lattice!r} runs {target} "
                                    f"(nothing subscribes to {subject})")
        if found.get(wire.OUTCOME) != wire.QUEUED:
            return msg
        if not holder and found.get(wire.HOST):  # the host holding it: watched until the answer comes
            holder = found[wire.HOST]
            beats = subjects.heartbeat(holder)
            said = wire.acknowledged_heartbeat(holder, found.get(wire.HEARTBEAT))
            if said is not None:  # alive as it acknowledged: counted as its heartbeat heard now
                last, heard = said, loop.time()
            await nc.subscribe(beats, cb=put)
            # nats-server refuses a subscription (permissions) with an -ERR sent before the PONG of a flush: once
            # it returns, `refused(beats)` knows. Without it, a refusal still on its way when three heartbeats of
            # a fast holder (3 x 0.05 s) had passed ended a call to a live host target-stopped.
            with contextlib.suppress(Exception):  # no PONG in time, no connection: the deadline and answer decide
                await _server_read_all(nc, deadline - loop.time())
