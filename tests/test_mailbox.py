"""A mailbox's `take`: what an actor waiting for work gets back (our own logic, on a real event loop)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.test_withdraw import envelope
from wasmhost.messaging.mailbox import Mailbox

pytestmark = pytest.mark.anyio


async def test_take_returns_nothing_once_its_time_has_run_out() -> None:
    mailbox = Mailbox(4, asyncio.get_running_loop())
    began = time.monotonic()
    assert await asyncio.wait_for(mailbox.take(10, 0.05), 5) == []  # bounded: a take that never ends fails here
    assert time.monotonic() - began >= 0.04
    assert mailbox.offer(queued := envelope())
    assert [e is queued for e in await mailbox.take(10, 0.05)] == [True]  # queued meanwhile: taken at once


async def test_take_wakes_for_a_message_offered_from_another_thread_long_before_its_time() -> None:
    mailbox = Mailbox(4, asyncio.get_running_loop())
    sent = envelope()
    threading.Timer(0.02, mailbox.offer, (sent,)).start()
    assert [e is sent for e in await asyncio.wait_for(mailbox.take(10, 60.0), 30)] == [True]  # woken by the message


async def test_wake_ends_a_take_with_nothing_and_a_cancelled_take_leaves_the_mailbox_working() -> None:
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(4, loop)
    waiting = asyncio.ensure_future(mailbox.take(10, 60.0))
    await asyncio.sleep(0)
    mailbox.wake()
    assert await asyncio.wait_for(waiting, 5) == []
    cancelled = asyncio.ensure_future(mailbox.take(10, 0.05))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert mailbox.offer(queued := envelope())
    assert [e is queued for e in await mailbox.take(10, 1.0)] == [True]
    assert await asyncio.wait_for(mailbox.take(10, 0.05), 5) == []
