"""`call --lattice`'s watch of the host holding its request, with a NATS client double: a refused heartbeat
subscription is known only once the server has answered it (nats-server sends its -ERR before the PONG of a
flush), which over a slow link comes after a fast host's three heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from wasmhost.core.ids import ComponentId
from wasmhost.lattice import wire
from wasmhost.system.lattice_call import _request

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 0.05
"""The holder's heartbeat (the shortest allowed): three of them pass before the answer comes."""
ANSWER_AFTER_S = 0.5


class RefusingNats:
    """Acknowledges the request at once and answers it ANSWER_AFTER_S later; refuses the heartbeat
    subscription, which the caller learns only through a flush (as nats-py learns of a server's -ERR)."""

    def __init__(self) -> None:
        self.callbacks: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.refusal_heard = False
        self.beats = ""

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Callable[[Any], Awaitable[None]]) -> None:
        self.callbacks[subject] = cb
        if ".hb." in subject:
            self.beats = subject

    async def flush(self, timeout: float = 10) -> None:
        self.refusal_heard = self.beats != ""

    async def publish(self, subject: str, payload: bytes, reply: str, headers: dict[str, str]) -> None:
        deliver = self.callbacks[reply]
        queued = {wire.OUTCOME: wire.QUEUED, wire.HOST: "host-b", wire.HEARTBEAT: f"{HEARTBEAT_S} 1.0"}
        await deliver(SimpleNamespace(subject=reply, headers=queued, data=b""))
        loop = asyncio.get_running_loop()
        answer = SimpleNamespace(subject=reply, headers={wire.OUTCOME: wire.REPLY, wire.HOST: "host-b"}, data=b"ok")
        loop.call_later(ANSWER_AFTER_S, lambda: asyncio.ensure_future(deliver(answer)))


async def test_a_refused_heartbeat_subscription_heard_late_does_not_end_the_call() -> None:
    # Before, the watch judged the holder gone once three of its heartbeats had passed unheard, asking whether
    # the subscription was refused without having waited for the server's word: a refusal still on its way
    # (150 ms is one slow round trip) ended a call to a live host `target-stopped`.
    nats = RefusingNats()
    answer = await _request(nats, "default", ComponentId("t", "slow", "0"), b"x", {}, 5.0,  # type: ignore[arg-type]
                            lambda subject: nats.refusal_heard and subject == nats.beats)
    assert answer.data == b"ok"
