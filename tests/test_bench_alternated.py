"""bench.harness.alternated, the helper the ratio rows of `make bench` are measured with. This tests
its bookkeeping with stand-in measures (plain coroutines returning rates), not any measurement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from bench.harness import alternated

Measure = Callable[[float], Awaitable[float]]


def machine(speeds: list[float], log: list[tuple[str, float]]) -> Callable[[str, float], Measure]:
    """Stand-in measures on a machine whose speed changes from one window to the next (`speeds`, in
    the order windows are measured); each measure's rate is its own cost factor times that speed."""
    turns = iter(speeds)

    def measure(name: str, factor: float) -> Measure:
        async def window(seconds: float) -> float:
            log.append((name, seconds))
            return factor * next(turns)
        return window

    return measure


def test_the_ratio_follows_the_machine_not_the_minute() -> None:
    # the machine halves its speed for the last two rounds: a baseline measured only before that and
    # a subject only after it would give 0.25x; measured beside each other, every round gives 0.5x
    log: list[tuple[str, float]] = []
    speeds = [1.0, 1.0] + [1.0] * 6 + [0.5] * 4
    measure = machine(speeds, log)
    result = asyncio.run(alternated(measure("base", 100.0), [measure("subject", 50.0)], 3.0, rounds=5, warm_up=0.2))
    assert result.ratios == [0.5]
    assert result.measured(0) == pytest.approx(result.baseline * 0.5)
    assert result.baseline == 100.0  # the median of 100, 100, 100, 50, 50


def test_warm_up_is_not_counted_and_rounds_alternate_their_order() -> None:
    log: list[tuple[str, float]] = []
    # the warm-up windows are the slowest by far: counted, they would move the medians
    speeds = [0.01, 0.01, 0.01] + [1.0] * 12
    measure = machine(speeds, log)
    result = asyncio.run(alternated(measure("b", 10.0), [measure("s1", 5.0), measure("s2", 20.0)], 4.0, rounds=4,
                                    warm_up=0.1))
    assert (result.baseline, result.ratios) == (10.0, [0.5, 2.0])
    assert log[:3] == [("b", 0.1), ("s1", 0.1), ("s2", 0.1)]
    assert [name for name, _ in log[3:]] == ["b", "s1", "s2", "s2", "s1", "b"] * 2
    assert {seconds for _, seconds in log[3:]} == {1.0}
