"""Large payloads do not amplify host memory without bound: the process-wide conversion budget lets
one transient conversion window exist at a time, and freed memory goes back to the OS afterwards."""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import answers_beside, plain_supervisor
from tests.test_actors import launch
from wasmhost.actors import actor as actor_module
from wasmhost.actors.conversion_budget import CONVERSIONS, ConversionBudget
from wasmhost.actors.state import ActorState
from wasmhost.actors.supervisor import Supervisor
from wasmhost.core import ComponentId
from wasmhost.messaging.outcome import Outcome, RequestFailed
from wasmhost.runtime.host_fn import CONTEXT_PAIR_VALUES
from wasmhost.runtime.malloc import release_free_memory
from wasmhost.runtime.runtime import Runtime
from wasmhost.runtime.store import TEXT_BYTES_PER_LIST_BYTE

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as sup:
        yield sup


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key}")


async def test_the_budget_never_holds_more_than_its_total_and_serves_in_order() -> None:
    budget = ConversionBudget(100)
    order: list[int] = []
    held: list[int] = []
    release = asyncio.Event()

    async def user(n: int, size: int) -> None:
        async with budget.reserve(size):
            order.append(n)
            held.append(budget.in_use)
            await release.wait()

    tasks = [asyncio.create_task(user(n, size)) for n, size in enumerate((60, 60, 30, 500, 10))]
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == [0]  # 1 waits for room; 2 and 4 would fit but wait their turn behind it
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3, 4]
    assert max(held) <= 100  # 500 is capped to the whole budget and ran alone
    assert budget.in_use == 0


async def test_a_cancelled_waiter_leaves_the_budget_whole() -> None:
    budget = ConversionBudget(10)
    async with budget.reserve(10):
        waiter = asyncio.create_task(budget.reserve(5).__aenter__())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert budget.in_use == 0
    async with budget.reserve(10):
        assert budget.in_use == 10


async def test_small_messages_around_a_large_one_keep_their_order(supervisor: Supervisor) -> None:
    await launch(supervisor, "counter", "test-org/counter/0", max_message_bytes=2 * MiB)
    target = ComponentId.parse("test-org/counter/0")
    payloads = [b"", bytes(MiB), b"", b"", bytes(256 * 1024), b""]
    replies = await asyncio.wait_for(asyncio.gather(
        *(supervisor.router.host_request(target, p, 30.0) for p in payloads)), 60)
    assert replies == [str(i).encode() for i in range(1, 7)]


async def test_concurrent_large_messages_share_one_conversion_window(supervisor: Supervisor) -> None:
    # Each 1 MiB echo needs ~200 MiB of wasmtime value arrays while it is converted; 4 echoes took
    # 4 of those windows at once (~800 MiB) before the budget; now one window plus the payloads.
    echoes = [await launch(supervisor, "echo", f"test-org/echo/{i}", max_message_bytes=MiB) for i in range(4)]
    payloads = [os.urandom(MiB) for _ in range(8)]
    await supervisor.router.host_request(echoes[0].component_id, payloads[0], 30.0)  # first-call allocations
    gc.collect()
    release_free_memory()
    base = _status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    replies = await asyncio.wait_for(asyncio.gather(*(
        supervisor.router.host_request(echoes[i % 4].component_id, p, 60.0) for i, p in enumerate(payloads))), 120)
    peak = _status("VmHWM:") - base
    assert replies == payloads
    assert peak < 400 * MiB, f"peak RSS grew by {peak / MiB:.0f} MiB for 8 MiB of payloads"
    del replies
    gc.collect()
    trims = CONVERSIONS.idle_trims
    deadline = time.monotonic() + 10
    while CONVERSIONS.idle_trims == trims:  # the budget hands free memory back once it is idle
        assert time.monotonic() < deadline, "no idle trim after the burst"
        await asyncio.sleep(0.05)
    retained = _status("VmRSS:") - base
    assert retained < 64 * MiB, f"{retained / MiB:.0f} MiB stayed resident after the burst"


async def held_back(sup: Supervisor, target: ComponentId, payload: bytes) -> bytes | None:
    """Ask `target` while the whole budget is taken: the ask must queue for it, then finish."""
    async with CONVERSIONS.reserve(CONVERSIONS.total_bytes):
        ask = asyncio.create_task(sup.router.host_request(target, payload, 30.0))
        deadline = time.monotonic() + 10
        while CONVERSIONS.waiting == 0:
            assert time.monotonic() < deadline, f"the next call of {target} did not wait for the budget"
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(ask, 30)


async def test_a_guest_that_produced_a_large_payload_waits_for_the_budget_next_time(supervisor: Supervisor) -> None:
    await launch(supervisor, "echo", "test-org/echo/0", max_message_bytes=2 * MiB)
    await launch(supervisor, "blaster", "test-org/blaster/0", max_message_bytes=2 * MiB)
    blaster = ComponentId.parse("test-org/blaster/0")

    # a send of 1 MiB (converted inside the guest's own call) budgets its next call, small as it is
    assert await supervisor.router.host_request(blaster, b"s1048576|test-org|echo|0", 30.0) == b"ok"
    assert await held_back(supervisor, blaster, b"R10") == bytes(10)
    # so does a large reply
    assert await supervisor.router.host_request(blaster, b"R1048576", 30.0) == bytes(MiB)
    assert await held_back(supervisor, blaster, b"R10") == bytes(10)


