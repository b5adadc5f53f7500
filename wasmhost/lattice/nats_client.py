"""The link's NATS client: nats-py's, except that a message it cannot read no longer stops it reading, that
a message arriving for a subscription the link has just drained reaches that subscription's callback
(`LatticeClient.ended`) instead of being dropped, that the error a server closes the connection with reaches
error_cb, and that max_payload is the one the server announced last (a user's JWT limit). All reach into
nats-py 2.16's reader (pinned in pyproject).

nats-py (2.16) reads a connection's messages in one task, and an exception while it turns a message into a
Msg ends that task, with no reconnection: a header block of `NATS/1.0` alone (IndexError), an inline status
or a reply subject that is not UTF-8 (UnicodeDecodeError). Any client allowed to publish on a subject the
host subscribes (a component's `P.in.` subject) can send such a message with a raw socket. The host then
read nothing more (no message, no answer) while its heartbeats still went out, so other hosts kept sending
to it, until nats-py's pings found the connection stale: 12 s with heartbeat_s = 2, and again at the next such
message. Here such a message is dropped and reported through error_cb as UnreadableMessage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from nats import errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.protocol.parser import PERMISSIONS_ERR, STALE_CONNECTION


class UnreadableMessage(Exception):
    """A message nats-py could not read, dropped (its sender gets no answer: where to is not known)."""


class LatticeClient(Client):
    """nats-py's client, reading on past a message it cannot read, handing a message that arrives for a
    subscription just ended to that subscription's callback (`ended`) instead of dropping it, and telling
    error_cb of the -ERR a server closes the connection with."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: dict[int, Callable[[Msg], Awaitable[None]]] = {}
        """Subscriptions the link ended lately, by sid: their callback. nats-server may deliver a message it
        matched before it took the UNSUB even after the PONG that ends a drain (another client's publish races
        the UNSUB inside the server): nats-py drops it, and a request among them heard nothing until its
        requester's timeout (measured: 12 - 76 per 20 stops of a component under load, after the drain)."""

    # A private method of nats-py's (sid, subject, reply, data, headers in 2.16), its arguments passed through:
    # should a release rename it, this is no longer called and nats-py reads as it does, and the tests sending
    # such messages (tests/test_lattice.py) say so.
    async def _process_msg(self, *args: Any, **kwargs: Any) -> None:
        try:
            sid = kwargs.get("sid", args[0] if args else 0)
            late = self.ended.get(sid) if sid not in self._subs else None
            if late is not None and len(args) == 5:  # nats-py 2.16: sid, subject, reply, data, headers
                number, subject, reply, data, headers = args
                await late(self._build_message(number, subject, reply, data, await self._process_headers(headers)))
                return
            await super()._process_msg(*args, **kwargs)
        except Exception as exc:  # one sender's bytes must not end the reading of everybody's messages
            subject = kwargs.get("subject", args[1] if len(args) > 1 else b"?")
            shown = subject.decode(errors="replace") if isinstance(subject, bytes) else str(subject)
            await self._error_cb(UnreadableMessage(f"a message on {shown} could not be read and was dropped: "
                                                   f"{type(exc).__name__}: {exc}"))

    # A private method of nats-py's (the -ERR's text, lower-cased, in 2.16). nats-py tells error_cb of a
    # permissions violation (the connection stays up) and handles a stale connection as a lost one; any other
    # -ERR closes the connection and was kept to itself: a user JWT expiring ('user authentication expired')
    # was logged as "connection lost". Should a release rename it, this is no longer called, and
    # tests/test_lattice_creds.py says so.
    async def _process_err(self, err_msg: str) -> None:
        if PERMISSIONS_ERR not in err_msg and STALE_CONNECTION not in err_msg:
            await self._error_cb(errors.Error(f"nats: {err_msg.strip().strip(chr(39))}"))
        await super()._process_err(err_msg)

    # A private method of nats-py's (an INFO's fields; initial_connection for the one before CONNECT, in 2.16).
    # nats-server announces the max_payload of the connection's user in an INFO after CONNECT when the user's
    # or its account's JWT sets one below the server's (`nsc edit user --payload`); nats-py kept the first
    # INFO's. A guest's message between the two passed the link's checks and nats-py's, and the server then
    # closed the host's connection ('maximum payload violation'): every remote request on it failed, each time.
    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        limit = info.get("max_payload")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            self._max_payload = limit
        await super()._process_info(info, initial_connection)

    # A private method of nats-py's (2.16): give a connection up (stale, lost, unreadable) and connect to the
    # next server. It first closes the old transport and waits until it is closed, and a TCP transport is
    # closed only once the bytes it buffers have gone out: never, while the server has stopped reading (a
    # stalled process, SIGSTOP, a peer whose window stays at zero). Measured: a host publishing a few MB when
    # its server stalled found the connection stale after 12 s, then stayed `reconnecting` (not connected,
    # nothing logged) for as long as the server stayed stopped (98 s, and on), while the other server its
    # [lattice] urls name was up. The connection is given up: what it still buffers is dropped (NATS delivers
    # at most once; requests among it end at their timeout) and the wait ends at once.
    async def _attempt_reconnect(self) -> None:
        abort_transport(self._transport)
        await super()._attempt_reconnect()


def abort_transport(transport: object) -> None:
    """Close nats-py's TCP transport (plain or TLS) at once, dropping what it has not sent yet, so that waiting
    for it to close cannot wait on a peer that stopped reading. Other transports (WebSocket) are left as they
    are."""
    for name in ("_io_writer", "_bare_io_writer"):  # the TLS stream, and the TCP one under it
        writer = getattr(transport, name, None)
        if writer is not None:
            writer.transport.abort()


async def connect(**options: Any) -> Client:
    """nats.connect's equivalent, with LatticeClient."""
    client = LatticeClient()
    await client.connect(**options)
    return client
