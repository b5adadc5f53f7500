"""The link's subscriptions with a NATS client double (the real link runs end to end in test_lattice.py):
what stays subscribed when the host leaves while it is still subscribing."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

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