BUDGETED_CONVERSIONS = [
    # wasmtime converts a storage.set value as it converts a sent payload: 2.7 MB took the host from 45 to
    # 299 MiB, outside the budget, the guest's own incoming message being 8 bytes.
    pytest.param(b"s300000", 300_000, False, id="stored value"),
    # wasmtime converts every pair of a log context before log() runs, whether the line is written or not:
    # 900,000 empty pairs took the host from 52 to 382 MiB, four such guests at once to 755 MiB, and it
    # stayed resident once they went quiet.
    pytest.param(b"l100000", CONTEXT_PAIR_VALUES * 100_000, False, id="log context"),
    # An error's text is bounded where it enters the host, but wasmtime and the host have converted it whole
    # by then: four guests returning 20 MB errors in a loop left the host at 281 MiB once they quit (80 of
    # it theirs).
    pytest.param(b"e20000000", 20_000_000 // TEXT_BYTES_PER_LIST_BYTE, True, id="error text"),
]


@pytest.mark.parametrize(("payload", "hint", "fails"), BUDGETED_CONVERSIONS)
async def test_what_wasmtime_converted_for_a_guest_budgets_its_next_call_and_is_trimmed(
        supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch, payload: bytes, hint: int, fails: bool) -> None:
    """A large conversion the guest made from a tiny message makes its next call wait for room for one as
    large, and the copies are handed back once the call ended; an echo beside it answers while it goes on."""
    trims: list[bool] = []
    monkeypatch.setattr(actor_module, "trim_soon", lambda: trims.append(True))
    guest = await launch(supervisor, "fanout", "test-org/fanout/0")
    if fails:
        with pytest.raises(RequestFailed):
            await supervisor.router.host_request(guest.component_id, payload, 30.0)
    else:
        assert await supervisor.router.host_request(guest.component_id, payload, 30.0) is None
    assert guest.output_hint == hint  # the next call waits for room for a conversion this large
    assert trims  # and the copies were handed back once the call ended
    echo = await launch(supervisor, "echo", "test-org/echo/0")
    replies, calls = await answers_beside(supervisor, echo.component_id, guest.component_id, payload)
    assert replies == [b"ping"] * 3 and calls >= 1  # a neighbour answers while the guest goes on in a loop


async def test_memory_of_guests_sending_large_payloads_goes_back_afterwards(supervisor: Supervisor) -> None:
    # Six guests sending 2.7 MB each left 500-700 MiB resident: freed in per-thread malloc arenas,
    # which malloc_trim cannot hand back. One arena, trimmed once the budget is idle.
    # One send per guest is enough: what stays is in the arenas of the threads that converted the sends,
    # and more rounds on the same threads keep no more (with per-thread arenas, i.e. without
    # mallopt(M_ARENA_MAX, 1): 62-64 MiB stayed after one round, 64 MiB after three).
    sink = await launch(supervisor, "echo", "test-org/echo/0", max_message_bytes=2 * MiB)
    senders = [ComponentId.parse(f"test-org/blaster/{i}") for i in range(4)]
    for cid in senders:
        await launch(supervisor, "blaster", str(cid))
    gc.collect()
    release_free_memory()
    base = _status("VmRSS:")

    async def sender(cid: ComponentId) -> None:
        assert await supervisor.router.host_request(cid, b"s2097152|test-org|echo|0", 60.0) == b"ok"

    await asyncio.wait_for(asyncio.gather(*(sender(cid) for cid in senders)), 120)
    deadline = time.monotonic() + 60
    while sink.stats.handled < len(senders):
        assert time.monotonic() < deadline, "the echo did not handle every message"
        await asyncio.sleep(0.05)
    trims = CONVERSIONS.idle_trims
    while CONVERSIONS.idle_trims == trims:
        assert time.monotonic() < deadline, "no idle trim after the burst"
        await asyncio.sleep(0.05)
    retained = _status("VmRSS:") - base
    assert retained < 48 * MiB, f"{retained / MiB:.0f} MiB stayed resident after 8 MiB were sent"


async def test_a_guest_trapped_by_wasmtimes_size_guard_is_budgeted_after_its_restart(supervisor: Supervisor) -> None:
    actor = await launch(supervisor, "blaster", "test-org/blaster/0")
    blaster = actor.component_id
    with pytest.raises(RequestFailed, match="too much data is being copied between the host and the guest"):
        await supervisor.router.host_request(blaster, b"s4194304|test-org|blaster|0", 30.0)
    deadline = time.monotonic() + 10
    while actor.state is not ActorState.RUNNING or actor.stats.restarts < 1:
        assert time.monotonic() < deadline, "the blaster was not restarted"
        await asyncio.sleep(0.01)
    assert await held_back(supervisor, blaster, b"R10") == bytes(10)


async def test_an_actor_waiting_for_the_budget_still_stops_within_its_drain_time(supervisor: Supervisor) -> None:
    echo = await launch(supervisor, "echo", "test-org/echo/0")
    async with CONVERSIONS.reserve(CONVERSIONS.total_bytes):  # a guest holding the whole budget
        ask = asyncio.create_task(supervisor.router.host_request(echo.component_id, bytes(MiB), 30.0))
        deadline = time.monotonic() + 10
        while CONVERSIONS.waiting == 0:
            assert time.monotonic() < deadline, "the large message did not wait for the budget"
            await asyncio.sleep(0.01)
        await asyncio.wait_for(supervisor.stop(echo.component_id, drain_timeout=0.0), 10)
        with pytest.raises(RequestFailed) as caught:
            await asyncio.wait_for(ask, 10)
        assert caught.value.outcome is Outcome.TARGET_STOPPED
        assert CONVERSIONS.waiting == 0 and CONVERSIONS.in_use == CONVERSIONS.total_bytes
    assert CONVERSIONS.in_use == 0
