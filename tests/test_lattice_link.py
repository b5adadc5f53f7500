"""The link's subscriptions with a NATS client double (the real link runs end to end in test_lattice.py):
what stays subscribed when the host leaves while it is still subscribing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from nats import errors
from structlog.testing import capture_logs

from wasmhost.lattice.link import LIVE_STATES, Link
from wasmhost.lattice.settings import LatticeSettings
from wasmhost.lattice.wire import InventoryEntry

pytestmark = pytest.mark.anyio


class GatedNats:
    """Subscribes at once, except the `gated`-th subscription, which waits for `gate` (`blocked` says when)."""

    def __init__(self, gated: int) -> None:
        self.gated = gated
        self.count = 0
        self.live: set[str] = set()
        self.blocked = asyncio.Event()
        self.gate = asyncio.Event()

    async def subscribe(self, subject: str, **_: Any) -> GatedSubscription:
        self.count += 1
        if self.count == self.gated:
            self.blocked.set()
            await self.gate.wait()
        self.live.add(subject)
        return GatedSubscription(self, subject)


class GatedSubscription:
    def __init__(self, nats: GatedNats, subject: str) -> None:
        self.nats = nats
        self.subject = subject
        self._id = nats.count  # nats-py's sid, which the link keys ended subscriptions by

    async def unsubscribe(self) -> None:
        self.nats.live.discard(self.subject)

    async def drain(self) -> None:
        """How the link ends a component's subscriptions (see Link._drain): here at once."""
        await self.unsubscribe()


async def test_a_component_subscribed_while_the_host_leaves_is_not_left_subscribed() -> None:
    # leave() took out what was subscribed so far; a reconcile under way (a start of thousands, a stop signal
    # meanwhile) went on subscribing the rest, which then took messages through the drain instead of the
    # other replicas
    entries = [InventoryEntry(f"t/c/{i}", LIVE_STATES[0], "healthy", True) for i in range(3)]
    router = SimpleNamespace(loop=asyncio.get_running_loop())
    link = Link(LatticeSettings(("nats://127.0.0.1:4222",), "default", "h", 1.0), router,  # type: ignore[arg-type]
                lambda: entries, lambda _: True)
    nats = GatedNats(gated=3)  # the second component's first subject
    link.nc = nats  # type: ignore[assignment]
    reconciling = asyncio.create_task(link._reconcile())
    await nats.blocked.wait()
    await link.leave()
    nats.gate.set()
    await reconciling
    assert nats.live == set()


async def test_the_servers_reason_stays_the_cause_when_its_closed_socket_then_fails() -> None:
    # The sequence nats-py made of a server closing a busy host's connection with an -ERR: the -ERR (through
    # nats_client.LatticeClient), then, while nats-py closes, the socket's reset, then disconnected_cb and
    # closed_cb. The disconnection and closure were logged 'ConnectionResetError: [Errno 104] Connection reset
    # by peer', not the server's reason.
    router = SimpleNamespace(loop=asyncio.get_running_loop())
    link = Link(LatticeSettings(("nats://127.0.0.1:4222",), "default", "h", 1.0), router,  # type: ignore[arg-type]
                lambda: [], lambda _: True)
    nc = SimpleNamespace(is_connected=True, is_closed=False, connected_url=None)
    link.nc = nc  # type: ignore[assignment]
    link.cause = ""
    with capture_logs() as logs:
        await link._on_error(errors.Error("nats: user authentication expired"))
        nc.is_connected, nc.is_closed = False, True  # nats-py's _close: CLOSED first, then the socket's close
        await link._on_error(ConnectionResetError(104, "Connection reset by peer"))
        await link._on_disconnected()
        await link._on_closed()
    reason = "Error: nats: user authentication expired"
    assert [(line["event"], line["cause"]) for line in logs] == [
        ("lattice_error", reason), ("lattice_disconnected", reason),
        ("lattice_closed", f"the NATS connection was closed (disconnected from NATS ({reason}))")]
