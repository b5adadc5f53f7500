"""The link: this host's one NATS connection, owned by a task of the daemon's task group.

It connects in the background (the daemon is READY without NATS), retries until it can, then leaves
reconnection to nats-py, and connects anew when nats-py gives a connection up (the server closed it);
publishes heartbeats, serves and fetches inventories, subscribes each local component's two subjects, from
hosts and from clients (queue group = the subject: one replica takes each message), delivers what arrives
to the local router (ingress.py) and publishes what the router hands it (the RemotePort protocol).

Guest threads never touch the network: a send or request is checked at once against what the link knows
(connected, target known lattice-wide, size) and put on the outbox, which the loop publishes in order; a
burst of publishes from one guest batch costs one loop wake-up (the first fills an empty outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from wasmhost.actors.state import TAKING_MESSAGES
from wasmhost.core.errors import MessagingError
from wasmhost.core.ids import HOST_ID, ComponentId, InvalidComponentId
from wasmhost.core.log_budget import LogBudget
from wasmhost.core.message_size import check_message_size
from wasmhost.lattice import wire
from wasmhost.lattice.directory import Directory
from wasmhost.lattice.ingress import Ingress
from wasmhost.lattice.settings import LatticeSettings, shown_url
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.messaging.router import MessageRouter

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = structlog.get_logger("wasmhost.lattice")

HEADER_ROOM = 1024
"""Bytes kept free of a NATS message's max_payload for the headers."""
DEFAULT_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default max_payload: what the link assumes before it has a connection to ask."""
CONNECT_RETRY_S = (0.2, 5.0)
"""First and longest wait between two attempts at the first connection."""
INVENTORY_TIMEOUT_S = 2.0
CHANGE_BATCH_S = 0.1
"""Local changes within this many seconds of the first are told to the lattice together."""
EXPIRY_CHECK_S = (0.01, 1.0)
"""Shortest and longest wait between two looks for hosts gone silent (a host joining meanwhile is seen
within the longest)."""
SEND_TOKEN = "send"
"""The answer subject token of sends (their answers only matter when they are rejections)."""
OUTBOX_GUEST_BYTES = 128 * 1024 * 1024
"""What the outbox may hold (payloads, and OUTBOX_ENTRY_BYTES each) before guests' remote sends, requests and
broadcasts are refused `queue-full`: they are queued at once, and while NATS takes them slower than guests make
them (a slow link, a stalled server) nothing else bounds them once nats-py's own 64 MiB buffer is full.
With the server stopped (SIGSTOP), one guest's 1.4 million empty sends grew the daemon from 58 to 618 MiB in
28 s, and on; with this bound it stayed at 271 MiB, the guest getting queue-full."""
DRAIN_S = 5.0
"""How long a component's subscriptions may take to drain (a round trip to the server) when it stops taking
messages, before they are dropped as they are."""
ENDED_S = 5.0
"""How long after its drain a subscription's late messages are still answered (see LatticeClient.ended)."""
OUTBOX_ENTRY_BYTES = 512
"""What one queued publish is counted as besides its payload (its subject, headers, tuple; measured ~300)."""

Inventories = Callable[[], list[wire.InventoryEntry]]
"""What this host runs, for its inventory (called on the loop)."""
LIVE_STATES = tuple(state.value for state in TAKING_MESSAGES)


