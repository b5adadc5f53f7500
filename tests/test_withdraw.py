"""Withdrawing an abandoned message from a mailbox (the control socket's timeouts and hang-ups use it)."""

from __future__ import annotations

import asyncio

import pytest

from wasmhost.core.ids import ComponentId
from wasmhost.core.messages import ComponentMessage, MessageMetadata, Timestamp
from wasmhost.messaging.envelope import Envelope
from wasmhost.messaging.mailbox import Mailbox

pytestmark = pytest.mark.anyio


STAMP = Timestamp.now()


def envelope() -> Envelope:
    return Envelope(ComponentMessage(ComponentId.parse("t/host/0"), b"same", MessageMetadata(timestamp=STAMP)))


async def test_withdraw_removes_that_envelope_not_an_equal_one() -> None:
    mailbox = Mailbox(2, asyncio.get_running_loop())
    first, second = envelope(), envelope()
    assert first == second  # equal contents: still two messages
    assert mailbox.offer(first) and mailbox.offer(second)
    assert mailbox.withdraw(second)
    assert [e is first for e in await mailbox.take(10, 0)] == [True]
    assert not mailbox.withdraw(first)  # taken already: the actor answers it


async def test_withdraw_makes_room_for_a_waiting_sender() -> None:
    mailbox = Mailbox(1, asyncio.get_running_loop())
    abandoned, waiting = envelope(), envelope()
    assert mailbox.offer(abandoned)
    put = asyncio.ensure_future(mailbox.put(waiting))
    await asyncio.sleep(0)  # one turn of the loop: the sender runs, finds the mailbox full and waits
    assert not put.done()
    assert mailbox.withdraw(abandoned)
    assert await asyncio.wait_for(put, 5)
    assert [e is waiting for e in await mailbox.take(10, 0)] == [True]
