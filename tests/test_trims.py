"""Heap trims after large conversions are coalesced: each one holds glibc's heap lock while it walks the heap
(14 - 36 ms measured after 2 MB stored values), stalling every thread that allocates, the event loop included;
a guest repeating such calls made one per call (every 0.4 s or less). Each trim asked for is still done within
the trimmer's gap."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from tests.support import plain_supervisor
from tests.test_actors import launch
from tests.waits import until
from wasmhost.actors import conversion_budget
from wasmhost.actors.conversion_budget import ConversionBudget
from wasmhost.actors.supervisor import Supervisor
from wasmhost.runtime import malloc as malloc_module
from wasmhost.runtime.malloc import Trimmer
from wasmhost.runtime.runtime import Runtime


class FrozenClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_lone_trim_is_done_at_once_by_the_asking_thread() -> None:
    done: list[str] = []
    trimmer = Trimmer(gap=1.0, trim=lambda: done.append(threading.current_thread().name), clock=FrozenClock())
    trimmer.request()
    assert done == [threading.current_thread().name]
    assert trimmer.trims == 1 and not trimmer.pending


def test_trims_asked_for_in_a_burst_are_done_once_more_once_the_gap_is_over() -> None:
    clock = FrozenClock()
    trimmer = Trimmer(gap=0.05, trim=lambda: None, clock=clock)
    for _ in range(100):
        trimmer.request()
    assert trimmer.trims == 1  # the first at once; the other 99 merged into one, not yet due
    assert trimmer.pending
    assert not trimmer.settle(0.2)  # the gap has not passed: nothing more is done
    clock.now += 1.0  # past the gap
    assert trimmer.settle(10)  # done by the trimmer's thread once the gap is over
    assert trimmer.trims == 2 and not trimmer.pending
    clock.now += 1.0  # past the gap
    trimmer.request()  # a gap later: at once again
    assert trimmer.trims == 3 and not trimmer.pending


def test_a_trim_asked_for_while_one_runs_is_done_after_it() -> None:
    clock = FrozenClock()
    running = threading.Event()
    finish = threading.Event()

    def slow_trim() -> None:
        running.set()
        finish.wait(10)

    trimmer = Trimmer(gap=0.0, trim=slow_trim, clock=clock)
    first = threading.Thread(target=trimmer.request)
    first.start()
    assert running.wait(10)
    trimmer.request()  # while the first runs: merged into one done after it, not run beside it
    trimmer.request()
    assert trimmer.trims == 0 and trimmer.pending
    finish.set()
    first.join(10)
    assert trimmer.settle(10)
    assert trimmer.trims == 2


def test_a_trim_that_fails_on_the_trimmers_thread_does_not_stop_later_ones() -> None:
    clock = FrozenClock()
    outcomes: list[Exception | None] = [None, RuntimeError("no heap"), None]

    def trim() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    trimmer = Trimmer(gap=0.05, trim=trim, clock=clock)
    trimmer.request()  # at once
    trimmer.request()  # merged, done by the trimmer's thread: it fails there
    clock.now += 1.0  # past the gap
    assert trimmer.settle(10) and trimmer.trims == 2
    trimmer.request()
    clock.now += 1.0
    assert trimmer.settle(10)  # the thread still serves requests
    assert trimmer.trims == 3 and not outcomes


@pytest.fixture
async def supervisor(runtime: Runtime) -> AsyncIterator[Supervisor]:
    async with plain_supervisor(runtime) as sup:
        yield sup


@pytest.mark.anyio
async def test_a_guest_storing_large_values_in_a_loop_is_trimmed_once_per_gap(
        supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[object] = []
    libc_function = malloc_module._libc_function
    monkeypatch.setattr(malloc_module, "_libc_function",
                        lambda name: trims.append if name == "malloc_trim" else libc_function(name))
    monkeypatch.setattr(conversion_budget, "IDLE_TRIM_S", 3600.0)  # count only the trims the calls ask for
    clock = FrozenClock()
    trimmer = Trimmer(gap=0.05, clock=clock)
    monkeypatch.setattr(malloc_module, "TRIMMER", trimmer)
    guest = await launch(supervisor, "fanout", "test-org/fanout/0")
    calls = 6
    for _ in range(calls):  # 300 kB values: each call is followed by a trim request (actor.TRIM_AFTER)
        assert await supervisor.router.host_request(guest.component_id, b"s300000", 30.0) is None
    assert len(trims) == 1  # one trim for the burst so far, not one per call
    assert trimmer.pending
    clock.now += 1.0  # past the gap
    assert await asyncio.to_thread(trimmer.settle, 10.0)  # the rest is handed back once the gap is over
    assert len(trims) == 2


@pytest.mark.anyio
async def test_the_budgets_idle_trim_is_merged_with_the_trims_calls_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    # A guest pacing its large calls just past the budget's idle time got two trims per call: its own and the
    # budget's, which went straight to malloc_trim.
    trims: list[int] = []
    clock = FrozenClock()
    trimmer = Trimmer(gap=0.05, trim=lambda: trims.append(1), clock=clock)
    monkeypatch.setattr(malloc_module, "TRIMMER", trimmer)
    monkeypatch.setattr(conversion_budget, "IDLE_TRIM_S", 0.0)
    trimmer.request()  # a large call's trim, just done
    budget = ConversionBudget(10)
    async with budget.reserve(10):
        pass  # the budget goes idle: its trim is asked for at once
    await until(lambda: trimmer.pending)
    assert trims == [1] and budget.idle_trims == 0  # not a second trim within the gap
    clock.now += 1.0  # past the gap
    await until(lambda: budget.idle_trims == 1)
    assert trims == [1, 1]  # counted once the memory is back