class Link:
    """One host's membership of a lattice; implements RemotePort for the router."""

    def __init__(self, settings: LatticeSettings, router: MessageRouter, inventory: Inventories,
                 accepts_external: Callable[[ComponentId], bool | None]) -> None:
        self.settings = settings
        self.router = router
        self.loop = router.loop
        self.inventory_source = inventory
        self.host = settings.host_id
        self.subjects = wire.Subjects(settings.name)
        self.directory = Directory(self.host)
        self.started_at = time.time()
        self.ingress = Ingress(self, accepts_external)
        self.nc: Client | None = None
        self.cause = "not connected yet"  # why the link is down, for delivery-failed details
        self._unreachable_logged = ""
        self._leaving = False
        self._duplicate_logged = False
        self._other_runs: dict[float, float] = {}  # earlier starts heard with this host_id -> when first heard
        self._outbox: deque[tuple[str, bytes, dict[str, str], str]] = deque()
        self._outbox_bytes = 0  # what the outbox holds, as counted against OUTBOX_GUEST_BYTES
        # A guest sending in a loop to a target that refuses (its mailbox full, no grant there) makes one
        # rejection per send: 554,051 lines in 35 s on each host, unbudgeted. At most a few per target now.
        self._rejected_lines = LogBudget()
        self._error_lines = LogBudget()  # lattice_error lines about one message each, per kind (see _on_error)
        self._outbox_lock = threading.Lock()
        self._outbox_ready = asyncio.Event()
        self._changed = asyncio.Event()  # local components changed: resubscribe, new inventory
        self._closed = asyncio.Event()  # nats-py closed the connection for good: connect anew
        self._subs: dict[ComponentId, list[Subscription]] = {}  # a local component's subjects: hosts', clients'
        self._inventory: list[wire.InventoryEntry] = []
        self._inventory_version = 0
        self._placed: dict[str, str] = {}  # request token -> the host holding it (guests' and the host's own)
        self._host_waits: dict[str, asyncio.Future[tuple[bytes, dict[str, str]]]] = {}
        self._fetching: set[str] = set()
        self._seq = 0
        self._tasks: anyio.abc.TaskGroup | None = None

    # --- running (the daemon's task group) ---

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect (retrying in the background), then serve until cancelled; closes the connection at the end.
        The lattice never ends the daemon: a failure of the link is logged, and the link starts again after a
        pause (local messaging goes on meanwhile; remote messages fail fast, naming the cause)."""
        task_status.started()
        wait = CONNECT_RETRY_S[0]
        try:
            while True:
                began = time.monotonic()
                try:
                    await self._serve()
                    self.nc = None  # closed: remote messages fail fast (with the cause) until connected again
                except Exception as exc:  # a bug, or a connection closed under a call: start again
                    log.exception("lattice_link_failed", host=self.host)
                    self.cause = f"the lattice link failed: {_describe(exc)}"
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                        await self._close()
                    self.nc = None  # closed: the next connection's failures are not its (see _on_error)
                self._subs.clear()  # they belonged to the connection just closed
                if time.monotonic() - began > CONNECT_RETRY_S[1]:  # it served a while: not a closure loop
                    wait = CONNECT_RETRY_S[0]
                await anyio.sleep(wait)
                wait = min(wait * 2, CONNECT_RETRY_S[1])
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self._close()

    async def _serve(self) -> None:
        """One connection's life: connect, subscribe, publish and beat until the connection is closed for good
        (nats-py reconnects after anything else) or the task is cancelled."""
        self._closed.clear()
        async with anyio.create_task_group() as tasks:
            self._tasks = tasks
            tasks.start_soon(self._publisher, name="lattice outbox")
            await self._connect()
            await self._subscribe_host()
            tasks.start_soon(self._heartbeats, name="lattice heartbeats")
            tasks.start_soon(self._expiry, name="lattice expiry")
            await self._closed.wait()
            if self._leaving:  # the daemon is stopping: it cancels this task soon
                await anyio.sleep_forever()
            tasks.cancel_scope.cancel()

    async def _connect(self) -> None:
        """Connect; nats-py retries every URL until one answers (each failure reaches `_on_error`, which logs
        lattice_unreachable once per cause). Only a mistake it does not retry ends an attempt: then this tries
        again after a pause."""
        from wasmhost.lattice import nats_client  # only a daemon with [lattice] pays for importing nats-py

        wait = CONNECT_RETRY_S[0]
        while True:
            try:
                self.nc = await nats_client.connect(
                    servers=list(self.settings.urls), name=f"wasmhost {self.host}", allow_reconnect=True,
                    max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2,
                    ping_interval=max(1, int(self.settings.heartbeat_s * 2)), max_outstanding_pings=2,
                    pending_size=64 * 1024 * 1024, user_credentials=self.settings.user_credentials(), tls=self._tls(),
                    # inventories come back here: on _INBOX. any plain client could read every host's
                    inbox_prefix=self.subjects.inbox(self.host),
                    error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected, closed_cb=self._on_closed)
                break
            except Exception as exc:  # nats-py raises its own errors and OSErrors alike
                await self._on_error(exc)
                await anyio.sleep(wait)
                wait = min(wait * 2, CONNECT_RETRY_S[1])
        self.cause = ""
        log.info("lattice_connected", url=self._url(), host=self.host, lattice=self.settings.name,
                 max_payload=self.max_payload)

    def _tls(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_ca is None and s.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=str(s.tls_ca) if s.tls_ca else None)
        if s.tls_cert is not None and s.tls_key is not None:
            context.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        return context

    def _url(self) -> str:
        url = self.nc.connected_url if self.nc is not None else None
        return shown_url(url.geturl()) if url is not None else ""

    async def _on_error(self, exc: Exception) -> None:
        cause = _describe(exc)
        if self.nc is None:  # not connected yet
            urls = [shown_url(url) for url in self.settings.urls]
            cause = f"cannot connect to {', '.join(urls)}: {cause}"
            if cause != self._unreachable_logged:  # once per cause, not on every attempt
                log.warning("lattice_unreachable", urls=urls, cause=cause)
                self._unreachable_logged = cause
        elif _about_one_message(exc):
            # A refused publish (an answer to a reply subject this host may not publish on: a client's choice)
            # or a message dropped (a slow consumer, or unreadable: nats_client.py): one per message, as often
            # as clients send them, and the connection stays up. Each was a line (2,000 client messages made
            # 2,000), and the last one became the `cause` a later disconnection was reported with. Budgeted
            # now, and not a cause.
            extra = self._error_lines.fields(type(exc).__name__)
            if extra is not None:
                log.warning("lattice_error", url=self._url(), cause=cause, **extra)
            return
        elif self.nc.is_closed and self.cause:
            # nats-py closing the connection after a server's -ERR (logged, and the cause): the socket the
            # server closed may then fail too (measured: 'Connection reset by peer' after 'maximum payload
            # violation'), and lattice_disconnected and lattice_closed named that instead of the server's reason
            return
        elif self.connected:  # the first sign of a disconnection
            log.warning("lattice_error", url=self._url(), cause=cause)
        self.cause = cause

    async def _on_disconnected(self) -> None:
        cause = self.cause or "connection lost"
        self.cause = f"disconnected from NATS ({cause})"
        log.warning("lattice_disconnected", url=self._url(), cause=cause)

    async def _on_reconnected(self) -> None:
        self.cause = ""
        log.info("lattice_reconnected", url=self._url())

    async def _on_closed(self) -> None:
        # nats-py gives a connection up after a server -ERR (e.g. a publish above max_payload) or our close()
        self.cause = f"the NATS connection was closed ({self.cause or 'by this host'})"
        if not self._leaving:
            log.warning("lattice_closed", url=self._url(), cause=self.cause)
        self._closed.set()

    async def _close(self) -> None:
        nc = self.nc
        if nc is None:
            return
        with contextlib.suppress(Exception):
            await self._publish_outbox(nc)
            await nc.flush(timeout=1)
        with contextlib.suppress(Exception):
            await nc.close()

    async def leave(self) -> None:
        """Stop taking messages for local components (the daemon is stopping): other replicas take them."""
        self._leaving = True
        subs, self._subs = list(self._subs.values()), {}
        async with anyio.create_task_group() as drains:  # the components still run: what NATS sent is handled
            for component_subs in subs:
                drains.start_soon(self._drain, component_subs, False)
        log.info("lattice_leaving", host=self.host)

    def snapshot(self) -> dict[str, object]:
        """The lattice as this host sees it (for `wasmhost status --lattice`): this host, the link, and every
        other host with the components it runs, as plain data (event loop). This host's own components are
        not in it: the caller reads them live (the inventory here is the one last published)."""
        now = time.monotonic()
        return {
            "host": self.host, "lattice": self.settings.name, "connected": self.connected, "url": self._url(),
            "cause": self.cause, "remote_requests": self.placed,
            "hosts": [{"host": r.host, "seen_s_ago": round(now - r.last_seen, 3),
                       "components": [msgspec.to_builtins(e) for e in r.components.values()]}
                      for r in sorted(self.directory.hosts.values(), key=lambda r: r.host)],
        }

    @property
    def max_payload(self) -> int:
        """The largest message (headers included) NATS takes from this host now: the connection's, read live,
        since nats-server lowers it after CONNECT to a user's or account's JWT limit (nats_client.py); before
        a connection, nats-server's default."""
        nc = self.nc
        return nc.max_payload if nc is not None else DEFAULT_MAX_PAYLOAD

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up right now."""
        return self.nc is not None and self.nc.is_connected

    # --- subscriptions, heartbeats, inventories ---

    async def _subscribe_host(self) -> None:
        nc = self.nc
        assert nc is not None
        await nc.subscribe(self.subjects.heartbeats, cb=self._on_heartbeat)
        await nc.subscribe(self.subjects.inventory(self.host), cb=self._on_inventory_request)
        await nc.subscribe(self.subjects.replies(self.host), cb=self._on_answer)
        await self._reconcile()

    def local_changed(self) -> None:
        """RemotePort: the local components changed (any thread)."""
        self._set(self._changed)

    async def _reconcile(self) -> None:
        """Subscribe the live local components, unsubscribe the others, refresh the inventory."""
        self._changed.clear()
        inventory = self.inventory_source()
        if inventory != self._inventory:
            self._inventory = inventory
            self._inventory_version += 1
        nc = self.nc
        if nc is None or self._leaving:
            return
        wanted = set()
        for entry in inventory:
            if entry.state in LIVE_STATES:
                with contextlib.suppress(InvalidComponentId):
                    wanted.add(ComponentId.parse(entry.id))
        for cid in [c for c in self._subs if c not in wanted]:
            if self._tasks is not None:  # in the background: a round trip each, and subscribing must not wait
                self._tasks.start_soon(self._drain, self._subs.pop(cid), name=f"lattice drain {cid}")
            else:
                await _unsubscribe(self._subs.pop(cid))
        for cid in wanted - self._subs.keys():
            subs: list[Subscription] = []
            try:
                for subject in (self.subjects.message(cid), self.subjects.ingress(cid)):  # from hosts, from clients
                    subs.append(await nc.subscribe(subject, queue=subject, cb=self.ingress.on_message,
                                                   pending_bytes_limit=256 * 1024 * 1024))
            except Exception as exc:  # the connection is closed or closing: the next tick tries again
                log.warning("lattice_subscribe_failed", component=str(cid), cause=_describe(exc))
                await _unsubscribe(subs)
                continue
            if self._leaving:  # leave() ran meanwhile and took out only what was in _subs: nothing more now
                await _unsubscribe(subs)
                return
            self._subs[cid] = subs

    async def _drain(self, subs: list[Subscription], linger: bool = True) -> None:
        """End a component's subscriptions, handling the messages NATS sent before it took the UNSUB: they reach
        Ingress, which answers them (the component no longer takes messages: rejected). A plain unsubscribe
        drops them in nats-py, and each request among them heard nothing until its requester's timeout
        (measured: 60 of 102,608 client requests, about 2 per stop of a component under load, NATS timeouts
        after 5 s instead of an answer). Bounded: a drain that cannot finish (no connection) is dropped as
        unsubscribe() would, never left subscribed for nats-py to subscribe again at its next reconnection. What
        NATS still delivers after the drain reaches Ingress for ENDED_S more (`linger`; LatticeClient.ended)."""
        nc = self.nc
        ended = getattr(nc, "ended", {})  # messages NATS delivers even after the drain (nats_client.py)
        for sub in subs:
            ended[sub._id] = self.ingress.on_message
        try:
            for sub in subs:
                with anyio.move_on_after(DRAIN_S):
                    with contextlib.suppress(Exception):
                        await sub.drain()  # type: ignore[no-untyped-call]
                        continue
                if nc is not None:  # nats-py 2.16's drain leaves the subscription in place when its flush fails
                    sub._stop_processing()  # (nats-py has no public way to drop a half-drained one)
                    nc._remove_sub(sub._id)
            if nc is not None:
                # The connection may have been lost during the drain: nats-py then subscribed everything it held
                # again on the next server, these too (a drain forgets nothing until it ends), after the UNSUB that
                # went to the old one, and a drain whose round trip was lost gave up dropping them in nats-py only.
                # The new server kept them for good, in the components' queue groups: their share of the messages
                # was dropped. Unsubscribed again now that nats-py no longer holds them (it cannot subscribe them
                # anew): a server that has them takes this, one that has not ignores it.
                for sub in subs:
                    with contextlib.suppress(Exception):
                        await nc._send_unsubscribe(sub._id)
            if linger:  # not when the daemon leaves: it stops at once
                await anyio.sleep(ENDED_S)
        finally:
            for sub in subs:
                ended.pop(sub._id, None)

    async def _heartbeats(self) -> None:
        encode = wire.heartbeat_codec[0].encode
        interval = self.settings.heartbeat_s
        while True:
            try:
                await self._reconcile()
                self._seq += 1
                beat = wire.Heartbeat(self.host, self._seq, self.started_at, interval, self._inventory_version)
                if self.connected:
                    self.publish(self.subjects.heartbeat(self.host), encode(beat), {})
            except Exception:  # one bad tick must not stop the heartbeats: the next one tries again
                log.exception("lattice_heartbeat_failed", host=self.host)
            with anyio.move_on_after(interval):
                await self._changed.wait()  # a component came, went, started or stopped taking messages:
                await self._reconcile()  # subscriptions follow at once (NATS must not pick a stopped replica)
                # ... the lattice is told soon, but not once per component: a start-up of thousands comes in
                # bursts, taken together
                await anyio.sleep(min(CHANGE_BATCH_S, interval))

    async def _expiry(self) -> None:
        """Take out the hosts gone silent, each at its own deadline (three of its heartbeats, not of ours: a
        host beating every 0.5 s has left after 1.5 s, also when this one beats once a minute)."""
        while True:
            try:
                for host in self.directory.expire():
                    self._host_left(host)
            except Exception:  # one bad look must not stop the next
                log.exception("lattice_expiry_failed", host=self.host)
            deadline = self.directory.next_expiry()
            wait = EXPIRY_CHECK_S[1] if deadline is None else deadline - time.monotonic()
            await anyio.sleep(min(max(wait, EXPIRY_CHECK_S[0]), EXPIRY_CHECK_S[1]))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = wire.heartbeat_codec[1].decode(msg.data)
        except Exception as exc:  # another host's bug must not stop ours
            log.warning("lattice_bad_heartbeat", subject=msg.subject, detail=_describe(exc))
            return
        if msg.subject != self.subjects.heartbeat(beat.host):  # only a host's own subject speaks for it
            log.warning("lattice_bad_heartbeat", subject=msg.subject, host=beat.host,
                        detail=f"expected the heartbeat of {beat.host} on {self.subjects.heartbeat(beat.host)}")
            return
        if (beat.host == self.host and beat.started_at != self.started_at and not self._duplicate_logged
                and self._another_run_alive(beat)):
            # answers meant for one of the two reach either: requests would time out at random
            log.error("lattice_duplicate_host_id", host=self.host, detail="another daemon uses this host_id; give "
                      "each daemon its own [lattice] host_id")
            self._duplicate_logged = True
        fetch, restarted = self.directory.heard(beat)
        if restarted:
            self._end_placed(beat.host, f"host {beat.host} restarted with the request")
        if fetch and beat.host not in self._fetching and self._tasks is not None:
            known = beat.host in self.directory.hosts and self.directory.hosts[beat.host].inventory_version >= 0
            if not known:
                log.info("lattice_host_joined", host=beat.host)
            self._fetching.add(beat.host)
            self._tasks.start_soon(self._fetch_inventory, beat.host, name=f"inventory of {beat.host}")

    def _another_run_alive(self, beat: wire.Heartbeat) -> bool:
        """Whether `beat`, this host's id with another start, comes from a daemon running now. A run started after
        this one is; one started before may be this host's own previous run, whose last heartbeats a server that
        stalled delivers when it resumes, however late (all at once): taken for another daemon, that logged an error
        (and only the first is logged: a real duplicate would then go unsaid). So an earlier run counts once its
        heartbeats have kept coming for one of its intervals (at most a second)."""
        if beat.started_at > self.started_at:
            return True
        if len(self._other_runs) > 64:  # a flood of forged starts: bounded
            self._other_runs.clear()
        first = self._other_runs.setdefault(beat.started_at, time.monotonic())
        return time.monotonic() - first >= min(1.0, beat.heartbeat_s)

    async def _fetch_inventory(self, host: str) -> None:
        try:
            assert self.nc is not None
            answer = await self.nc.request(self.subjects.inventory(host), b"", timeout=INVENTORY_TIMEOUT_S)
            self.directory.update(wire.inventory_codec[1].decode(answer.data))
        except Exception as exc:  # the next heartbeat tries again
            log.info("lattice_inventory_unavailable", host=host, cause=_describe(exc))
        finally:
            self._fetching.discard(host)

    async def _on_inventory_request(self, msg: Msg) -> None:
        if msg.reply:
            inventory = wire.Inventory(self.host, self._inventory_version, self._inventory)
            self.publish(msg.reply, wire.inventory_codec[0].encode(inventory), {})

    def _host_left(self, host: str) -> None:
        log.warning("lattice_host_left", host=host)
        self._end_placed(host, f"host {host} left the lattice (no heartbeat) with the request")

    def _end_placed(self, host: str, detail: str) -> None:
        """End the requests `host` had queued with target-stopped: it will not answer them."""
        # list(): one copy under the GIL, as guest threads add placements meanwhile
        for token in [t for t, h in list(self._placed.items()) if h == host]:
            self._placed.pop(token, None)
            if not self._answer_host_call(token, b"", {wire.OUTCOME: Outcome.TARGET_STOPPED.value,
                                                        wire.DETAIL: detail}):
                self.router.complete_remote(token, None, Outcome.TARGET_STOPPED, detail)

    def _hold(self, token: str, host: str) -> None:
        """Note that `host` holds the request `token` (any thread). Noted first, then checked: a request that
        ends meanwhile on another thread (cancelled, timed out) is dropped either by its forget() or here."""
        self._placed[token] = host
        if token not in self._host_waits and self.router.pending_target(token) is None:
            self._placed.pop(token, None)

    def forget(self, correlation_id: str) -> None:
        """RemotePort: the request ended without its answer (any thread): no host holds it for us any more."""
        self._placed.pop(correlation_id, None)

    @property
    def placed(self) -> int:
        """How many of this host's requests wait on a known other host."""
        return len(self._placed)

    # --- answers to this host's requests and sends ---

    async def _on_answer(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        headers = msg.headers or {}
        if headers.get("Status") == "503":  # NATS: nobody subscribes the target's subject (any more)
            try:
                target = str(self.subjects.component(headers.get("Nats-Subject", "")))
            except InvalidComponentId:
                target = ""
            headers = {wire.OUTCOME: wire.REJECTED, wire.ERROR: "target-not-found", wire.TARGET: target,
                       wire.DETAIL: "no host runs it (any more)"}
        if token in self._host_waits:  # the host's own call: a send ends with its first answer, a request with its last
            if token.startswith("s") or headers.get(wire.OUTCOME) != wire.QUEUED:
                self._answer_host_call(token, msg.data, headers)
            else:  # a replica took it: ended at once if that host leaves (_end_placed)
                self._hold(token, headers.get(wire.HOST, ""))
            return
        outcome = headers.get(wire.OUTCOME, wire.REPLY)
        detail = headers.get(wire.DETAIL, "")
        if token == SEND_TOKEN:
            if outcome == wire.REJECTED:
                target = headers.get(wire.TARGET, "")
                extra = self._rejected_lines.fields(target)
                if extra is not None:
                    log.warning("lattice_send_rejected", target=target, host=headers.get(wire.HOST, ""),
                                error=headers.get(wire.ERROR, ""), detail=detail, **extra)
            return
        if outcome == wire.QUEUED:
            self._hold(token, headers.get(wire.HOST, ""))
            return
        self._placed.pop(token, None)
        if outcome == wire.REPLY:
            self.router.complete_remote(token, msg.data)
        elif outcome == wire.REJECTED:
            error = headers.get(wire.ERROR, "delivery-failed")
            self.router.complete_remote(token, None, Outcome.FAILED, f"{self.router.pending_target(token)} rejected "
                                        "the request: " + error + (f": {detail}" if detail else ""))
        else:
            try:
                kind = Outcome(outcome)
            except ValueError:
                kind, detail = Outcome.FAILED, f"unknown outcome {outcome!r} from host {headers.get(wire.HOST)}"
            self.router.complete_remote(token, None, kind, detail)

    # --- RemotePort (guest threads and the loop) ---

    def check(self, target: ComponentId, size: int) -> None:
        """Raise MessagingError unless `target` runs on another host and `size` bytes can reach it now."""
        if not self.connected:
            raise MessagingError("delivery-failed", f"{target} is not on this host and the lattice is unreachable: "
                                 f"{self.cause or 'not connected'}")
        entry = self.directory.entry(target)
        if entry is None:
            raise MessagingError("target-not-found", target)
        if entry.max_message_bytes:
            check_message_size(size, entry.max_message_bytes, target)
        if size + HEADER_ROOM > self.max_payload:
            raise MessagingError("invalid-message", f"payload of {size} bytes does not fit the NATS server's "
                                 f"max_payload of {self.max_payload} bytes (with {HEADER_ROOM} bytes for headers)")

    def _headers(self, kind: str, sender: ComponentId, correlation_id: str | None = None,
                 timeout_ms: int | None = None) -> dict[str, str]:
        headers = {wire.KIND: kind, wire.SENDER: str(sender), wire.SENDER_HOST: self.host}
        if correlation_id is not None:
            headers[wire.CORRELATION] = correlation_id
        if timeout_ms is not None:
            headers[wire.TIMEOUT_MS] = str(timeout_ms)
        return headers

    def _room(self, payload: bytes) -> None:
        """Raise queue-full when the outbox holds too much to take a guest's `payload` (see OUTBOX_GUEST_BYTES);
        checked before anything is noted, so that a refused request leaves nothing behind. Guests checking at
        once may pass it by a payload each."""
        if self._outbox_bytes + len(payload) + OUTBOX_ENTRY_BYTES > OUTBOX_GUEST_BYTES:
            raise MessagingError("queue-full")  # the WIT case carries no text: README, "Lattice"

    def send(self, sender: ComponentId, target: ComponentId, payload: bytes, action: str = "send") -> None:
        """RemotePort: publish a send or one target of a broadcast (its rejection comes back to be logged);
        queue-full when the outbox is full."""
        self._room(payload)
        kind = wire.KIND_BROADCAST if action == "broadcast" else wire.KIND_SEND
        self.publish(self.subjects.message(target), payload, self._headers(kind, sender),
                      self.subjects.reply(self.host, SEND_TOKEN))

    def request(self, sender: ComponentId, target: ComponentId, payload: bytes, correlation_id: str,
                timeout_ms: int) -> None:
        """RemotePort: publish a request; its answer goes to the router's pending `correlation_id`; queue-full
        when the outbox is full."""
        self._room(payload)
        headers = self._headers(wire.KIND_REQUEST, sender, correlation_id, timeout_ms)
        self._place(correlation_id, target, headers)
        self.publish(self.subjects.message(target), payload, headers, self.subjects.reply(self.host, correlation_id))

    def _place(self, token: str, target: ComponentId, headers: dict[str, str]) -> None:
        """Note where the request `token` to `target` waits, so that it ends at once if that host leaves: known
        now when one host runs the target; with replicas, the host that takes it says so (`queued`, asked for
        by Wasmhost-Ack in `headers`): an extra message only then."""
        hosts = self.directory.hosts_of(target)
        if len(hosts) == 1:
            self._hold(token, hosts[0])
        else:
            headers[wire.ACK] = "1"

    async def _host_call(self, kind: str, target: ComponentId, payload: bytes, timeout: float
                         ) -> tuple[bytes, dict[str, str]]:
        token = ("s" if kind == wire.KIND_SEND else "h") + self.router.new_correlation_id()
        future: asyncio.Future[tuple[bytes, dict[str, str]]] = self.loop.create_future()
        self._host_waits[token] = future
        headers = self._headers(kind, HOST_ID, token, max(1, int(timeout * 1000)))
        try:
            self._place(token, target, headers)
            self.publish(self.subjects.message(target), payload, headers, self.subjects.reply(self.host, token))
            with anyio.fail_after(timeout):
                return await future
        except TimeoutError:
            raise RequestFailed(Outcome.TIMEOUT, f"no answer from {target} (on another host) within "
                                f"{timeout:g} s") from None
        finally:
            self._host_waits.pop(token, None)
            self._placed.pop(token, None)

    def _answer_host_call(self, token: str, data: bytes, headers: dict[str, str]) -> bool:
        """End the host's own call `token` with this answer (its first one counts); False when `token` is not
        a host call waiting here."""
        waiter = self._host_waits.get(token)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result((data, headers))
        return True

    async def host_request(self, target: ComponentId, payload: bytes, timeout: float) -> bytes | None:
        """RemotePort: the host's own request to a component on another host."""
        data, headers = await self._host_call(wire.KIND_REQUEST, target, payload, timeout)
        return _host_result(target, data, headers)

    async def host_send(self, target: ComponentId, payload: bytes, timeout: float) -> None:
        """RemotePort: the host's own send, returning once the target's host queued it."""
        _data, headers = await self._host_call(wire.KIND_SEND, target, payload, timeout)
        _host_result(target, b"", headers)

    # --- the outbox ---

    def publish(self, subject: str, payload: bytes, headers: dict[str, str], reply: str = "") -> None:
        """Queue a publish from any thread, in order; the loop is woken only when the outbox was empty."""
        with self._outbox_lock:
            was_empty = not self._outbox
            self._outbox.append((subject, payload, headers, reply))
            self._outbox_bytes += len(payload) + OUTBOX_ENTRY_BYTES
        if was_empty:
            self._set(self._outbox_ready)

    def _set(self, event: asyncio.Event) -> None:
        """Set `event` (of the loop) from any thread."""
        if _on_loop(self.loop):
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone
                self.loop.call_soon_threadsafe(event.set)

    async def _publisher(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            if self.nc is not None:
                await self._publish_outbox(self.nc)
            else:
                self._fail_outbox("not connected to NATS")

    async def _publish_outbox(self, nc: Client) -> None:
        while True:
            with self._outbox_lock:
                if not self._outbox:
                    return
                subject, payload, headers, reply = self._outbox.popleft()
                self._outbox_bytes -= len(payload) + OUTBOX_ENTRY_BYTES
            limit, header_size = nc.max_payload, wire.header_bytes(headers)
            if len(payload) + header_size > limit:  # nats-py refuses it, or nats-server closes the connection
                cause = (f"{len(payload)} bytes (with {header_size} bytes of headers) exceed the NATS server's "
                         f"max_payload of {limit} bytes")
                if wire.OUTCOME not in headers:
                    self._failed(subject, headers, reply, cause)
                    continue
                # an answer: its requester hears `failed` now instead of waiting for its timeout
                payload, headers = b"", {wire.OUTCOME: Outcome.FAILED.value, wire.HOST: self.host,
                                         wire.DETAIL: f"the reply is too large for NATS: {cause}"}
            try:
                await nc.publish(subject, payload, reply=reply, headers=headers or None)
            except Exception as exc:  # disconnected between the check and now, or too large after all
                self._failed(subject, headers, reply, _describe(exc))

    def _fail_outbox(self, cause: str) -> None:
        with self._outbox_lock:
            items, self._outbox, self._outbox_bytes = list(self._outbox), deque(), 0
        for subject, _payload, headers, reply in items:
            self._failed(subject, headers, reply, cause)

    def _failed(self, subject: str, headers: dict[str, str], reply: str, cause: str) -> None:
        """A publish that could not be made: its request ends `failed`, a send is logged."""
        token = reply.rsplit(".", 1)[-1] if reply else ""
        failure = {wire.OUTCOME: wire.REJECTED, wire.ERROR: "delivery-failed", wire.DETAIL: f"not published: {cause}"}
        if self._answer_host_call(token, b"", failure):
            return
        if headers.get(wire.KIND) == wire.KIND_REQUEST and token:
            self._placed.pop(token, None)
            self.router.complete_remote(token, None, Outcome.FAILED, f"the request was not published: {cause}")
        else:  # a send, or an answer: one line each was as many lines as guests had queued (128 MiB of sends)
            extra = self._error_lines.fields("lattice_publish_failed")
            if extra is not None:
                log.warning("lattice_publish_failed", subject=subject, cause=cause, **extra)


def _host_result(target: ComponentId, data: bytes, headers: dict[str, str]) -> bytes | None:
    outcome = headers.get(wire.OUTCOME, wire.REPLY)
    detail = headers.get(wire.DETAIL, "")
    if outcome in (wire.REPLY, wire.QUEUED):
        return data
    if outcome == wire.REJECTED:
        error = headers.get(wire.ERROR, "delivery-failed")
        if error == "target-not-found":
            raise MessagingError("target-not-found", target)
        if error == "queue-full":
            raise MessagingError("queue-full")
        raise MessagingError(error if error in MessagingError.CASES else "delivery-failed", detail or error)
    if outcome == Outcome.NO_REPLY.value:
        return None
    try:
        raise RequestFailed(Outcome(outcome), detail)
    except ValueError:
        raise RequestFailed(Outcome.FAILED, f"unknown outcome {outcome!r}: {detail}") from None


async def _unsubscribe(subs: list[Subscription]) -> None:
    """End these subscriptions, whatever state their connection is in."""
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _about_one_message(exc: Exception) -> bool:
    """Whether nats-py's error `exc` is about one message, not the connection: a publish the server refused
    (a permissions violation; the connection stays up) or a message dropped (a slow consumer, unreadable)."""
    from nats import errors

    from wasmhost.lattice.nats_client import UnreadableMessage

    return (isinstance(exc, (errors.SlowConsumerError, UnreadableMessage))
            or "permissions violation" in str(exc).lower())


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
